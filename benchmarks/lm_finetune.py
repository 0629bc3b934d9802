"""Full fine-tuning vs LoRA vs LoRA on an int8 base, for the same causal LM: tokens/s and peak
memory measured here, each beside its plan.

Each variant is ``recipes/lora-causal-lm.yaml`` with overrides, planned and measured by
``tightfit.plan.run_plan.plan_run(measure=True)``: the estimate on fake tensors, then real
training steps of the same configuration on this machine (warm-up, 3 timed steps, a tracked step
for the peak). Tokens/s counts every position of the micro-batch (``batch x max_length``).

    python benchmarks/lm_finetune.py                                   # the tiny Llama of the recipe
    python benchmarks/lm_finetune.py --model hf:packaged:llama-134m --max-length 256 --batch 1
"""

import argparse
import json

from tightfit.config import load_config
from tightfit.plan.run_plan import plan_run

VARIANTS = {
    "full fine-tuning": ["lora=null"],
    "LoRA": ["lora.quantize_base=null"],
    "LoRA, int8 base": ["lora.quantize_base=int8"],
}


def measure(model: str, max_length: int, batch: int, checkpointing: bool) -> list[dict]:
    rows = []
    for name, overrides in VARIANTS.items():
        settings = [
            f"model={model}",
            f"data.max_length={max_length}",
            f"batch.micro_batch_size={batch}",
            f"checkpointing={'auto' if checkpointing else 'false'}",
            *overrides,
        ]
        result = plan_run(load_config("recipes/lora-causal-lm.yaml", settings), device="cpu", measure=True)
        measured = result.measured
        tokens = batch * max_length
        rows.append(
            {
                "variant": name,
                "trainable_parameters": result.trainable_parameters,
                "planned_peak_bytes": result.peak_bytes,
                "measured_peak_bytes": measured["peak_bytes"],
                "peak_error": round(result.peak_bytes / measured["peak_bytes"] - 1, 4),
                "planned_tokens_per_s": round(tokens / result.step_time_s, 1) if result.step_time_s else None,
                "measured_tokens_per_s": round(tokens / measured["micro_step_time_s"], 1),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="hf:packaged:tiny-llama")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--output", help="also write the rows as JSON here")
    args = parser.parse_args()
    rows = measure(args.model, args.max_length, args.batch, args.checkpointing)
    print(f"{args.model}, {args.batch} x {args.max_length} tokens, CPU, fp32")
    print(
        f"{'variant':<18} {'trainable':>12} {'peak plan':>11} {'peak meas.':>11} {'error':>7} {'tok/s plan':>11} "
        f"{'tok/s meas.':>12}"
    )
    for row in rows:
        print(
            f"{row['variant']:<18} {row['trainable_parameters']:>12,} {row['planned_peak_bytes'] / 2**20:>9.1f}Mi "
            f"{row['measured_peak_bytes'] / 2**20:>9.1f}Mi {100 * row['peak_error']:>6.1f}% "
            f"{row['planned_tokens_per_s'] or float('nan'):>11.0f} {row['measured_tokens_per_s']:>12.0f}"
        )
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(
                {"model": args.model, "max_length": args.max_length, "batch": args.batch, "rows": rows},
                handle,
                indent=2,
            )


if __name__ == "__main__":
    main()
