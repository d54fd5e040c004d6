"""Learning-rate schedule: linear warmup, then cosine decay to ``min_lr``, stepped once per optimizer step."""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["WarmupCosine", "warmup_cosine_lr"]


def warmup_cosine_lr(step: int, *, base_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """Learning rate for optimizer step ``step`` (0-based: the lr the ``step``-th update uses).

    Warmup: ``base_lr * (step + 1) / warmup_steps`` for ``step < warmup_steps`` (the first update already moves the
    weights; no step is spent at lr 0). Then ``min_lr + (base_lr - min_lr) * (1 + cos(pi * t)) / 2`` with
    ``t = (step - warmup_steps) / (total_steps - warmup_steps)`` running from 0 to 1. Steps past the end stay at
    ``min_lr``.
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 0:
        return base_lr
    t = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


class WarmupCosine:
    """Sets every param group's lr from :func:`warmup_cosine_lr`.

    Each group's peak is its lr at construction (``initial_lr``); ``min_lr`` is scaled by the same factor as the
    group's peak relative to ``base_lr``, so groups with a different peak (e.g. layer decay) keep their ratio.
    Call :meth:`step` after every ``optimizer.step()``; the state is just the step count.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int, min_lr: float = 0.0
    ) -> None:
        if total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {total_steps}")
        self.optimizer = optimizer
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.min_lr = float(min_lr)
        for g in optimizer.param_groups:
            g.setdefault("initial_lr", g["lr"])
        self.last_step = 0
        self._apply()

    def _apply(self) -> None:
        for g in self.optimizer.param_groups:
            peak = g["initial_lr"]
            ratio = self.min_lr / self.base_lr if self.base_lr > 0 else 0.0
            g["lr"] = warmup_cosine_lr(
                self.last_step,
                base_lr=peak,
                warmup_steps=self.warmup_steps,
                total_steps=self.total_steps,
                min_lr=peak * ratio,
            )

    @property
    def base_lr(self) -> float:
        return max(g["initial_lr"] for g in self.optimizer.param_groups)

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {
            "last_step": self.last_step,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "min_lr": self.min_lr,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_step = int(state["last_step"])
        self._apply()
