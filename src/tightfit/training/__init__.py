"""Training: the loop, its callbacks, schedules, checkpoints, metrics and loggers."""
