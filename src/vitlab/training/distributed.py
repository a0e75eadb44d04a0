"""torch.distributed set-up for ``torchrun`` and the sampler that shards global batches."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


@dataclass
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group that ``torchrun`` describes (gloo on CPU, nccl on CUDA).

    Returns a single-process :class:`DistInfo` when not launched by torchrun.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local)


class GlobalBatchSampler(Sampler[list[int]]):
    """Shuffled global batches, each split evenly across ranks.

    Every epoch draws one permutation from ``seed + epoch``; global batch k is
    ``perm[k * G:(k + 1) * G]`` and rank r takes its r-th slice, so N ranks with local batch
    B see exactly the samples of a single process with batch N * B. The last incomplete
    global batch is dropped when running on several ranks (every rank must step together).

    Args:
        size: Dataset length.
        batch_size: Per-rank batch size.
        rank, world_size: This rank and the number of ranks.
        seed: Base seed of the shuffling.
        shuffle: Shuffle (training) or keep order (evaluation).
        drop_last: Drop an incomplete last batch (forced on with several ranks).
    """

    def __init__(self, size: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = False) -> None:
        if size < batch_size * world_size and (drop_last or world_size > 1):
            raise ValueError(f"dataset of {size} samples is smaller than one global batch ({batch_size} x {world_size})")
        self.size, self.batch_size, self.rank, self.world = size, batch_size, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.drop_last = drop_last or world_size > 1
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        g = self.batch_size * self.world
        return self.size // g if self.drop_last else -(-self.size // g)

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=gen).tolist()
        else:
            order = list(range(self.size))
        g = self.batch_size * self.world
        for k in range(len(self)):
            batch = order[k * g : (k + 1) * g]
            part = batch[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
            if part:
                yield part


def all_reduce_mean(value: float, info: DistInfo) -> float:
    """Mean of a scalar over ranks (identity when single-process)."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item() / info.world_size)
