"""Training on each host: batches, the jitted step and its loss, the optimizer, the
programs a run compiles (and their TPU plans), and the worker loop that runs them."""
