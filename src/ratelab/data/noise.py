"""Label noise: seeded corruption of class labels, symmetric or class-conditional, and a relabelled dataset view.

Every function returns the new labels together with the mask of the labels that are now wrong, never modifies its
input, and draws from one seeded generator in a fixed order, so a seed fixes the result. Two ways of choosing the
corrupted samples:

* ``selection="exact"``: exactly ``round(rate * n)`` samples (per class for :func:`asymmetric_noise`), a prefix of
  one seeded permutation. For a fixed seed the samples corrupted at a smaller rate are a subset of those at a larger
  rate, and a sample gets the same new label at every rate (nested noise levels, as a learning-curve study needs);
* ``selection="bernoulli"``: each sample independently with probability ``rate`` (noise of a generative process,
  e.g. the demonstrations of :mod:`ratelab.data.fewshot`).

Symmetric noise sends a corrupted label to a uniformly drawn *other* class (``to="other"``: every corrupted label is
wrong) or redraws it from all classes (``to="any"``: the protocol of the official MCR² code, where about 1/K of the
redrawn labels land on the true class). Asymmetric noise moves class ``c`` to a fixed ``target[c]`` (pair flipping,
or hand-made confusions such as the CIFAR-10 truck -> automobile map).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch.utils.data import Dataset

__all__ = ["NoisyLabels", "RelabeledDataset", "asymmetric_noise", "next_class_target", "symmetric_noise"]

_SELECTIONS = ("exact", "bernoulli")


class NoisyLabels(NamedTuple):
    """Result of a noise function.

    Attributes:
        labels: (n,) int64 new labels (a new tensor).
        mask: (n,) bool, True where ``labels`` differs from the clean label.
    """

    labels: torch.Tensor
    mask: torch.Tensor


def _generator(generator: torch.Generator | int, fn: str) -> torch.Generator:
    if isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, bool) or not isinstance(generator, int):
        raise TypeError(f"{fn}: generator must be a torch.Generator or an int seed, got {type(generator).__name__}")
    return torch.Generator().manual_seed(generator)


def _check(labels: torch.Tensor, rate: float, num_classes: int, selection: str, fn: str) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor) or labels.ndim != 1:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"{fn}: labels must be a 1-D tensor, got {shape}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"{fn}: labels must be an integer tensor, got dtype {labels.dtype}")
    if not 0.0 <= float(rate) <= 1.0:
        raise ValueError(f"{fn}: rate must be in [0, 1], got {rate}")
    if num_classes < 2:
        raise ValueError(f"{fn}: num_classes must be >= 2, got {num_classes}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"{fn}: labels must lie in [0, {num_classes - 1}], got range "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    if selection not in _SELECTIONS:
        raise ValueError(f"{fn}: selection must be one of {_SELECTIONS}, got {selection!r}")
    return labels.long()


def symmetric_noise(labels: torch.Tensor, rate: float, num_classes: int, *, generator: torch.Generator | int,
                    to: str = "other", selection: str = "exact") -> NoisyLabels:
    """Corrupt a share ``rate`` of the labels, the new label independent of the old one's class.

    Draw order (fixed, so callers written before this function keep their exact labels): the selection
    (``randperm(n)`` for ``"exact"``, ``rand(n)`` for ``"bernoulli"``), then one ``randint`` of n values.

    Args:
        labels: (n,) integer clean labels in ``[0, num_classes)``.
        rate: share of samples to corrupt, in [0, 1] (``"exact"``: rounded to the nearest count).
        num_classes: K.
        generator: a seeded ``torch.Generator`` (consumed) or an int seed.
        to: ``"other"`` (uniform over the K - 1 other classes) or ``"any"`` (uniform over all K classes).
        selection: ``"exact"`` or ``"bernoulli"`` (module docstring).

    Returns:
        :class:`NoisyLabels` (new labels, mask of the labels that are now wrong).

    Raises:
        ValueError: naming the bad argument.
    """
    labels = _check(labels, rate, num_classes, selection, "symmetric_noise")
    if to not in ("other", "any"):
        raise ValueError(f"symmetric_noise: to must be 'other' or 'any', got {to!r}")
    g = _generator(generator, "symmetric_noise")
    n = labels.shape[0]
    if selection == "exact":
        chosen = torch.zeros(n, dtype=torch.bool)
        chosen[torch.randperm(n, generator=g)[: int(round(float(rate) * n))]] = True
    else:
        chosen = torch.rand(n, generator=g) < rate
    if to == "other":  # a nonzero shift modulo K is a different class, uniformly
        new = (labels + torch.randint(1, num_classes, (n,), generator=g)) % num_classes
    else:
        new = torch.randint(0, num_classes, (n,), generator=g)
    out = torch.where(chosen, new, labels)
    return NoisyLabels(out, out != labels)


def next_class_target(num_classes: int) -> torch.Tensor:
    """Pair-flipping target ``c -> (c + 1) mod K`` for :func:`asymmetric_noise`; (K,) int64."""
    if num_classes < 2:
        raise ValueError(f"next_class_target: num_classes must be >= 2, got {num_classes}")
    return (torch.arange(num_classes) + 1) % num_classes


def asymmetric_noise(labels: torch.Tensor, rate: float, target: Sequence[int] | torch.Tensor, *,
                     generator: torch.Generator | int, selection: str = "exact") -> NoisyLabels:
    """Class-conditional noise: a share ``rate`` of the samples of each class ``c`` get the label ``target[c]``.

    Classes with ``target[c] == c`` are left alone. With ``"exact"`` each such class loses exactly
    ``round(rate * n_c)`` samples: the first ones of the class in one seeded permutation (nested across rates).

    Args:
        labels: (n,) integer clean labels in ``[0, K)`` with ``K = len(target)``.
        rate: share of each class to move, in [0, 1].
        target: (K,) destination class of each class (e.g. :func:`next_class_target`).
        generator: a seeded ``torch.Generator`` (consumed: one ``randperm(n)`` or one ``rand(n)``) or an int seed.
        selection: ``"exact"`` or ``"bernoulli"``.

    Returns:
        :class:`NoisyLabels`.

    Raises:
        ValueError: naming the bad argument.
    """
    tgt = torch.as_tensor(target, dtype=torch.int64)
    if tgt.ndim != 1:
        raise ValueError(f"asymmetric_noise: target must be a 1-D sequence of classes, got shape {tuple(tgt.shape)}")
    k = tgt.shape[0]
    labels = _check(labels, rate, k, selection, "asymmetric_noise")
    if k and (int(tgt.min()) < 0 or int(tgt.max()) >= k):
        raise ValueError(f"asymmetric_noise: target entries must lie in [0, {k - 1}], got {tgt.tolist()}")
    g = _generator(generator, "asymmetric_noise")
    n = labels.shape[0]
    movable = tgt[labels] != labels
    if selection == "exact":
        perm = torch.randperm(n, generator=g)
        chosen = torch.zeros(n, dtype=torch.bool)
        lab_perm = labels[perm]
        for c in range(k):
            if int(tgt[c]) == c:
                continue
            members = perm[lab_perm == c]  # class c in permutation order
            chosen[members[: int(round(float(rate) * members.numel()))]] = True
    else:
        chosen = (torch.rand(n, generator=g) < rate) & movable
    out = torch.where(chosen, tgt[labels], labels)
    return NoisyLabels(out, out != labels)


class RelabeledDataset(Dataset):
    """A view of ``base`` whose item ``i`` is ``(base[i][0], labels[i])``; the image pipeline is untouched.

    Exposes ``num_classes``, ``img_size``, ``in_chans`` and ``classes`` of the base dataset (the tasks read them).
    """

    def __init__(self, base: Dataset, labels: torch.Tensor) -> None:
        if len(labels) != len(base):  # type: ignore[arg-type]
            raise ValueError(f"RelabeledDataset: {len(labels)} labels for a dataset of {len(base)} items")  # type: ignore[arg-type]
        self.base, self._labels = base, labels.clone().long()
        for name in ("num_classes", "img_size", "in_chans", "classes"):
            if hasattr(base, name):
                setattr(self, name, getattr(base, name))

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.base[index][0], int(self._labels[index])

    def labels(self) -> torch.Tensor:
        return self._labels.clone()
