"""Training: progressive stages, distillation, checkpoints, precision, distributed."""
