"""Streaming a shard set: :class:`ShardDataset` (an ``IterableDataset``) and :class:`ShardLoader`.

Every epoch the shard order is shuffled by ``(seed, epoch)``; rank ``r`` of ``R`` takes shards
``order[r::R]`` and DataLoader worker ``w`` of ``W`` takes that list's ``[w::W]``, so no two
(rank, worker) slots read the same shard. Each slot streams its shards through an in-memory
shuffle buffer (also seeded by ``(seed, epoch, slot)``). With ``samples_per_epoch`` the epoch
has a fixed length: every slot yields its quota, going round its shards again (in a new
seeded order) when they run out (resampling). So a slot's sample sequence depends only on
``(seed, epoch, rank, world_size, worker, num_workers)`` and a position in it is a count:
resuming skips that many raw samples (read, not decoded) and yields exactly the rest.

In-process iteration tracks the position itself; with DataLoader workers use
:class:`ShardLoader`, which learns each worker's position from the batches it delivers.
"""

from __future__ import annotations

import os
from typing import Any, BinaryIO, Callable, Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torch.utils.data._utils.collate import default_collate

from .shards import SampleDecoder, ShardError, _ShardMeta, read_manifest, read_members, tar_index

_Ref = tuple[int, str, dict[str, tuple[int, int]]]  # (shard, key, {ext: (offset, size)}): a sample not yet read


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ShardDataset(_ShardMeta, IterableDataset):
    """A shard set streamed: split across ranks and workers, resampled epochs, exact resume.

    Args:
        path: The shard folder (or its parent holding ``<split>/``).
        split: Which split folder to read, when there are several.
        samples_per_epoch: Global samples per epoch (each rank yields ``samples_per_epoch //
            world_size``, split over its workers); None: one pass over the shards (ranks then
            may get unequal counts).
        shuffle_buffer: Size of the in-memory shuffle buffer (0: no sample shuffling).
        shuffle: Shuffle the shard order and the samples (False: shards in order, no buffer).
        seed: Base seed of every shuffle.
        rank, world_size: This rank and the number of ranks; torch.distributed's (or 0 / 1)
            when left out.
        transform: Applied to each (C, H, W) image.
        return_key: Yield ``(name, item)``, ``name`` being ``"shard-000003.tar/00000412"`` (e.g. to check coverage).

    Raises:
        FileNotFoundError, ShardError: No usable shard set at ``path``.
    """

    def __init__(self, path: str | os.PathLike, split: str | None = None, samples_per_epoch: int | None = None,
                 shuffle_buffer: int = 512, shuffle: bool = True, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None, transform: Callable[[Tensor], Tensor] | None = None,
                 return_key: bool = False) -> None:
        folder, manifest = read_manifest(path, split)
        self._set_meta(folder, manifest)
        dr, dw = _dist_rank_world()
        self.rank = dr if rank is None else int(rank)
        self.world_size = dw if world_size is None else int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ShardError(f"rank must be in [0, world_size), got rank {self.rank} of {self.world_size}")
        if samples_per_epoch is not None and samples_per_epoch < self.world_size:
            raise ShardError(f"samples_per_epoch ({samples_per_epoch}) must be at least world_size ({self.world_size})")
        if shuffle_buffer < 0:
            raise ShardError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        self.samples_per_epoch = samples_per_epoch
        self.shuffle_buffer = shuffle_buffer if shuffle else 0
        self.shuffle, self.seed = shuffle, int(seed)
        self.decode = SampleDecoder(manifest, transform)
        self.return_key = return_key
        self.epoch = 0
        self.num_workers = 1  # the DataLoader's (1 for in-process iteration); set by ShardLoader
        self.positions: list[int] = [0]
        self._start: list[int] | None = None
        self._tagged = False

    # ---------------------------------------------------------------- the plan
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration streams (positions restart when it changes)."""
        if int(epoch) != self.epoch:
            self.epoch = int(epoch)
            self.positions = [0] * self.num_workers
            self._start = None

    def _rng(self, *keys: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, *keys])

    def shards_of(self, worker: int = 0, num_workers: int = 1) -> list[int]:
        """The shard indices (cycle 0) a worker of this rank reads this epoch."""
        n = len(self.shard_files)
        order = self._rng(0).permutation(n).tolist() if self.shuffle else list(range(n))
        mine = order[self.rank :: self.world_size][worker::num_workers]
        if not mine:
            raise ShardError(f"{self.folder} has {n} shard(s), fewer than {self.world_size} rank(s) x {num_workers} "
                             f"worker(s): write more, smaller shards (vitlab data shard --max-count)")
        return mine

    def quota(self, worker: int = 0, num_workers: int = 1) -> int:
        """How many samples a worker of this rank yields this epoch."""
        if self.samples_per_epoch is None:
            return sum(self.shard_counts[s] for s in self.shards_of(worker, num_workers))
        per_rank = self.samples_per_epoch // self.world_size
        return per_rank // num_workers + (worker < per_rank % num_workers)

    def __len__(self) -> int:
        """Samples this rank's next iteration yields (all its workers together; the rest, once resumed)."""
        start = self._start or [0] * self.num_workers
        return sum(self.quota(w, self.num_workers) - start[w] for w in range(self.num_workers))

    def _raw(self, worker: int, num_workers: int) -> Iterator[_Ref]:
        """References to the samples of the slot's shards (headers only), going round them again when resampling."""
        shards = self.shards_of(worker, num_workers)
        slot = self.rank * num_workers + worker
        cycle = 0
        while True:
            for s in shards:
                for key, members in tar_index(self.shard_files[s]):
                    yield s, key, members
            if self.samples_per_epoch is None:
                return
            cycle += 1
            if self.shuffle:
                shards = [shards[i] for i in self._rng(1, slot, cycle).permutation(len(shards))]

    def _shuffled(self, worker: int, num_workers: int) -> Iterator[_Ref]:
        """The slot's raw samples through the seeded shuffle buffer, cut at its quota."""
        n = self.quota(worker, num_workers)
        size = self.shuffle_buffer
        rng = self._rng(2, self.rank * num_workers + worker)
        buf: list[_Ref] = []
        out = 0
        for item in self._raw(worker, num_workers):
            if out >= n:
                return
            if len(buf) < size:
                buf.append(item)
                continue
            if size == 0:
                out += 1
                yield item
                continue
            j = int(rng.integers(size))
            yield buf[j]
            out += 1
            buf[j] = item
        for j in rng.permutation(len(buf)).tolist():
            if out >= n:
                return
            yield buf[j]
            out += 1

    # ---------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        if num_workers != self.num_workers:
            raise ShardError(f"this ShardDataset is set up for {self.num_workers} worker(s) but runs in "
                             f"{num_workers}: wrap it in ShardLoader(dataset, batch_size, num_workers)")
        start = self._start[worker] if self._start is not None else 0
        if info is None:  # in-process: positions are tracked here
            self._start = None
            self.positions[worker] = start
        return self._generate(worker, num_workers, start, self._tagged)

    def _generate(self, worker: int, num_workers: int, start: int, tagged: bool) -> Iterator[Any]:
        pos = 0
        handles: dict[int, BinaryIO] = {}  # the few shards the buffer is reading from, kept open
        try:
            for s, key, members in self._shuffled(worker, num_workers):
                pos += 1
                if pos <= start:  # resuming: skipped by reference, never read
                    continue
                if s not in handles:
                    if len(handles) >= 8:
                        handles.pop(next(iter(handles))).close()
                    handles[s] = open(self.shard_files[s], "rb")
                name = self.shard_files[s].name
                item = self.decode(key, read_members(handles[s], members), f"{name}:")
                if self.return_key:
                    item = (f"{name}/{key}", item)
                if tagged:
                    yield item, worker, pos
                else:
                    self.positions[worker] = pos
                    yield item
        finally:
            for f in handles.values():
                f.close()

    # ---------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        """This rank's position in the epoch: samples delivered per worker (plus the set-up to check)."""
        return {"epoch": self.epoch, "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "num_workers": self.num_workers, "samples_per_epoch": self.samples_per_epoch,
                "positions": list(self.positions)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: the next iteration yields exactly the rest of its epoch.

        Raises:
            ShardError: ``state`` was taken with other ranks, workers, seed or epoch length.
        """
        for k in ("seed", "rank", "world_size", "num_workers", "samples_per_epoch"):
            if state.get(k) != getattr(self, k):
                raise ShardError(f"cannot resume this shard stream: the saved {k} is {state.get(k)!r}, this one's is "
                                 f"{getattr(self, k)!r} (exact resume needs the same ranks, workers, seed and "
                                 f"samples_per_epoch)")
        self.epoch = int(state["epoch"])
        self.positions = [int(p) for p in state["positions"]]
        self._start = list(self.positions)

    def __repr__(self) -> str:
        return (f"ShardDataset({str(self.folder)!r}, shards={len(self.shard_files)}, rank={self.rank}/"
                f"{self.world_size}, samples_per_epoch={self.samples_per_epoch}, epoch={self.epoch})")


def _collate_tagged(batch: list[tuple[Any, int, int]]) -> tuple[Any, int, int]:
    """A batch of one worker's tagged samples -> (collated items, worker, position after the batch)."""
    return default_collate([b[0] for b in batch]), batch[-1][1], batch[-1][2]


class ShardLoader(DataLoader):
    """Batches of a :class:`ShardDataset` through DataLoader workers, with an exact ``state_dict``.

    Each batch comes from one worker; the loader records how far each worker's stream has been
    delivered, so :meth:`state_dict` taken between batches resumes exactly there (prefetched,
    undelivered batches are not counted). A ``DataLoader``, so the engine takes it as given
    (``Trainer(model, cfg, train_data=ShardLoader(...))``); its ``batch_sampler`` is the loader
    itself, whose ``set_epoch`` the engine calls every epoch.

    Args:
        dataset: The stream.
        batch_size: Samples per batch.
        num_workers: DataLoader worker processes (0: in-process).
        drop_last: Drop each worker's incomplete last batch (with a fixed-length epoch every
            rank then makes the same number of steps).
        pin_memory: Pin batches (CUDA).
    """

    def __init__(self, dataset: ShardDataset, batch_size: int, num_workers: int = 0, drop_last: bool = False,
                 pin_memory: bool = False) -> None:
        if batch_size < 1 or num_workers < 0:
            raise ShardError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size} and {num_workers}")
        super().__init__(dataset, batch_size=int(batch_size), num_workers=int(num_workers),
                         collate_fn=_collate_tagged, drop_last=drop_last, pin_memory=pin_memory)
        slots = max(1, self.num_workers)
        if dataset.num_workers != slots:
            dataset.num_workers = slots
            dataset.positions = [0] * slots
        for w in range(slots):
            dataset.shards_of(w, slots)  # fewer shards than slots: say so now

    @property
    def batch_sampler(self) -> "ShardLoader":
        """The loader itself: what the engine calls ``set_epoch`` on."""
        return self

    @batch_sampler.setter
    def batch_sampler(self, value: Any) -> None:  # DataLoader.__init__ assigns its own; not used here
        self._unused_batch_sampler = value

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration streams."""
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        ds, slots = self.dataset, max(1, self.num_workers)
        start = ds._start or [0] * slots  # what the next iteration yields: the rest of a resumed epoch
        left = [ds.quota(w, slots) - start[w] for w in range(slots)]
        per = [n // self.batch_size if self.drop_last else -(-n // self.batch_size) for n in left]
        return sum(per)

    def __iter__(self) -> Iterator[Any]:
        return self._batches()

    def _batches(self) -> Iterator[Any]:
        ds = self.dataset
        ds._tagged = True
        try:
            loader = DataLoader(ds, batch_size=self.batch_size, num_workers=self.num_workers,
                                collate_fn=_collate_tagged, drop_last=self.drop_last, pin_memory=self.pin_memory)
            it = iter(loader)  # workers take their copy of the dataset (start positions included) here
        finally:
            ds._tagged = False
        start = ds._start
        ds._start = None
        if start is not None:
            ds.positions = list(start)
        for batch, worker, pos in it:
            ds.positions[worker] = pos
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """The dataset's position (see :meth:`ShardDataset.state_dict`)."""
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume (see :meth:`ShardDataset.load_state_dict`)."""
        self.dataset.load_state_dict(state)


__all__ = ["ShardDataset", "ShardLoader"]
