"""NF4 backends on this machine: step time, tensor peak and loss after N steps of the same LoRA run.

The run is stage 2 of the shipped causal-LM example (recipes/lora-causal-lm.yaml: the tiny Llama
trained by stage 1, rank-8 adapters on every projection, the pirate corpus), trained by the real
trainer for ``--steps`` steps with each frozen base:

* ``fp32``/``bf16`` base: no quantization (``bf16`` is ``precision: bf16-pure``, the whole model
  in bf16, as a bf16 checkpoint would be loaded);
* ``int8``: torchao weight-only;
* ``nf4 bitsandbytes`` and ``nf4 torchao``: QLoRA's NF4 with double quantization, matmul in fp32
  (``precision: fp32``) and, for each, in bf16 autocast (``precision: bf16``).

Step time is the median wall time of a step after the first five; the tensor peak is the memory
tracker's count of one steady-state step (``tightfit.memory.measure.measure_step``), the same
count ``tightfit plan`` estimates. Needs stage 1's run:

    tightfit train recipes/causal-lm-base.yaml --run-dir runs/tiny-llama-base
    OMP_NUM_THREADS=1 python benchmarks/nf4_backends.py --steps 100        # the table in docs/lora.md
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "lora-causal-lm.yaml"

VARIANTS = {
    "fp32 base": ["lora.quantize_base=null", "precision=fp32"],
    "bf16 base (bf16-pure)": ["lora.quantize_base=null", "precision=bf16-pure"],
    "int8 torchao": ["lora.quantize_base=int8", "precision=fp32"],
    "nf4 bitsandbytes fp32": ["lora.quantize_base=nf4", "lora.quant_backend=bitsandbytes", "precision=fp32"],
    "nf4 torchao fp32": ["lora.quantize_base=nf4", "lora.quant_backend=torchao", "precision=fp32"],
    "nf4 bitsandbytes bf16": ["lora.quantize_base=nf4", "lora.quant_backend=bitsandbytes", "precision=bf16"],
    "nf4 torchao bf16": ["lora.quantize_base=nf4", "lora.quant_backend=torchao", "precision=bf16"],
}


class StepClock:
    """Wall time between step ends and the loss of each step."""

    def __init__(self):
        self.times, self.losses, self.last = [], [], None

    def on_fit_start(self, trainer):
        self.last = time.perf_counter()

    def on_step_end(self, trainer, metrics):
        now = time.perf_counter()
        self.times.append(now - self.last)
        self.last = now
        self.losses.append(metrics["train_loss"])


def run(name: str, overrides: list[str], steps: int, base_run: Path, workdir: Path) -> dict:
    from tightfit.config import load_config
    from tightfit.memory.measure import measure_step
    from tightfit.models.spec import make_batch_factory, parse_input_spec
    from tightfit.training.trainer import Trainer

    config = load_config(
        str(RECIPE),
        overrides
        + [
            f"init_weights={base_run}",
            f"max_steps={steps}",
            "epochs=1000",
            f"run_dir={workdir / name.replace(' ', '_')}",
            "checkpoint.every_n_steps=null",
            "logging.progress=false",
            "logging.console=false",
            "logging.tensorboard=false",
            "monitor.enabled=false",
            "device=cpu",
        ],
    )
    clock = StepClock()
    trainer = Trainer(config, callbacks=[clock])
    trainer.fit()
    window = clock.losses[-10:]
    model = trainer.model
    factory = make_batch_factory(parse_input_spec(f"tokens:{config.data.max_length}"), model)
    memory = measure_step(
        model, factory, batch_size=config.batch.micro_batch_size, precision=trainer.precision, device="cpu"
    )
    return {
        "variant": name,
        "step_ms": round(1000 * statistics.median(clock.times[5:]), 1),
        "tensor_peak_mib": round(memory.peak_bytes / 2**20, 2),
        "parameters_mib": round(memory.breakdown["parameters"] / 2**20, 2),
        "loss_first": round(clock.losses[0], 3),
        "loss_last10": round(statistics.mean(window), 3),
        "steps": len(clock.losses),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--base-run", type=Path, default=REPO / "runs" / "tiny-llama-base")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names from the table")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if not args.base_run.is_dir():
        print(f"{args.base_run}: train stage 1 first (see this script's docstring)", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory(prefix="tightfit-nf4-") as tmp:
        for name in args.variants.split(","):
            rows.append(run(name, VARIANTS[name], args.steps, args.base_run, Path(tmp)))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(
        f"| base ({args.steps} steps, micro-batch 8, 128 tokens) | step (ms) | tensor peak (MiB) "
        "| of which weights (MiB) | loss, step 1 | loss, mean of last 10 |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['variant']} | {row['step_ms']} | {row['tensor_peak_mib']} | {row['parameters_mib']} "
            f"| {row['loss_first']} | {row['loss_last10']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
