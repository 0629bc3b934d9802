"""Data: built-in digits, tensors, image folders, CSV tables, captions; splits, cache, transforms."""
