"""Data order for training and evaluation: reproducible, resumable, and the same for any number of ranks.

The order of epoch ``e`` is ``randperm(n)`` drawn from a generator seeded with ``derive_seed(seed, e)``; it depends
on nothing else (not on the global RNG, not on how many batches were drawn before), so a resumed run can rebuild
it and skip the batches it already consumed.

Sharding (deliberately not torch's ``DistributedSampler``, which interleaves samples across ranks): at step ``s``
every rank takes the same global slice ``perm[s*B:(s+1)*B]`` and keeps its contiguous part
``[r*B/W:(r+1)*B/W]``. The union over ranks is exactly the single-process batch, so with a mean loss per rank and
DDP's gradient averaging the update equals the single-process update for the same global batch ``B``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler

from ratelab.core.seeding import derive_seed

__all__ = ["EvalShardSampler", "ShardedBatchSampler", "derive_seed", "epoch_permutation", "to_device"]


def epoch_permutation(n: int, *, seed: int, epoch: int) -> torch.Tensor:
    """(n,) int64 permutation of ``range(n)`` for ``epoch``; a function of ``(n, seed, epoch)`` only."""
    g = torch.Generator().manual_seed(derive_seed(seed, epoch))
    return torch.randperm(n, generator=g)


class ShardedBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices for one epoch on one rank (drop_last: the ragged tail is never used).

    Args:
        n: dataset length.
        global_batch: ``B``, summed over ranks; must be divisible by ``world_size``.
        rank, world_size: this process's shard.
        seed, epoch: select the permutation (:func:`epoch_permutation`).
        start_step: skip the first ``start_step`` batches (resuming mid-epoch).
    """

    def __init__(
        self,
        n: int,
        *,
        global_batch: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        epoch: int = 0,
        start_step: int = 0,
    ) -> None:
        if global_batch % world_size:
            raise ValueError(f"batch_size: global batch {global_batch} is not divisible by world size {world_size}")
        self.n, self.global_batch, self.rank, self.world_size = n, global_batch, rank, world_size
        self.seed, self.epoch, self.start_step = seed, epoch, start_step
        self.steps = n // global_batch
        if not 0 <= start_step <= self.steps:
            raise ValueError(f"start_step {start_step} outside [0, {self.steps}]")

    def __len__(self) -> int:
        return self.steps - self.start_step

    def __iter__(self) -> Iterator[list[int]]:
        perm = epoch_permutation(self.n, seed=self.seed, epoch=self.epoch)
        local = self.global_batch // self.world_size
        for s in range(self.start_step, self.steps):
            batch = perm[s * self.global_batch : (s + 1) * self.global_batch]
            yield batch[self.rank * local : (self.rank + 1) * local].tolist()


class EvalShardSampler(Sampler[list[int]]):
    """In-order batches of this rank's contiguous shard of ``range(n)``; every item is seen by exactly one rank."""

    def __init__(self, n: int, *, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        self.start = rank * n // world_size
        self.stop = (rank + 1) * n // world_size
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-(self.stop - self.start) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        for i in range(self.start, self.stop, self.batch_size):
            yield list(range(i, min(i + self.batch_size, self.stop)))


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor inside nested tuples/lists/dicts to ``device``; other leaves are returned as they are."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [to_device(v, device) for v in batch]
        return type(batch)(moved) if not hasattr(batch, "_fields") else type(batch)(*moved)
    return batch


class DeviceLoader:
    """Wrap an iterable of batches so that each arrives on ``device``."""

    def __init__(self, loader: Any, device: torch.device) -> None:
        self.loader, self.device = loader, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            yield to_device(batch, self.device)
