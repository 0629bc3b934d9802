"""The order in which the trainer reads its data: seeded per epoch, shardable, resumable mid-epoch.

``torch.utils.data.RandomSampler`` draws its order from the global RNG and cannot start in the
middle of an epoch, and ``DistributedSampler`` cannot either. This sampler makes the order a pure
function of ``(seed, epoch)``, shards it across ranks exactly like ``DistributedSampler`` (pad by
repeating the first indices so every rank gets the same count, then take every
``world_size``-th index), and skips the samples already consumed when a run is resumed.
"""

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """Indices of one epoch for one rank, starting after ``start_index`` already-read samples.

    Args:
        length: number of samples in the dataset.
        seed: the run's seed; the order of epoch ``e`` is ``randperm(length, seed + e)``.
        shuffle: ``False`` keeps the dataset order (validation and test).
        rank: this process's rank.
        world_size: number of processes reading the dataset.
        pad: repeat indices so every rank reads as many samples (training, where ranks step
            together); evaluation passes ``False`` so no sample is counted twice.
    """

    def __init__(
        self, length: int, *, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1, pad: bool = True
    ):
        self.length = length
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_index = 0
        self.pad = pad

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        """Select the epoch's order and how many of this rank's samples were already read."""
        self.epoch = epoch
        self.start_index = start_index

    def epoch_indices(self) -> list[int]:
        """All of this rank's indices for the current epoch, in order."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.length, generator=generator).tolist()
        else:
            order = list(range(self.length))
        if self.pad:
            per_rank = -(-self.length // self.world_size)  # ceil
            order += order[: per_rank * self.world_size - self.length]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices()[self.start_index :])

    def __len__(self) -> int:
        per_rank = (
            -(-self.length // self.world_size) if self.pad else len(range(self.rank, self.length, self.world_size))
        )
        return per_rank - self.start_index
