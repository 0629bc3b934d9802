"""DDP throughput: gradients all-reduced during backward (DistributedDataParallel) against averaged
after the micro-batches, on 2 gloo CPU ranks (docs/distributed.md).

    python benchmarks/ddp_throughput.py --repeats 3 --steps 12

Each launch is a real ``Trainer`` run under torchrun (one thread per rank); the modes alternate,
launch by launch, so a machine's load falls on both alike. Samples/s count every rank's samples
from the end of step 2 to the end of the last step (the first steps build DDP's buckets).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

WIDTH, DEPTH, MICRO_BATCH, ACCUMULATION = 1024, 4, 32, 2


def worker(output: str, gradient_sync: str, steps: int) -> None:
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    from tightfit.training.trainer import Trainer

    class Clock:
        def __init__(self):
            self.times = []

        def on_step_end(self, trainer, metrics):
            self.times.append(time.perf_counter())

    torch.manual_seed(0)
    layers = [nn.Linear(256, WIDTH)]
    for _ in range(DEPTH):
        layers += [nn.BatchNorm1d(WIDTH), nn.GELU(), nn.Linear(WIDTH, WIDTH)]
    model = nn.Sequential(*layers, nn.Linear(WIDTH, 10))
    samples = MICRO_BATCH * ACCUMULATION * 2 * steps
    inputs = torch.randn(samples, 256)
    data = TensorDataset(inputs, torch.randint(0, 10, (samples,)))
    clock = Clock()
    config = {
        "run_dir": f"{output}.run",
        "epochs": 1,
        "device": "cpu",
        "threads": 1,
        "batch": {"micro_batch_size": MICRO_BATCH, "accumulation_steps": ACCUMULATION},
        "distributed": {"gradient_sync": gradient_sync},
        "optimizer": {"name": "adamw"},
        "schedule": {"name": "constant"},
        "monitor": {"enabled": False},
        "logging": {"console": False, "tensorboard": False, "jsonl": False, "report": False},
    }
    Trainer(config, model=model, datasets=(data, None, None), callbacks=[clock]).fit()
    if os.environ["RANK"] == "0":
        counted = (len(clock.times) - 2) * MICRO_BATCH * ACCUMULATION * 2
        with open(output, "w") as handle:
            rate = counted / (clock.times[-1] - clock.times[1])
            json.dump({"samples_per_s": rate, "parameters": sum(p.numel() for p in model.parameters())}, handle)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--worker", nargs=3, metavar=("OUTPUT", "SYNC", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker[0], args.worker[1], int(args.worker[2]))
        return 0
    results: dict[str, list[float]] = {"overlap": [], "after_accumulation": []}
    parameters = None
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(args.repeats):
            for gradient_sync, rates in results.items():
                output = os.path.join(folder, f"{gradient_sync}.{repeat}")
                command = [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--standalone",
                    "--nproc-per-node",
                    "2",
                    __file__,
                    "--worker",
                    output,
                    gradient_sync,
                    str(args.steps),
                ]
                subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
                with open(output) as handle:
                    row = json.load(handle)
                rates.append(row["samples_per_s"])
                parameters = row["parameters"]
    print(
        f"MLP {parameters:,} parameters ({parameters * 4 / 2**20:.1f} MiB of fp32 gradients), BatchNorm, AdamW, "
        f"micro-batch {MICRO_BATCH} x {ACCUMULATION} per rank, 2 gloo ranks, {args.repeats} interleaved launches"
    )
    print("| gradient_sync | samples/s (best) | samples/s (median) |")
    print("|---|---:|---:|")
    for gradient_sync, values in results.items():
        print(f"| {gradient_sync} | {max(values):,.0f} | {statistics.median(values):,.0f} |")
    ratio = max(results["overlap"]) / max(results["after_accumulation"])
    print(f"overlap / after_accumulation (best of each): {ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
