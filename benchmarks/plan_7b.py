"""The 7B question: which fine-tuning of a Llama-2-7B-style decoder fits on which device?

seed-001 promises "fine-tune models up to 7B parameters on an M1 16 GB with LoRA and QLoRA". This
plans it with tightfit's planner, on the meta device (no weights are allocated), for the shipped
config ``src/tightfit/configs/llama-7b`` (6.74B parameters):

* full fine-tuning: every weight trains, bf16 weights/gradients/AdamW state (``bf16-pure``);
* LoRA: rank-16 adapters on q/k/v/o of every layer (``target_modules: auto``), bf16 base;
* QLoRA: the same adapters on an NF4 base (bitsandbytes or torchao, CUDA, MPS and CPU): the LoRA estimate with the
  base Linear weights at their 4-bit size (``tightfit.models.qlora.with_quantized_base``);
* LoRA on an int8 base (torchao weight-only).

Every row: micro-batch 1, activation checkpointing on every decoder layer, sequence length 512 or
2048, against ``m1-16gb``, ``rtx3050-laptop-6gb`` and ``a100-40gb``. "fits" keeps the planner's
10 % headroom; "tight" fits only without it.

    python benchmarks/plan_7b.py --output benchmarks/results/plan_7b.json --markdown
    python benchmarks/plan_7b.py --reuse benchmarks/results/plan_7b.json --markdown   # re-derive, no estimates
"""

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = f"hf:{REPO / 'src' / 'tightfit' / 'configs' / 'llama-7b'}"
DEVICES = ("m1-16gb", "rtx3050-laptop-6gb", "a100-40gb")
LORA_RANK = 16
MARGIN = 0.1


def verdict(peak_bytes: int, budget_bytes: int, margin: float = MARGIN) -> str:
    if peak_bytes <= budget_bytes * (1 - margin):
        return "fits"
    return "tight" if peak_bytes <= budget_bytes else "does not fit"


def gib(n: int) -> str:
    return f"{n / 2**30:.1f}"


def plan_rows(sequence_length: int, device: str, base_model, reuse: dict) -> list[dict]:
    from tightfit.errors import TightfitError
    from tightfit.hardware.profiles import get_profile
    from tightfit.memory.overhead import device_overhead
    from tightfit.models.qlora import with_quantized_base
    from tightfit.plan.planner import plan

    profile = get_profile(device)
    rows = []
    lora_result = None
    for method, lora_rank in (("full fine-tuning", None), (f"LoRA r={LORA_RANK}, bf16 base", LORA_RANK)):
        earlier = reuse.get((method, sequence_length, device))
        if earlier is not None and "breakdown" in earlier:  # --reuse: a planner row already computed
            rows.append(earlier)
            lora_result = earlier if lora_rank is not None else lora_result
            continue
        started = time.perf_counter()
        try:
            result = plan(
                MODEL,
                f"tokens:{sequence_length}",
                batch_size=1,
                precision="bf16-pure",
                checkpointing=True,
                optimizer="adamw",
                lora_rank=lora_rank,
                profile=profile,
                margin=MARGIN,
            ).to_dict()
        except TightfitError as error:
            rows.append({"method": method, "sequence_length": sequence_length, "device": device, "error": str(error)})
            continue
        rows.append(
            {
                "method": method,
                "sequence_length": sequence_length,
                "device": device,
                "peak_bytes": result["peak_bytes"],
                "breakdown": result["breakdown"],
                "budget_bytes": result["budget_bytes"],
                "verdict": result["verdict"],
                "why": result["why"],
                "trainable_parameters": result["trainable_parameters"],
                "parameters": result["parameters"],
                "step_time_s": result["step_time_s"],
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
        if lora_rank is not None:
            lora_result = result
    if lora_result is None:
        return rows
    for quantize_base, label in (("nf4", "QLoRA r=16, NF4 base"), ("int8", "LoRA r=16, int8 base")):
        breakdown, notes = with_quantized_base(
            lora_result["breakdown"],
            base_model,
            quantize_base,
            overhead=lambda peak: device_overhead(profile, tensor_peak_bytes=peak).total_bytes,
        )
        peak = sum(breakdown.values())
        row = {
            "method": label,
            "sequence_length": sequence_length,
            "device": device,
            "peak_bytes": peak,
            "breakdown": breakdown,
            "budget_bytes": lora_result["budget_bytes"],
            "verdict": verdict(peak, lora_result["budget_bytes"]),
            "trainable_parameters": lora_result["trainable_parameters"],
            "notes": notes,
        }
        largest = max((key for key in breakdown if key != "overhead"), key=breakdown.get)
        row["why"] = (
            f"peak {gib(peak)} GiB vs {gib(row['budget_bytes'])} GiB usable; largest part {largest} "
            f"({gib(breakdown[largest])} GiB)"
        )
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| method | seq | device | peak GiB | usable GiB | verdict | params / grads / optim / activations / overhead "
        "GiB |",
        "|---|---:|---|---:|---:|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(
                f"| {row['method']} | {row['sequence_length']} | {row['device']} | | | error | {row['error']} |"
            )
            continue
        parts = " / ".join(
            gib(row["breakdown"][key]) for key in ("parameters", "gradients", "optimizer", "activations", "overhead")
        )
        lines.append(
            f"| {row['method']} | {row['sequence_length']} | {row['device']} | {gib(row['peak_bytes'])} | "
            f"{gib(row['budget_bytes'])} | {row['verdict']} | {parts} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sequence-lengths", default="512,2048")
    parser.add_argument("--devices", default=",".join(DEVICES))
    parser.add_argument("--output", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table (for docs/lora.md)")
    parser.add_argument("--reuse", type=Path, help="a JSON of an earlier run: its planner rows are not estimated again")
    args = parser.parse_args(argv)
    reuse = {}
    if args.reuse and args.reuse.is_file():
        reuse = {
            (row["method"], row["sequence_length"], row["device"]): row for row in json.loads(args.reuse.read_text())
        }

    from tightfit.models.spec import build_model

    base_model = build_model(MODEL, meta=True)
    print(
        f"{sum(p.numel() for p in base_model.parameters()):,} parameters (meta device, nothing allocated)",
        file=sys.stderr,
    )
    rows = []
    for sequence_length in [int(value) for value in args.sequence_lengths.split(",")]:
        for device in args.devices.split(","):
            new_rows = plan_rows(sequence_length, device, base_model, reuse)
            rows.extend(new_rows)
            for row in new_rows:
                status = row.get("verdict", "error")
                print(
                    f"  {row['method']:<26} {sequence_length:>5} {device:<20} "
                    f"{gib(row['peak_bytes']) if 'peak_bytes' in row else '-':>6} GiB  {status}",
                    file=sys.stderr,
                )
            if args.output:  # keep what is done so far
                args.output.parent.mkdir(parents=True, exist_ok=True)
                args.output.write_text(json.dumps(rows, indent=2) + "\n")
    print(markdown(rows) if args.markdown else json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
