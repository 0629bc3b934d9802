"""How close is tightfit's memory estimate to the measurement? A zoo of models x settings.

For every case: the estimate (fake tensors, no weights allocated), the measurement (real tensors,
counted by the same tracker, after one warm-up step), the error, and beside them the
parameters-only estimate that accelerate's ``estimate-memory`` and DeepSpeed's model-state
estimators give (weights + gradients + optimizer state of the trainable parameters, no
activations). On CPU the target is a median error <= 1 % and a maximum <= 3 %.

Inputs are kept small (64x64 images, 64-128 tokens, batches of 2-8) so that the real steps run on
two CPU cores in a few minutes; the estimator's accuracy does not depend on the size.

Forward-only rows (``tightfit.plan.inference``: feature extraction, prediction) compare the
inference-mode estimate with the measurement the same way, against the same bar.

Also timed: planning a 7B Llama-style decoder (32 layers, hidden 4096, built from a transformers
``LlamaConfig``) on fake tensors, LoRA and full fine-tuning.

With ``--cuda`` (skipped without a GPU) every case is also run on the GPU and the prediction is
compared with ``torch.cuda.max_memory_allocated`` (tensor bytes rounded to 512-byte blocks) and
``max_memory_reserved`` (what the caching allocator held: the fragmentation figure to calibrate
``overhead.fragmentation`` in the device profile).

With ``--distributed`` the script also launches itself on 2 gloo CPU ranks (torchrun) and, for
``ddp`` and ``fsdp``, compares each rank's tracked peak over the second step of a real ``Trainer``
run with the per-rank estimate of ``tightfit.plan.distributed`` (docs/distributed.md).

Run:
    .venv/bin/python benchmarks/memory_accuracy.py [--json results.json] [--only resnet18,gpt2] [--cuda] [--distributed]
        [--mode training|inference|both]
"""

import argparse
import json
import statistics
import sys
import time
from types import SimpleNamespace

import torch
from torch import nn

from tightfit.memory.estimator import EstimationError, estimate_step
from tightfit.memory.measure import measure_step
from tightfit.plan.inference import estimate_forward, measure_forward
from tightfit.units import format_bytes


# ----------------------------------------------------------------------------------- the zoo
def images(channels, size, classes=10):
    def factory(batch_size, device):
        return (
            torch.randn(batch_size, channels, size, size, device=device),
            torch.randint(0, classes, (batch_size,), device=device),
        )

    return factory


def tokens(length, vocab, labels="tokens", classes=2):
    def factory(batch_size, device):
        ids = torch.randint(0, vocab, (batch_size, length), device=device)
        target = ids if labels == "tokens" else torch.randint(0, classes, (batch_size,), device=device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": target}

    return factory


def unet_batch(batch_size, device):
    return {
        "sample": torch.randn(batch_size, 3, 32, 32, device=device),
        "timestep": torch.randint(0, 1000, (batch_size,), device=device),
    }


def mlp():
    return nn.Sequential(
        nn.Flatten(), nn.Linear(3 * 32 * 32, 1024), nn.ReLU(), nn.Linear(1024, 512), nn.ReLU(), nn.Linear(512, 10)
    )


def small_cnn():
    from tightfit.models.builtin import SmallCNN

    return SmallCNN(num_classes=10, in_channels=3)


def torchvision_model(name, **kwargs):
    def factory():
        import torchvision

        return torchvision.models.get_model(name, weights=None, **kwargs)

    return factory


def bert():
    import transformers

    config = transformers.BertConfig(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=1024,
        vocab_size=8000,
        max_position_embeddings=256,
        num_labels=2,
    )
    return transformers.BertForSequenceClassification(config)


def gpt2():
    import transformers

    config = transformers.GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=8000, n_positions=256)
    return transformers.GPT2LMHeadModel(config)


def unet():
    import diffusers

    return diffusers.UNet2DModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )


def minilm_lora():
    from tightfit.models.lora import LoRAConfig, apply_lora
    from tightfit.models.text import minilm_classifier

    return apply_lora(minilm_classifier(2), LoRAConfig(rank=8), verbose=False)


IMAGES_64 = images(3, 64)
ZOO = [
    # name, model factory, batch factory, [(batch size, settings), ...]
    (
        "mlp",
        mlp,
        images(3, 32),
        [(8, dict(optimizer="sgd")), (8, dict(optimizer="adamw")), (8, dict(precision="bf16"))],
    ),
    ("small-cnn", small_cnn, images(3, 32), [(8, dict()), (8, dict(precision="bf16-pure", optimizer="sgd-momentum"))]),
    (
        "resnet18",
        torchvision_model("resnet18", num_classes=10),
        IMAGES_64,
        [(4, dict()), (8, dict(optimizer="sgd")), (4, dict(checkpointing=True)), (4, dict(accumulation_steps=4))],
    ),
    (
        "resnet50",
        torchvision_model("resnet50", num_classes=10),
        IMAGES_64,
        [(2, dict()), (2, dict(precision="bf16")), (2, dict(checkpointing=True, optimizer="sgd-momentum"))],
    ),
    (
        "mobilenet_v3_large",
        torchvision_model("mobilenet_v3_large", num_classes=10),
        IMAGES_64,
        [(4, dict()), (4, dict(precision="bf16-pure"))],
    ),
    (
        "vit_b_16",
        torchvision_model("vit_b_16", num_classes=10, image_size=64),
        IMAGES_64,
        [(2, dict()), (2, dict(checkpointing=True)), (2, dict(precision="bf16", optimizer="sgd"))],
    ),
    (
        "bert-style",
        bert,
        tokens(128, 8000, labels="classes"),
        [(4, dict()), (4, dict(precision="bf16")), (4, dict(checkpointing=True))],
    ),
    (
        "gpt2-style",
        gpt2,
        tokens(128, 8000),
        [(4, dict()), (4, dict(precision="bf16-pure")), (4, dict(checkpointing=True, accumulation_steps=2))],
    ),
    ("unet (diffusers)", unet, unet_batch, [(4, dict()), (4, dict(precision="bf16"))]),
    ("minilm + lora", minilm_lora, tokens(64, 30522, labels="classes"), [(8, dict()), (8, dict(precision="bf16"))]),
]


def vit3d_small():
    from tightfit.models.builtin import ViT

    return ViT(num_classes=2, image_size=32, patch_size=8, in_channels=1, dim=192, depth=4, heads=3, spatial_dims=3)


def volumes(batch_size, device):
    return torch.randn(batch_size, 1, 32, 32, 32, device=device), None


# name, model factory, batch factory, [(batch size, precision), ...]: forward-only passes
FORWARD_ZOO = [
    ("mlp", mlp, images(3, 32), [(8, "fp32"), (8, "bf16")]),
    ("small-cnn", small_cnn, images(3, 32), [(8, "fp32")]),
    ("resnet18", torchvision_model("resnet18", num_classes=10), IMAGES_64, [(8, "fp32"), (8, "bf16")]),
    ("resnet50", torchvision_model("resnet50", num_classes=10), IMAGES_64, [(4, "fp32"), (4, "bf16")]),
    ("mobilenet_v3_large", torchvision_model("mobilenet_v3_large", num_classes=10), IMAGES_64, [(8, "fp32")]),
    ("vit_b_16", torchvision_model("vit_b_16", num_classes=10, image_size=64), IMAGES_64, [(4, "fp32"), (4, "bf16")]),
    ("vit3d (builtin)", vit3d_small, volumes, [(2, "fp32"), (2, "bf16")]),
    ("bert-style", bert, tokens(128, 8000, labels="classes"), [(4, "fp32")]),
    ("gpt2-style", gpt2, tokens(128, 8000), [(4, "fp32"), (4, "bf16")]),
]


def run_forward_case(name, model_factory, batch_factory, batch_size, precision) -> dict:
    """Forward-only: the inference-mode estimate on a meta model vs the measurement on a real one."""
    torch.manual_seed(0)
    row = {"model": name, "settings": f"b{batch_size} {precision} forward-only"}
    with torch.device("meta"):
        meta_model = model_factory()
    started = time.perf_counter()
    try:
        estimate = estimate_forward(meta_model, batch_factory, batch_size=batch_size, precision=precision)
    except EstimationError as error:
        row.update(error=str(error))
        return row
    row["estimate_seconds"] = time.perf_counter() - started
    started = time.perf_counter()
    measured = measure_forward(model_factory(), batch_factory, batch_size=batch_size, precision=precision, device="cpu")
    row["measure_seconds"] = time.perf_counter() - started
    row.update(
        estimated_bytes=estimate.peak_bytes,
        measured_bytes=measured.peak_bytes,
        error_percent=100 * (estimate.peak_bytes - measured.peak_bytes) / measured.peak_bytes,
        parameters_bytes=measured.breakdown["parameters"],
        activations_bytes=measured.breakdown["activations"],
    )
    return row


def parameters_only_bytes(model: nn.Module, settings: dict) -> int:
    """Model states only, as accelerate's estimate-memory and DeepSpeed's estimators count them."""
    bytes_per_value = 2 if settings.get("precision") == "bf16-pure" else 4
    state_copies = {"sgd": 0, "sgd-momentum": 1}.get(settings.get("optimizer", "adamw"), 2)
    total = sum(p.numel() for p in model.parameters()) * bytes_per_value
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) * bytes_per_value
    return total + trainable * (1 + state_copies)


def describe_settings(batch_size: int, settings: dict) -> str:
    parts = [f"b{batch_size}", settings.get("precision", "fp32"), settings.get("optimizer", "adamw")]
    if settings.get("checkpointing"):
        parts.append("ckpt")
    if settings.get("accumulation_steps", 1) > 1:
        parts.append(f"acc{settings['accumulation_steps']}")
    return " ".join(parts)


def run_case(name, model_factory, batch_factory, batch_size, settings, cuda: bool) -> dict:
    torch.manual_seed(0)
    row = {"model": name, "settings": describe_settings(batch_size, settings)}
    started = time.perf_counter()
    try:
        estimate = estimate_step(model_factory, batch_factory, batch_size=batch_size, **settings)
    except EstimationError as error:
        row.update(error=str(error))
        return row
    row["estimate_seconds"] = time.perf_counter() - started
    started = time.perf_counter()
    measured = measure_step(model_factory, batch_factory, batch_size=batch_size, device="cpu", **settings)
    row["measure_seconds"] = time.perf_counter() - started
    with torch.device("meta"):
        parameters_only = parameters_only_bytes(model_factory(), settings)
    row.update(
        estimated_bytes=estimate.peak_bytes,
        measured_bytes=measured.peak_bytes,
        error_percent=100 * (estimate.peak_bytes - measured.peak_bytes) / measured.peak_bytes,
        parameters_only_bytes=parameters_only,
        parameters_only_error_percent=100 * (parameters_only - measured.peak_bytes) / measured.peak_bytes,
        activations_bytes=measured.breakdown["activations"],
        gflops=(estimate.flops or 0) / 1e9,
    )
    if cuda:
        row.update(cuda_comparison(model_factory, batch_factory, batch_size, settings))
    return row


def cuda_comparison(model_factory, batch_factory, batch_size, settings) -> dict:
    """Predicted allocated bytes vs ``max_memory_allocated``; the fragmentation seen in ``reserved``."""
    rounding_only = SimpleNamespace(name="cuda-rounding", device_type="cuda", overhead={})
    predicted = estimate_step(model_factory, batch_factory, batch_size=batch_size, profile=rounding_only, **settings)
    torch.cuda.empty_cache()
    measure_step(model_factory, batch_factory, batch_size=batch_size, device="cuda", **settings)
    allocated = torch.cuda.max_memory_allocated()
    reserved = torch.cuda.max_memory_reserved()
    return {
        "cuda_predicted_allocated_bytes": predicted.peak_bytes,
        "cuda_max_memory_allocated": allocated,
        "cuda_max_memory_reserved": reserved,
        "cuda_allocated_error_percent": 100 * (predicted.peak_bytes - allocated) / allocated,
        "cuda_fragmentation": (reserved - allocated) / allocated,
    }


def time_llama_7b() -> list[dict]:
    """Plan a 7B Llama-style decoder (no weights allocated): full fine-tuning in bf16-pure, and LoRA."""
    import psutil
    import transformers

    from tightfit.models.lora import LoRAConfig, apply_lora

    config = transformers.LlamaConfig(
        num_hidden_layers=32,
        hidden_size=4096,
        intermediate_size=11008,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
    )
    batch = tokens(512, 32000)
    rows = []
    for label, factory, settings in [
        (
            "llama-7b full bf16-pure adamw ckpt",
            lambda: transformers.LlamaForCausalLM(config),
            dict(precision="bf16-pure", optimizer="adamw", checkpointing=True),
        ),
        (
            "llama-7b lora r16 bf16-pure ckpt",
            lambda: apply_lora(transformers.LlamaForCausalLM(config), LoRAConfig(rank=16), verbose=False),
            dict(precision="bf16-pure", optimizer="adamw", checkpointing=True),
        ),
    ]:
        resident = psutil.Process().memory_info().rss
        started = time.perf_counter()
        memory = estimate_step(factory, batch, batch_size=1, **settings)
        rows.append(
            {
                "case": label,
                "seconds": time.perf_counter() - started,
                "peak_bytes": memory.peak_bytes,
                "breakdown": memory.breakdown,
                "tflops_per_step": (memory.flops or 0) / 1e12,
                "process_growth_bytes": psutil.Process().memory_info().rss - resident,
            }
        )
    return rows


# ---------------------------------------------------------------------- distributed rows
DISTRIBUTED_WIDTH, DISTRIBUTED_BLOCKS, DISTRIBUTED_BATCH = 256, 4, 16


def distributed_model():
    """Four repeated blocks between an input and an output layer: FSDP's units and a root."""
    torch.manual_seed(0)
    blocks = [
        nn.Sequential(nn.Linear(DISTRIBUTED_WIDTH, DISTRIBUTED_WIDTH), nn.GELU()) for _ in range(DISTRIBUTED_BLOCKS)
    ]
    return nn.Sequential(nn.Linear(32, DISTRIBUTED_WIDTH), *blocks, nn.Linear(DISTRIBUTED_WIDTH, 10))


def distributed_batch(batch_size, device):
    generator = torch.Generator().manual_seed(batch_size)
    return torch.randn(batch_size, 32, generator=generator).to(device), torch.randint(0, 10, (batch_size,)).to(device)


class _TrackSecondStep:
    """A trainer callback: the tracker runs from the end of step 1 to the end of step 2, so it
    sees a whole steady-state step (window, forward, backward, gradient sync, optimizer step)."""

    def __init__(self):
        self.tracker = None
        self.peak_bytes = None
        self.breakdown = None

    def on_fit_start(self, trainer):
        """Under DistributedDataParallel: note its gradient buckets, which live through the whole
        step although no ``.grad`` points into them between steps (the tracker could not see them)."""
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        from torch.nn.parallel import DistributedDataParallel

        self.buckets = {}
        if isinstance(trainer.train_model, DistributedDataParallel):

            def hook(state, bucket):
                self.buckets.setdefault(id(bucket.buffer().untyped_storage()), bucket.buffer())
                return allreduce_hook(None, bucket)

            trainer.train_model.register_comm_hook(None, hook)

    def on_step_end(self, trainer, metrics):
        from tightfit.memory.tracker import GRADIENTS, ROOT_OWNER, MemoryTracker

        if trainer.global_step == 1:
            self.tracker = MemoryTracker(trainer.model, trainer.optimizer)
            self.tracker.__enter__()
            for buffer in self.buckets.values():
                self.tracker._track(buffer, GRADIENTS, ROOT_OWNER)  # live from the start, as on the device
        elif trainer.global_step == 2:
            self.tracker.__exit__(None, None, None)
            self.peak_bytes, self.breakdown = self.tracker.peak_bytes, self.tracker.breakdown


def distributed_worker(output: str, strategy: str) -> None:  # strategy: fsdp, ddp (overlap) or ddp-after
    """Under torchrun: a real 2-step Trainer run; every rank writes its peak."""
    import os

    from torch.utils.data import TensorDataset

    from tightfit.models.checkpointing import find_repeated_blocks
    from tightfit.plan.distributed import model_shape, per_rank_memory
    from tightfit.training.trainer import Trainer

    rank = int(os.environ["RANK"])
    inputs, targets = distributed_batch(DISTRIBUTED_BATCH * 4, "cpu")
    rows = []
    for launched in (strategy,):  # one per launch: a run leaves the process group when it ends
        gradient_sync = "after_accumulation" if launched == "ddp-after" else "overlap"
        strategy = launched.removesuffix("-after")
        tracking = _TrackSecondStep()
        config = {
            "run_dir": f"{output}.{strategy}",
            "max_steps": 2,
            "device": "cpu",
            "threads": 1,
            "batch": {"micro_batch_size": DISTRIBUTED_BATCH},
            "optimizer": {"name": "adamw"},
            "distributed": {"strategy": strategy, "timeout_s": 120, "gradient_sync": gradient_sync},
            "logging": {"console": False, "tensorboard": False, "jsonl": False},
            "monitor": {"enabled": False},
            "schedule": {"name": "constant"},
        }
        Trainer(
            config,
            model=distributed_model(),
            datasets=(TensorDataset(inputs, targets), None, None),
            callbacks=[tracking],
        ).fit()
        model = distributed_model()
        single = estimate_step(model, distributed_batch, batch_size=DISTRIBUTED_BATCH, optimizer="adamw")
        shape = model_shape(model, find_repeated_blocks(model))
        estimate, breakdown, _ = per_rank_memory(
            single,
            shape,
            strategy=strategy,
            devices=int(os.environ["WORLD_SIZE"]),
            profile=None,
            param_dtype="fp32",
            reduce_dtype="fp32",
            gradient_sync=gradient_sync,
        )
        rows.append(
            {
                "strategy": strategy if strategy == "fsdp" else f"ddp ({gradient_sync})",
                "rank": rank,
                "measured_bytes": tracking.peak_bytes,
                "measured": tracking.breakdown,
                "estimated_bytes": estimate,
                "estimated": breakdown,
                "one_device_bytes": single.peak_bytes,
            }
        )
    with open(f"{output}.rank{rank}", "w") as handle:
        json.dump(rows, handle)


def distributed_rows() -> list[dict]:
    """Launch :func:`distributed_worker` on 2 gloo ranks and collect every rank's row."""
    import os
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        output = os.path.join(folder, "peaks")
        rows = []
        for strategy in ("ddp", "ddp-after", "fsdp"):
            command = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                "2",
                __file__,
                "--distributed-worker",
                output,
                strategy,
            ]
            subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
            for rank in range(2):
                with open(f"{output}.rank{rank}") as handle:
                    rows += json.load(handle)
    for row in rows:
        row["error_percent"] = 100 * (row["estimated_bytes"] - row["measured_bytes"]) / row["measured_bytes"]
    return sorted(rows, key=lambda row: (row["strategy"], row["rank"]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", metavar="PATH", help="also write every row to this JSON file")
    parser.add_argument("--only", metavar="NAMES", help="comma-separated model names from the zoo")
    parser.add_argument(
        "--cuda", action="store_true", help="also compare with torch.cuda.max_memory_allocated/reserved"
    )
    parser.add_argument("--skip-7b", action="store_true", help="do not time the 7B planning")
    parser.add_argument(
        "--mode",
        choices=("training", "inference", "both"),
        default="both",
        help="training steps, forward-only passes, or both (default)",
    )
    parser.add_argument(
        "--distributed", action="store_true", help="also compare per-rank peaks on 2 gloo ranks (ddp, fsdp)"
    )
    parser.add_argument("--distributed-worker", nargs=2, metavar=("OUTPUT", "STRATEGY"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.distributed_worker:
        distributed_worker(*args.distributed_worker)
        return 0
    if args.cuda and not torch.cuda.is_available():
        print("--cuda: no CUDA device here; the CUDA comparison is skipped", file=sys.stderr)
        args.cuda = False
    wanted = set(args.only.split(",")) if args.only else None
    rows = []
    print(
        f"{'model':<20} {'settings':<28} {'estimated':>11} {'measured':>11} {'error':>8} {'params-only':>11} "
        f"{'its error':>9} {'est s':>6} {'meas s':>6}"
    )
    for name, model_factory, batch_factory, cases in ZOO if args.mode != "inference" else []:
        if wanted and name not in wanted:
            continue
        for batch_size, settings in cases:
            row = run_case(name, model_factory, batch_factory, batch_size, settings, args.cuda)
            rows.append(row)
            if "error" in row:
                print(f"{name:<20} {row['settings']:<28} not traceable: {row['error'][:80]}")
                continue
            print(
                f"{name:<20} {row['settings']:<28} {format_bytes(row['estimated_bytes']):>11} "
                f"{format_bytes(row['measured_bytes']):>11} {row['error_percent']:>7.3f}% "
                f"{format_bytes(row['parameters_only_bytes']):>11} {row['parameters_only_error_percent']:>8.1f}% "
                f"{row['estimate_seconds']:>6.2f} {row['measure_seconds']:>6.2f}",
                flush=True,
            )
            if args.cuda:
                print(
                    f"{'':<20} cuda: predicted allocated {format_bytes(row['cuda_predicted_allocated_bytes'])}, "
                    f"max_memory_allocated {format_bytes(row['cuda_max_memory_allocated'])} "
                    f"({row['cuda_allocated_error_percent']:+.2f}%), reserved "
                    f"{format_bytes(row['cuda_max_memory_reserved'])} "
                    f"(fragmentation {100 * row['cuda_fragmentation']:.1f}%)"
                )
    errors = [abs(row["error_percent"]) for row in rows if "error_percent" in row]
    naive = [abs(row["parameters_only_error_percent"]) for row in rows if "error_percent" in row]
    summary = {
        "cases": len(rows),
        "median_abs_error_percent": statistics.median(errors) if errors else None,
        "max_abs_error_percent": max(errors) if errors else None,
        "exact_cases": sum(error == 0 for error in errors),
        "parameters_only_median_abs_error_percent": statistics.median(naive) if naive else None,
        "parameters_only_max_abs_error_percent": max(naive) if naive else None,
    }
    if errors:
        print(
            f"\n{summary['cases']} cases: median |error| {summary['median_abs_error_percent']:.3f}%, "
            f"max {summary['max_abs_error_percent']:.3f}%, {summary['exact_cases']} exact to the byte; "
            f"parameters-only estimate: median |error| {summary['parameters_only_median_abs_error_percent']:.1f}%, "
            f"max {summary['parameters_only_max_abs_error_percent']:.1f}%"
        )
    forward_rows = []
    if args.mode != "training":
        print(
            f"\n{'model':<20} {'settings':<28} {'estimated':>11} {'measured':>11} {'error':>8} {'activations':>11} "
            f"{'est s':>6} {'meas s':>6}"
        )
    for name, model_factory, batch_factory, cases in FORWARD_ZOO if args.mode != "training" else []:
        if wanted and name not in wanted:
            continue
        for batch_size, precision in cases:
            row = run_forward_case(name, model_factory, batch_factory, batch_size, precision)
            forward_rows.append(row)
            if "error" in row:
                print(f"{name:<20} {row['settings']:<28} not traceable: {row['error'][:80]}")
                continue
            print(
                f"{name:<20} {row['settings']:<28} {format_bytes(row['estimated_bytes']):>11} "
                f"{format_bytes(row['measured_bytes']):>11} {row['error_percent']:>7.3f}% "
                f"{format_bytes(row['activations_bytes']):>11} {row['estimate_seconds']:>6.2f} "
                f"{row['measure_seconds']:>6.2f}",
                flush=True,
            )
    forward_errors = [abs(row["error_percent"]) for row in forward_rows if "error_percent" in row]
    if forward_errors:
        summary["forward_only"] = {
            "cases": len(forward_rows),
            "median_abs_error_percent": statistics.median(forward_errors),
            "max_abs_error_percent": max(forward_errors),
            "exact_cases": sum(error == 0 for error in forward_errors),
        }
        print(
            f"\n{len(forward_rows)} forward-only cases: median |error| "
            f"{summary['forward_only']['median_abs_error_percent']:.3f}%, "
            f"max {summary['forward_only']['max_abs_error_percent']:.3f}%, {summary['forward_only']['exact_cases']} "
            "exact to the byte"
        )
    llama = [] if args.skip_7b else time_llama_7b()
    for row in llama:
        parts = ", ".join(f"{key} {format_bytes(value)}" for key, value in row["breakdown"].items())
        print(
            f"{row['case']}: planned in {row['seconds']:.1f} s, peak {format_bytes(row['peak_bytes'])} ({parts}); "
            f"{row['tflops_per_step']:.1f} TFLOP per step; process grew {format_bytes(row['process_growth_bytes'])}"
        )
    distributed = distributed_rows() if args.distributed else []
    if distributed:
        print(f"\n{'strategy':<9} {'rank':>4} {'estimated':>11} {'measured':>11} {'error':>8}   one device (estimate)")
    for row in distributed:
        print(
            f"{row['strategy']:<9} {row['rank']:>4} {format_bytes(row['estimated_bytes']):>11} "
            f"{format_bytes(row['measured_bytes']):>11} {row['error_percent']:>7.2f}%   "
            f"{format_bytes(row['one_device_bytes'])}"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {"rows": rows, "forward_rows": forward_rows, "summary": summary, "llama_7b": llama}, handle, indent=2
            )
            json.dump(
                {"rows": rows, "summary": summary, "llama_7b": llama, "distributed": distributed}, handle, indent=2
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
