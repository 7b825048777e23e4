"""Text generation from a sharded model: sampling, the generator, the generation server
and the samples shown at eval."""
