"""Synthetic few-shot classification tasks for training and probing in-context learners.

A *task* is one draw of K Gaussian class centers in R^d and a label assignment: K distinct "label words" out of a
vocabulary of ``vocab_size`` tokens, in a random order (so class c is named ``label_words[c]``). A *sequence* of n
pairs ``x_1, y_1, ..., x_n, y_n`` samples classes uniformly, inputs ``x = center[c] + noise_std * N(0, I)`` and
label tokens ``y = label_words[c]``. Because every training sequence draws a fresh task, the only way to predict
``y_i`` from ``x_1, y_1, ..., x_i`` is to infer centers and label names from the preceding demonstrations: the
model must learn in context. At i = 1 (0 shots) it cannot even know which K words are in use.

Ambiguity (so that accuracy stays below 100% and calibration is non-trivial): ``noise_std`` makes clusters overlap,
and ``label_noise`` replaces a fraction of label tokens by another of the task's label words (in training this
flips targets too; in evaluation :func:`sample_sequence` flips only what it is asked to).

Shapes: inputs ``(n, d)`` float32, label tokens ``(n,)`` int64 in ``[0, vocab_size)``, classes ``(n,)`` int64 in
``[0, K)``. Everything is a function of an explicit seed (``torch.Generator``), never of the global RNG.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch.utils.data import Dataset

from ratelab.core.seeding import derive_seed

__all__ = ["FewShotConfig", "FewShotSequences", "FewShotTask", "sample_points", "sample_sequence", "sample_task"]


@dataclass(frozen=True)
class FewShotConfig:
    """Distribution of synthetic few-shot tasks.

    Attributes:
        input_dim: d, dimension of the inputs.
        vocab_size: number of label words the model can emit (>= max_classes).
        min_classes, max_classes: K is drawn uniformly from this inclusive range per task.
        center_scale: class centers are ``center_scale * N(0, I_d)``.
        noise_std: within-class standard deviation (overlap between clusters grows with it).
        label_noise: probability that a label token is replaced by a different label word of the same task.
        n_pairs: pairs (x, y) per training sequence; predictions are made at 0 .. n_pairs - 1 shots.
    """

    input_dim: int = 8
    vocab_size: int = 8
    min_classes: int = 2
    max_classes: int = 5
    center_scale: float = 1.0
    noise_std: float = 0.5
    label_noise: float = 0.0
    n_pairs: int = 17

    def __post_init__(self) -> None:
        for name in ("input_dim", "vocab_size", "min_classes", "n_pairs"):
            if getattr(self, name) < 1:
                raise ValueError(f"FewShotConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 2 <= self.min_classes <= self.max_classes <= self.vocab_size:
            raise ValueError(
                f"FewShotConfig: need 2 <= min_classes <= max_classes <= vocab_size, got {self.min_classes}, "
                f"{self.max_classes}, {self.vocab_size}"
            )
        if self.center_scale <= 0 or self.noise_std < 0:
            raise ValueError(f"FewShotConfig: center_scale must be > 0 and noise_std >= 0, got {self.center_scale}, "
                             f"{self.noise_std}")
        if not 0.0 <= self.label_noise < 1.0:
            raise ValueError(f"FewShotConfig.label_noise must be in [0, 1), got {self.label_noise}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class FewShotTask:
    """One task: ``centers`` (K, d) float32 and ``label_words`` (K,) int64 (distinct tokens; class c -> word c)."""

    centers: torch.Tensor
    label_words: torch.Tensor

    @property
    def num_classes(self) -> int:
        return int(self.centers.shape[0])


def sample_task(cfg: FewShotConfig, gen: torch.Generator, num_classes: int | None = None) -> FewShotTask:
    """Draw class centers and a random label assignment.

    Args:
        cfg: task distribution.
        gen: source of randomness.
        num_classes: K; default drawn uniformly from ``[cfg.min_classes, cfg.max_classes]``.
    """
    if num_classes is None:
        num_classes = int(torch.randint(cfg.min_classes, cfg.max_classes + 1, (), generator=gen))
    if not 2 <= num_classes <= cfg.vocab_size:
        raise ValueError(f"sample_task: num_classes must be in [2, vocab_size={cfg.vocab_size}], got {num_classes}")
    centers = cfg.center_scale * torch.randn(num_classes, cfg.input_dim, generator=gen)
    words = torch.randperm(cfg.vocab_size, generator=gen)[:num_classes]
    return FewShotTask(centers, words)


def sample_points(task: FewShotTask, n: int, cfg: FewShotConfig, gen: torch.Generator
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` labelled points of ``task``: inputs (n, d) float32 and clean classes (n,) int64 (uniform over K)."""
    cls = torch.randint(0, task.num_classes, (n,), generator=gen)
    x = task.centers[cls] + cfg.noise_std * torch.randn(n, cfg.input_dim, generator=gen)
    return x, cls


def corrupt_classes(cls: torch.Tensor, num_classes: int, p: float, gen: torch.Generator) -> torch.Tensor:
    """Replace each class, with probability ``p``, by a uniformly drawn *different* class
    (:func:`ratelab.data.noise.symmetric_noise` with per-label Bernoulli selection)."""
    from ratelab.data.noise import symmetric_noise

    return symmetric_noise(cls, p, num_classes, generator=gen, to="other", selection="bernoulli").labels


def sample_sequence(cfg: FewShotConfig, gen: torch.Generator, task: FewShotTask | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """One training sequence of ``cfg.n_pairs`` pairs from ``task`` (a fresh task when None).

    Returns:
        ``(x (n_pairs, d) float32, y (n_pairs,) int64 label tokens)``, label noise applied to every token.
    """
    task = sample_task(cfg, gen) if task is None else task
    x, cls = sample_points(task, cfg.n_pairs, cfg, gen)
    if cfg.label_noise > 0:
        cls = corrupt_classes(cls, task.num_classes, cfg.label_noise, gen)
    return x, task.label_words[cls]


class FewShotSequences(Dataset):
    """Map-style dataset of ``length`` sequences; item ``i`` is a pure function of ``(seed, i)``.

    Every item draws its own task, so this is an (effectively) endless stream made indexable, which is what the
    trainer's sharded, resumable sampler needs. Items are ``(x (n_pairs, d) float32, y (n_pairs,) int64)``.
    """

    def __init__(self, cfg: FewShotConfig, length: int, seed: int = 0) -> None:
        if length < 1:
            raise ValueError(f"FewShotSequences: length must be >= 1, got {length}")
        self.cfg, self.length, self.seed = cfg, int(length), int(seed)
        self.num_classes = cfg.vocab_size  # the model's output width (label vocabulary)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(f"FewShotSequences: index {index} out of range [0, {self.length})")
        gen = torch.Generator().manual_seed(derive_seed(self.seed, index))
        return sample_sequence(self.cfg, gen)
