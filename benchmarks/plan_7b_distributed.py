"""How many devices does full fine-tuning of the Llama-2-7B config need? Per-rank plans.

Full fine-tuning of the shipped ``src/tightfit/configs/llama-7b`` (6.74B parameters, bf16 weights,
gradients and AdamW state, activation checkpointing on every decoder layer, micro-batch 1 of 2048
tokens per rank), planned per rank with ``tightfit.plan.distributed`` for FSDP2 and DDP on
A100-40GB, H100-80GB and RTX 4090 24GB: the smallest count whose per-rank peak keeps the planner's
10 % headroom, with the estimated step time and tokens/s including communication.

    python benchmarks/plan_7b_distributed.py --output benchmarks/results/plan_7b_distributed.json --markdown

The same answer one row at a time:

    tightfit plan --model hf:packaged:llama-7b --input tokens:2048 --devices a100-40gb --strategy fsdp
"""

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = f"hf:{REPO / 'src' / 'tightfit' / 'configs' / 'llama-7b'}"
DEVICES = ("a100-40gb", "h100-80gb", "rtx4090-24gb")
STRATEGIES = ("fsdp", "ddp")


def rows() -> list[dict]:
    from tightfit.plan.distributed import plan_distributed

    found = []
    for device in DEVICES:
        for strategy in STRATEGIES:
            result = plan_distributed(MODEL, "tokens:2048", devices=device, strategy=strategy)
            last = result.rows[-1]
            found.append(
                {
                    "device": device,
                    "strategy": strategy,
                    "devices_needed": result.devices_needed,
                    "devices": last.devices,
                    "peak_bytes": last.peak_bytes,
                    "breakdown": last.breakdown,
                    "usable_bytes": last.usable_bytes,
                    "step_time_s": last.step_time_s,
                    "compute_s": last.compute_s,
                    "communication_s": last.communication_s,
                    "tokens_per_s": last.tokens_per_s,
                    "one_device_peak_bytes": result.single["peak_bytes"],
                }
            )
            print(
                f"{device} {strategy}: needed {result.devices_needed}, per-rank peak {last.peak_bytes / 2**30:.1f} GiB",
                flush=True,
            )
    return found


def markdown(table: list[dict]) -> str:
    lines = [
        "| device | strategy | devices needed | per-rank peak GiB (usable) | peak during | states / gathered / "
        "buffers GiB | est. step | tokens/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in table:
        parts = row["breakdown"]
        states = (parts["parameters"] + parts["gradients"] + parts["optimizer"]) / 2**30
        needed = (
            row["devices_needed"] if row["devices_needed"] is not None else f"none (at {row['devices']}: replicated)"
        )
        step = f"{row['step_time_s']:.2f} s" if row["step_time_s"] else "-"
        tokens = f"{row['tokens_per_s']:,.0f}" if row["tokens_per_s"] else "-"
        # a sharded rank without units in flight is at its peak in the optimizer's update
        sharded = row["strategy"] == "fsdp" and row["devices"] > 1
        phase = ("backward" if parts["units_in_flight"] else "update") if sharded else "one device's peak"
        lines.append(
            f"| {row['device']} | {row['strategy']} | {needed} | {row['peak_bytes'] / 2**30:.1f} "
            f"({row['usable_bytes'] / 2**30:.1f}) "
            f"| {phase} | {states:.1f} / {parts['units_in_flight'] / 2**30:.2f} / "
            f"{parts['communication'] / 2**30:.2f} | {step} | {tokens} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", metavar="JSON", help="write the rows here")
    parser.add_argument("--markdown", action="store_true", help="also write the table next to --output (.md)")
    args = parser.parse_args(argv)
    table = rows()
    print(markdown(table))
    if args.output:
        Path(args.output).write_text(json.dumps(table, indent=2) + "\n")
        if args.markdown:
            Path(args.output).with_suffix(".md").write_text(markdown(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
