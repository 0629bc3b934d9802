"""Batch-size search: tightfit's predict-then-confirm vs doubling-until-OOM vs power+binsearch.

Every method runs real training steps (a warm-up and a measured step per trial, as tightfit's
trials do) under the memory tracker's simulated budget on CPU, and a trial "fits" when the step
ran and its peak is within the budget less the 10 % margin — the same rule for all three:

* ``tightfit``: :func:`tightfit.plan.search.find_batch_size` — estimate on fake tensors, confirm
  with real steps, bisect what remains.
* ``doubling``: seed-000's recipe — 2, 4, 8, ... until a step fails; keep the last that fit.
* ``power+binsearch``: Lightning's ``BatchSizeFinder(mode="binsearch")`` — double from 2 until a
  failure, then bisect between the last fit and the failure. Exact under monotonic memory, so it
  is the reference maximum here.

Columns: the batch found, the real trial steps, the wall time (estimates included for tightfit),
and the distance to the maximum.

Run:
    .venv/bin/python benchmarks/batch_size_search.py [--json results.json] [--only resnet18,tiny-gpt]
"""

import argparse
import copy
import json
import statistics
import sys
import time

import torch
from torch import nn

from tightfit.memory.measure import measure_step
from tightfit.plan.search import find_batch_size
from tightfit.units import format_bytes

MARGIN = 0.1


def images(channels, size, classes=10):
    def factory(batch_size, device):
        return (
            torch.randn(batch_size, channels, size, size, device=device),
            torch.randint(0, classes, (batch_size,), device=device),
        )

    return factory


def tokens(length, vocab):
    def factory(batch_size, device):
        ids = torch.randint(0, vocab, (batch_size, length), device=device)
        return {"input_ids": ids, "labels": ids}

    return factory


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 512), nn.ReLU(), nn.Linear(512, 10))


def small_cnn():
    from tightfit.models.builtin import SmallCNN

    return SmallCNN(num_classes=10, in_channels=3)


def resnet18():
    import torchvision

    return torchvision.models.resnet18(weights=None, num_classes=10)


def tiny_gpt():
    from tightfit.models.builtin import TinyGPT

    return TinyGPT(vocab_size=2048, max_length=128, dim=128, depth=2, heads=4)


CASES = [
    # name, model, batch factory, optimizer, budgets
    ("mlp 3x32x32", mlp, images(3, 32), "adamw", [40 * 2**20, 64 * 2**20]),
    ("small-cnn 3x32x32", small_cnn, images(3, 32), "adamw", [64 * 2**20, 256 * 2**20]),
    ("resnet18 3x32x32", resnet18, images(3, 32), "sgd-momentum", [192 * 2**20, 512 * 2**20]),
    ("tiny-gpt tokens:128", tiny_gpt, tokens(128, 2048), "adamw", [64 * 2**20, 160 * 2**20]),
]


class Trial:
    """One real step (after a warm-up) on a fresh copy of the model, under the simulated budget."""

    def __init__(self, model, batch_factory, optimizer, budget_bytes):
        self.model, self.batch_factory, self.optimizer = model, batch_factory, optimizer
        self.budget_bytes, self.target_bytes = budget_bytes, int(budget_bytes * (1 - MARGIN))
        self.count = 0

    def __call__(self, batch_size: int) -> bool:
        self.count += 1
        try:
            peak = measure_step(
                copy.deepcopy(self.model),
                self.batch_factory,
                batch_size=batch_size,
                device="cpu",
                optimizer=self.optimizer,
                budget_bytes=self.budget_bytes,
            ).peak_bytes
        except torch.OutOfMemoryError:
            return False
        return peak <= self.target_bytes


def doubling(trial, limit=4096) -> int:
    """seed-000: double until a step fails; the last that fit. From 2: batch norm refuses 1 sample."""
    batch_size, found = 2, 0
    while batch_size <= limit and trial(batch_size):
        found, batch_size = batch_size, batch_size * 2
    return found


def power_binsearch(trial, limit=4096) -> int:
    """Lightning's binsearch mode: double from 2 until failure, then bisect."""
    low, high = 0, None
    batch_size = 2
    while batch_size <= limit:
        if trial(batch_size):
            low, batch_size = batch_size, batch_size * 2
        else:
            high = batch_size
            break
    if high is None:
        return low
    if low == 0:
        return 1 if trial(1) else 0
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if trial(middle) else (low, middle)
    return low


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", metavar="PATH", help="also write the rows to this JSON file")
    parser.add_argument("--only", metavar="NAMES", help="comma-separated model names (the first word of a row)")
    args = parser.parse_args(argv)
    wanted = set(args.only.split(",")) if args.only else None
    rows = []
    header = f"{'model':<20} {'budget':>10} {'method':<16} {'batch':>6} {'trials':>6} {'seconds':>8} {'vs max':>8}"
    print(header)
    for name, model_factory, batch_factory, optimizer, budgets in CASES:
        if wanted and name.split()[0] not in wanted:
            continue
        for budget in budgets:
            torch.manual_seed(0)
            model = model_factory()
            results = {}
            started = time.perf_counter()
            found = find_batch_size(
                model, batch_factory, budget_bytes=budget, device="cpu", optimizer=optimizer, margin=MARGIN
            )
            results["tightfit"] = (found.batch_size, len(found.trials), time.perf_counter() - started)
            for method, search in (("doubling", doubling), ("power+binsearch", power_binsearch)):
                trial = Trial(model, batch_factory, optimizer, budget)
                started = time.perf_counter()
                batch_size = search(trial)
                results[method] = (batch_size, trial.count, time.perf_counter() - started)
            maximum = results["power+binsearch"][0]
            for method, (batch_size, trials, seconds) in results.items():
                gap = 100 * (batch_size - maximum) / maximum if maximum else 0.0
                rows.append(
                    {
                        "model": name,
                        "budget_bytes": budget,
                        "method": method,
                        "batch_size": batch_size,
                        "trials": trials,
                        "seconds": seconds,
                        "percent_of_max": 100 + gap,
                        "predicted_batch_size": found.predicted_batch_size if method == "tightfit" else None,
                    }
                )
                print(
                    f"{name:<20} {format_bytes(budget):>10} {method:<16} {batch_size:>6} {trials:>6} {seconds:>8.2f} "
                    f"{gap:>+7.1f}%",
                    flush=True,
                )
    print()
    for method in ("tightfit", "doubling", "power+binsearch"):
        mine = [row for row in rows if row["method"] == method]
        print(
            f"{method:<16} median trials {statistics.median(r['trials'] for r in mine):>4}, "
            f"median time {statistics.median(r['seconds'] for r in mine):6.2f} s, "
            f"worst distance to the maximum {min(r['percent_of_max'] for r in mine) - 100:+.1f}%"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
