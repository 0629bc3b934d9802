"""Models: specs (builtin:, torchvision:, hf:, module:callable), checkpointing, LoRA."""
