"""The names a user may write, each list once, without importing torch.

The configuration's ``Literal`` types and the command line's ``choices`` are both built from these
tuples (``Literal[PRECISIONS]``, ``choices=PRECISIONS``), so a name added here is valid everywhere
at once and ``tightfit --help`` stays torch-free.
"""

# Training precisions (step/precision.py); "auto" is a config value that resolves to one of them.
PRECISIONS = ("fp32", "fp16", "bf16", "bf16-pure")
# Lightning's names (Trainer(precision=...)) for the same choices, accepted wherever a precision is.
PRECISION_ALIASES = {
    "32-true": "fp32",
    "32": "fp32",
    "16-mixed": "fp16",
    "16": "fp16",
    "bf16-mixed": "bf16",
    "bf16-true": "bf16-pure",
}


def canonical_precision(name: str) -> str:
    """A precision name with Lightning's spelling mapped to tightfit's: ``"bf16-mixed"`` -> ``"bf16"``."""
    return PRECISION_ALIASES.get(str(name), name)


# Optimizers (step/optim.py builds them); adam8bit needs bitsandbytes.
OPTIMIZERS = ("sgd", "sgd-momentum", "adam", "adamw", "adam8bit")

# Learning-rate schedules (training/schedules.py).
SCHEDULES = ("constant", "constant-warmup", "linear", "cosine", "exponential", "step", "reduce-on-plateau")

# Devices a run config may name; "cuda:N" is also valid.
DEVICE_KINDS = ("auto", "cpu", "cuda", "mps")

# Model-spec prefixes tightfit builds itself (models/spec.py); anything else before the colon is a
# Python module (``module.path:callable``), which runs code (see tightfit/trust.py).
MODEL_PREFIXES = ("builtin", "torchvision", "hf", "diffusion")

# Precisions of a forward-only pass (plan/inference.py, a study's extraction stages): no bf16-pure,
# which is a training setting (bf16 weights and optimizer state).
INFERENCE_PRECISIONS = ("fp32", "fp16", "bf16")

# Post-training quantization methods of `compress` (compression/quantize.py).
QUANTIZE_METHODS = ("auto", "dynamic", "static", "weight-only")

# How a LoRA run's frozen base may be quantized (models/qlora.py): QLoRA's nf4, or int8.
QUANTIZE_BASES = ("nf4", "int8")
NF4_BACKENDS = ("bitsandbytes", "torchao")  # lora.quant_backend (besides auto): models/nf4.py
QUANT_BACKENDS = ("auto", *NF4_BACKENDS)

# How several processes share a model (training/distributed.py, plan/distributed.py); a run
# config also takes "auto" (one process alone, ddp under torchrun).
STRATEGIES = ("ddp", "fsdp")

# When ddp averages the gradients (training/distributed.py): during backward through
# DistributedDataParallel, or after all the micro-batches, the mode out-of-memory recovery across
# ranks needs; a run config also takes "auto" (after_accumulation under a budget, else overlap).
GRADIENT_SYNCS = ("overlap", "after_accumulation")
