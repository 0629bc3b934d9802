"""Data loading: what the preprocessing cache and per-batch padding buy.

    python benchmarks/data_loading.py [--images 400] [--source-size 256] [--image-size 64]

1. An image folder of random-noise PNGs (``--images`` files of ``--source-size`` pixels square,
   written to a temporary folder) read at ``--image-size``: samples/s without the cache, on the
   pass that fills the cache, and on a pass that reads it back; with 0 and 2 worker processes.
2. The packaged text set (``packaged:support-messages``) in batches of 16: tokens computed per
   epoch when each batch is padded to its longest sentence (tightfit's collate) versus to
   ``max_length`` (128).

Prints a table; numbers depend on the machine (disk, cores, load).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader

from tightfit.data import DataConfig, build_datasets, make_dataloader


def write_images(root: Path, count: int, side: int) -> None:
    rng = np.random.default_rng(0)
    for index in range(count):
        folder = root / f"class{index % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        # Smooth images compress like photos do; pure noise would make PNG decoding unrealistically slow.
        base = rng.integers(0, 256, (side // 16, side // 16, 3), dtype=np.uint8)
        Image.fromarray(base).resize((side, side), Image.Resampling.BICUBIC).save(folder / f"{index:05d}.png")


def samples_per_second(config: DataConfig) -> float:
    bundle = build_datasets(config)
    loader = make_dataloader(bundle.train, config, batch_size=32)
    start = time.perf_counter()
    count = sum(len(batch[1]) for batch in loader)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--source-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch) / "images"
        write_images(root, args.images, args.source_size)
        print(
            f"image folder: {args.images} PNGs of {args.source_size}x{args.source_size}, read at "
            f"{args.image_size}x{args.image_size}"
        )
        print(f"{'workers':>8} {'no cache':>12} {'cache fill':>12} {'cache hit':>12}  (samples/s)")
        for workers in (0, 2):
            base = dict(
                source="image-folder",
                path=str(root),
                image_size=args.image_size,
                val_fraction=0.0,
                test_fraction=0.0,
                num_workers=workers,
            )
            cache = DataConfig(**base, cache=str(Path(scratch) / f"cache{workers}"))
            plain = samples_per_second(DataConfig(**base))
            fill = samples_per_second(cache)
            hit = samples_per_second(cache)
            print(f"{workers:>8} {plain:>12.0f} {fill:>12.0f} {hit:>12.0f}")

    bundle = build_datasets({"source": "text-csv", "path": "packaged:support-messages"}, seed=0)
    padded_per_batch = sum(
        batch["input_ids"].numel() for batch in DataLoader(bundle.train, batch_size=16, collate_fn=bundle.collate_fn)
    )
    padded_to_max = len(bundle.train) * bundle.metadata["max_length"]
    real = int(sum(len(bundle.train[i]["input_ids"]) for i in range(len(bundle.train))))
    print("\ntext (packaged:support-messages, train split, batch 16)")
    print(f"{'padding':>22} {'tokens/epoch':>14}")
    print(f"{'none (real tokens)':>22} {real:>14}")
    print(f"{'per batch (tightfit)':>22} {padded_per_batch:>14}")
    print(f"{'to max_length 128':>22} {padded_to_max:>14}   ({padded_to_max / padded_per_batch:.1f}x per batch)")


if __name__ == "__main__":
    main()
