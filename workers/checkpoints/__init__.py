"""Checkpoints: orbax saves and restores, on a shared file system or object storage, and
the export loop that writes a step as a Hugging Face model or adapter."""
