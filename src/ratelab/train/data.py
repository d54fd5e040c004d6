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

import numpy as np
import torch
from torch.utils.data import Sampler

from ratelab.core.seeding import derive_seed

__all__ = [
    "EvalShardSampler",
    "PoissonBatchSampler",
    "SeededItems",
    "ShardedBatchSampler",
    "ToPM1",
    "collate_or_none",
    "derive_seed",
    "epoch_permutation",
    "to_device",
]


def epoch_permutation(n: int, *, seed: int, epoch: int) -> torch.Tensor:
    """(n,) int64 permutation of ``range(n)`` for ``epoch``; a function of ``(n, seed, epoch)`` only."""
    g = torch.Generator().manual_seed(derive_seed(seed, epoch))
    return torch.randperm(n, generator=g)


class ShardedBatchSampler(Sampler[list[int]]):
    """Fixed-size batches of dataset indices for one epoch on one rank (drop_last: the ragged tail is never used).

    Args:
        n: dataset length.
        global_batch: ``B``, summed over ranks; must be divisible by ``world_size``.
        rank, world_size: this process's shard.
        seed, epoch: select the permutation (:func:`epoch_permutation`).
        start_step: skip the first ``start_step`` batches (resuming mid-epoch).
    """

    fixed_size = True

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
    """In-order batches of this rank's contiguous shard of ``range(n)``; every item is seen by exactly one rank.

    Every rank yields the SAME number of batches, ``ceil(ceil(n / world_size) / batch_size)``, with sizes as equal
    as possible (a rank's shard is split like ``numpy.array_split``): sharded models (FSDP) run a collective in
    every forward pass, so a rank with one batch more than the others would hang the job.
    """

    def __init__(self, n: int, *, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        self.start = rank * n // world_size
        self.stop = (rank + 1) * n // world_size
        largest = -(-n // world_size)
        self.num_batches = -(-largest // batch_size) if n else 0

    def __len__(self) -> int:
        return self.num_batches if self.stop > self.start else 0

    def __iter__(self) -> Iterator[list[int]]:
        m, k = self.stop - self.start, self.num_batches
        if m == 0:
            return
        k = min(k, m)  # only when the shard is shorter than the batch count (n < world_size * batches)
        q, r = divmod(m, k)
        i = self.start
        for b in range(k):
            size = q + (b < r)
            yield list(range(i, i + size))
            i += size


class PoissonBatchSampler(Sampler[list[int]]):
    """Poisson sampling: every example joins each batch independently with probability ``q`` (DP-SGD's sampler).

    Batches vary in size and can be empty. A batch is a pure function of ``(seed, epoch, step)``, so resumption
    needs no saved RNG state and N ranks draw the same global batch (each keeps its contiguous share of it).
    An "epoch" is ``round(1 / q)`` steps (every example is expected once) unless ``steps`` says otherwise.

    The draw is exact at any rate: the batch size m ~ Binomial(N, q), then a uniform m-subset without replacement
    (numpy's ``binomial`` and ``choice(replace=False)``, in float64), which is the same distribution as N
    independent Bernoulli(q) joins and costs O(m) instead of O(N) when q is small. (Comparing float32 uniforms
    with q, the earlier draw, joins with probability ``ceil(q 2^24) / 2^24``: at q = 128 / 233M that is 8.5% more
    than q, which the accountant does not know.)

    Args:
        n: dataset length.
        sample_rate: ``q`` in (0, 1]; ``global_batch / n`` gives the expected batch size ``global_batch``.
        rank, world_size: this process's share.
        seed, epoch: select the draws.
        start_step: skip the first ``start_step`` batches (resuming mid-epoch), without drawing them.
        steps: batches per epoch (default ``round(1 / q)``; TAN simulation keeps the full-batch run's epoch length
            while sampling at a smaller rate).
    """

    fixed_size = False

    def __init__(self, n: int, *, sample_rate: float, rank: int = 0, world_size: int = 1, seed: int = 0,
                 epoch: int = 0, start_step: int = 0, steps: int | None = None) -> None:
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if steps is not None and steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.n, self.q, self.rank, self.world_size = n, float(sample_rate), rank, world_size
        self.seed, self.epoch, self.start_step = seed, epoch, start_step
        self.steps = max(1, round(1.0 / self.q)) if steps is None else int(steps)
        if not 0 <= start_step <= self.steps:
            raise ValueError(f"start_step {start_step} outside [0, {self.steps}]")

    def __len__(self) -> int:
        return self.steps - self.start_step

    def global_batch(self, step: int) -> torch.Tensor:
        """The (m,) indices of the whole batch ``step`` of this epoch (before the split over ranks)."""
        rng = np.random.default_rng(derive_seed(self.seed, self.epoch, step, 0x9015))
        m = int(rng.binomial(self.n, self.q))
        idx = rng.choice(self.n, size=m, replace=False, shuffle=False)
        idx.sort()
        return torch.from_numpy(idx.astype(np.int64, copy=False))

    def __iter__(self) -> Iterator[list[int]]:
        for s in range(self.start_step, self.steps):
            idx = self.global_batch(s)
            m = len(idx)
            lo, hi = self.rank * m // self.world_size, (self.rank + 1) * m // self.world_size
            yield idx[lo:hi].tolist()


class SeededItems(torch.utils.data.Dataset):
    """A view of ``dataset`` whose item ``i`` is drawn under torch's global RNG seeded by ``(seed, epoch, i)``.

    Augmentations draw from torch's global RNG (:mod:`ratelab.data.common`); seeding it per item makes an item's
    augmentation independent of which process, worker or position in the batch loads it, so N data-parallel
    processes see exactly the augmentation one process sees, and so does any ``num_workers``. The caller's RNG
    stream is left untouched (``fork_rng``), so dropout and other training-time draws do not depend on data loading.
    """

    def __init__(self, dataset: Any, *, seed: int, epoch: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, int(seed), int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        # The CPU generator only: torch.manual_seed would also (lazily) seed CUDA and record a stack trace per call,
        # 50x the cost of the item itself on small datasets. The draws on the CPU stream are identical.
        gen = torch.default_generator
        saved = gen.get_state()
        gen.manual_seed(derive_seed(self.seed, self.epoch, int(index), 0xA06) % 2**63)
        try:
            return self.dataset[index]
        finally:
            gen.set_state(saved)


def collate_or_none(items: list[Any]) -> Any:
    """``default_collate`` that returns None for an empty batch (Poisson sampling can draw one)."""
    from torch.utils.data import default_collate

    return default_collate(items) if items else None


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


class ToPM1:
    """Dataset-normalized images back to [-1, 1], the range the VQ tokenizer and VAR work in.

    Built from a dataset with ``mean``/``std`` attributes (the library's image datasets); without them images are
    taken to be in [-1, 1] already and pass through unchanged.
    """

    def __init__(self, dataset: Any = None) -> None:
        mean, std = getattr(dataset, "mean", None), getattr(dataset, "std", None)
        if mean is None or std is None:
            self.mean = self.std = None
        else:
            self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
            self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def to(self, device: torch.device | str) -> ToPM1:
        if self.mean is not None:
            self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean is None:
            return x
        return (x * self.std.to(x.device) + self.mean.to(x.device)) * 2 - 1

