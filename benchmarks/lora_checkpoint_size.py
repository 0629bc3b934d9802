"""Checkpoint size of the SD 1.5 LoRA recipe before and after adapters-only checkpoints.

Builds the recipe's model from the shipped SD 1.5 UNet config (src/tightfit/configs/sd15-unet,
860 M parameters) on the meta device, applies the recipe's lora: section, and counts the tensor
bytes of what a checkpoint's model.safetensors held before (the whole state_dict) and holds now
(tightfit.models.lora.adapter_state_dict: adapters + buffers). The safetensors header adds a few
KB to either. The optimizer state (state.pt) covers the trainable tensors only in both cases:
AdamW keeps two fp32 slots per adapter weight.

    python benchmarks/lora_checkpoint_size.py
"""

import json

from tightfit.config import load_config
from tightfit.models.lora import adapter_state_dict, apply_lora
from tightfit.models.spec import build_model


def tensor_bytes(state: dict) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in state.values())


def main() -> None:
    config = load_config("recipes/lora-diffusion.yaml", ["model=diffusion:packaged:sd15-unet"])
    model = apply_lora(build_model(config.model, meta=True, **config.model_options), config.lora, verbose=False)
    before, after = tensor_bytes(model.state_dict()), tensor_bytes(adapter_state_dict(model))
    trainable = model.lora_summary.trainable_parameters
    print(
        json.dumps(
            {
                "model": config.model,
                "lora": config.lora.model_dump(),
                "full_state_dict_bytes": before,
                "adapters_only_bytes": after,
                "optimizer_state_bytes": 2 * 4 * trainable,
                "trainable_parameters": trainable,
                "ratio": round(before / after, 1),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
