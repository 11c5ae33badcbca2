"""The training loop, one optimizer step, exact evaluation, the optimizer, per-rank randomness and the task's loss."""
