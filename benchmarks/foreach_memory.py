"""What the optimizer's foreach kernels add to a CUDA step's peak, measured on fake tensors.

On CUDA, torch runs AdamW, SGD and the gradient-norm computation with multi-tensor ("foreach")
kernels by default; on the CPU it loops one tensor at a time. The foreach kernels allocate their
temporaries for every parameter at once (``exp_avg_sq.sqrt()`` for all tensors, then the update),
so the optimizer step can become the peak of a training step. tightfit's estimate for a CUDA
profile runs them (``estimate_step(..., foreach=None)``); this script prints how much that changes
the tensor peak against the one-tensor-at-a-time loop, for the models of the memory benchmark.

Run:
    .venv/bin/python benchmarks/foreach_memory.py
"""

import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).parent))

from memory_accuracy import gpt2, images, mlp, small_cnn, tokens, torchvision_model  # noqa: E402

from tightfit.memory.estimator import estimate_step  # noqa: E402
from tightfit.units import format_bytes  # noqa: E402

CUDA_TENSORS_ONLY = SimpleNamespace(name="cuda (tensors only)", device_type="cuda", overhead={})

CASES = [
    ("MLP 3.7M, batch 8", mlp, images(3, 32), 8, "adamw"),
    ("small CNN, batch 8", small_cnn, images(3, 64), 8, "adamw"),
    ("ResNet-18, 64 px, batch 8", torchvision_model("resnet18"), images(3, 64), 8, "adamw"),
    ("ResNet-50, 224 px, batch 32", torchvision_model("resnet50"), images(3, 224), 32, "adamw"),
    ("ViT-B/16, 224 px, batch 8", torchvision_model("vit_b_16"), images(3, 224), 8, "adamw"),
    ("GPT-2 style, 128 tokens, batch 4", gpt2, tokens(128, 50257), 4, "adamw"),
    ("GPT-2 style, 128 tokens, batch 4, SGD momentum", gpt2, tokens(128, 50257), 4, "sgd-momentum"),
]


def main() -> None:
    print("| model | optimizer | peak, one tensor at a time | peak, foreach (CUDA default) | difference |")
    print("|---|---|---:|---:|---:|")
    for name, model, batch, batch_size, optimizer in CASES:
        common = dict(batch_size=batch_size, optimizer=optimizer, profile=CUDA_TENSORS_ONLY, count_flops=False)
        loop = estimate_step(model, batch, foreach=False, **common).peak_bytes
        foreach = estimate_step(model, batch, **common).peak_bytes
        print(
            f"| {name} | {optimizer} | {format_bytes(loop)} | {format_bytes(foreach)} | "
            f"{format_bytes(foreach - loop)} ({(foreach - loop) / loop:+.1%}) |"
        )
    print("\nfp32, tensor bytes only (CUDA's 512-byte rounding, no context or fragmentation), fake tensors")


if __name__ == "__main__":
    main()
