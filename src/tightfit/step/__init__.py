"""The bottom layer: one training step and the primitives it is made of.

``batch`` (count, slice, move, cast a batch), ``loss`` (the task loss rule), ``precision``
(autocast, parameter dtype, grad scaler), ``optim`` (optimizers by name) and ``step`` (the one
training step that the trainer, the memory estimator, the batch-size search and out-of-memory
recovery all run). Nothing here imports from ``training``, ``memory`` or ``models``.
"""
