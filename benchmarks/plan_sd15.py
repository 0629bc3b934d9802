"""Stable Diffusion 1.5 LoRA at 512x512: will seed-003's configuration fit, and where?

Plans the real SD 1.5 UNet (859.5M parameters, from the shipped architecture config
``src/tightfit/configs/sd15-unet``, on the meta device) with rank-8 LoRA on its attention
(to_q/to_k/to_v/to_out.0), at 512x512: latents 4x64x64 and a 77x768 CLIP text context per sample.
The frozen VAE and text encoder are not in the step (precompute latents, or add their frozen
weights: 84M + 123M parameters, 0.4 GiB in fp16 with cpu_offload off).

Each row is one ``tightfit plan`` check (the command is printed with it)::

    tightfit plan --model diffusion:packaged:sd15-unet \\
        --input latents=4x64x64,encoder_hidden_states=77x768 \\
        --lora-rank 8 --batch-size 2 --precision fp16 --checkpointing --device m2-max-32gb

    python benchmarks/plan_sd15.py --output benchmarks/results/plan_sd15.json
"""

import argparse
import json
import sys
from pathlib import Path

MODEL = "diffusion:packaged:sd15-unet"
INPUT = "latents=4x64x64,encoder_hidden_states=77x768"
SETTINGS = (  # (precision, checkpointing, micro-batch): seed-003's, then without checkpointing, then a bf16 base
    ("fp16", True, 2),
    ("fp16", False, 2),
    ("bf16-pure", True, 2),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", default="m2-max-32gb,rtx3050-laptop-6gb")
    parser.add_argument("--output", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)

    from tightfit.hardware.profiles import get_profile
    from tightfit.plan.planner import plan

    repo = Path(__file__).resolve().parents[1]
    rows = []
    print(
        "| device | precision | checkpointing | micro-batch | peak GiB | usable GiB | verdict | params / grads / "
        "optim / activations / overhead GiB | est. step s |"
    )
    print("|---|---|---|---:|---:|---:|---|---|---:|")
    for device in args.devices.split(","):
        for precision, checkpointing, batch_size in SETTINGS:
            result = plan(
                f"diffusion:{repo / 'src' / 'tightfit' / 'configs' / 'sd15-unet'}",
                INPUT,
                batch_size=batch_size,
                precision=precision,
                checkpointing=checkpointing,
                lora_rank=8,
                profile=get_profile(device),
            ).to_dict()
            row = {
                "device": device,
                "precision": precision,
                "checkpointing": checkpointing,
                "batch_size": batch_size,
                "command": f"tightfit plan --model {MODEL} --input {INPUT} --lora-rank 8 --batch-size {batch_size} "
                f"--precision {precision} --{'' if checkpointing else 'no-'}checkpointing --device {device}",
                **{
                    key: result[key]
                    for key in (
                        "peak_bytes",
                        "breakdown",
                        "budget_bytes",
                        "verdict",
                        "why",
                        "step_time_s",
                        "trainable_parameters",
                        "parameters",
                    )
                },
            }
            rows.append(row)
            parts = " / ".join(
                f"{row['breakdown'][key] / 2**30:.2f}"
                for key in ("parameters", "gradients", "optimizer", "activations", "overhead")
            )
            step = f"{row['step_time_s']:.2f}" if row["step_time_s"] else "-"
            print(
                f"| {device} | {precision} | {'on' if checkpointing else 'off'} | {batch_size} | "
                f"{row['peak_bytes'] / 2**30:.2f} | "
                f"{row['budget_bytes'] / 2**30:.2f} | {row['verdict']} | {parts} | {step} |",
                flush=True,
            )
            if args.output:
                args.output.parent.mkdir(parents=True, exist_ok=True)
                args.output.write_text(json.dumps(rows, indent=2) + "\n")
    print(
        f"\n{rows[0]['parameters']:,} parameters, {rows[0]['trainable_parameters']:,} trainable (LoRA r=8)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
