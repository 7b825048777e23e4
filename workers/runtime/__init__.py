"""What the training processes run on: joining `jax.distributed`, the device mesh, TPU
chips, XLA:CPU settings, preemption notices and the stall watchdog."""
