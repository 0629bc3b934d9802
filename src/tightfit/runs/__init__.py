"""The run folder: its layout, weights (safetensors, DCP shards, adapters only) in and out, the newest
intact checkpoint, and rebuilding the model a run trained.

Sits above ``models/`` (it builds models and loads weights into them) and below ``memory/``,
``plan/`` and ``training/``; ``models/`` never imports it.
"""
