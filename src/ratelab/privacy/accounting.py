"""Privacy accounting, thin over opacus' accountants: epsilon from a history of steps, sigma for a target epsilon.

A *history* is a list of ``(noise_multiplier, sample_rate, steps)`` triples, opacus' own format: consecutive steps
with the same sigma and q are one triple. Both accountants read the same history:

* ``rdp``: Renyi DP of the subsampled Gaussian (Mironov, Talwar & Zhang 2019), converted with Balle et al. 2020;
* ``prv``: numerical composition of privacy-loss random variables (Gopi, Lee & Wutschitz 2021), tighter; its
  ``eps_error`` (0.01, opacus' default) bounds the numerical error and the upper bound is returned.

DP-Cap's setting (sigma 0.728, B = 1,310,720 of N = 233M, 5,708 steps, delta = 1/N) gives 8.07 with RDP and 7.37
with PRV (``tests/test_privacy.py`` checks both). All of this assumes Poisson subsampling at rate q.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

from ratelab.privacy.config import ACCOUNTANTS

__all__ = [
    "PrivacyLedger",
    "compute_epsilon",
    "epsilon_from_history",
    "find_noise_multiplier",
    "tan_noise_multiplier",
]

PRV_EPS_ERROR = 0.01


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant: must be one of {list(ACCOUNTANTS)}, got {accountant!r}")


def _check_common(sample_rate: float, steps: int, delta: float) -> None:
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate: must be in (0, 1], got {sample_rate}")
    if steps < 0 or int(steps) != steps:
        raise ValueError(f"steps: must be a non-negative integer, got {steps}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta: must be in (0, 1), got {delta}")


def _history(history: Iterable[Any]) -> list[tuple[float, float, int]]:
    out = []
    for i, entry in enumerate(history):
        try:
            sigma, q, steps = entry
        except (TypeError, ValueError):
            raise ValueError(f"history[{i}]: expected (noise_multiplier, sample_rate, steps), got {entry!r}") from None
        if int(steps) > 0:
            out.append((float(sigma), float(q), int(steps)))
    return out


def epsilon_from_history(history: Iterable[Any], delta: float, accountant: str = "rdp") -> float:
    """epsilon spent by the steps in ``history`` at ``delta`` (0.0 for no steps).

    Args:
        history: ``[(noise_multiplier, sample_rate, steps), ...]``.
        delta: the target delta.
        accountant: ``"rdp"`` or ``"prv"``.
    """
    _check_accountant(accountant)
    hist = _history(history)
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta: must be in (0, 1), got {delta}")
    if not hist:
        return 0.0
    from opacus.accountants import PRVAccountant, RDPAccountant

    if accountant == "rdp":
        acc = RDPAccountant()
        acc.history = hist
        return float(acc.get_epsilon(delta))
    acc = PRVAccountant()
    acc.history = hist
    return float(acc.get_epsilon(delta, eps_error=PRV_EPS_ERROR))


def compute_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                    accountant: str = "rdp") -> float:
    """epsilon of ``steps`` DP-SGD steps with noise multiplier sigma and Poisson sample rate q, at ``delta``.

    Example:
        >>> compute_epsilon(0.728, 1_310_720 / 233e6, 5708, 1 / 233e6)   # DP-Cap, about 8.07
    """
    _check_accountant(accountant)
    _check_common(sample_rate, steps, delta)
    if not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier: must be > 0, got {noise_multiplier}")
    return epsilon_from_history([(noise_multiplier, sample_rate, steps)], delta, accountant)


def find_noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                          accountant: str = "rdp", *, epsilon_tolerance: float = 0.01) -> float:
    """The smallest sigma (to opacus' bisection tolerance) whose ``steps`` steps at rate q spend <= target epsilon.

    opacus' ``get_noise_multiplier`` (doubling, then bisection until epsilon is within ``epsilon_tolerance`` below
    the target); the returned sigma always satisfies ``compute_epsilon(sigma, ...) <= target_epsilon``.
    """
    _check_accountant(accountant)
    _check_common(sample_rate, steps, delta)
    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon: must be > 0, got {target_epsilon}")
    if steps == 0:
        raise ValueError("steps: 0 steps spend no budget; there is no noise multiplier to find")
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        # The search visits tiny sigmas whose best RDP order is the largest one tried; only the answer matters.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        sigma = get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                     steps=int(steps), accountant=accountant, epsilon_tolerance=epsilon_tolerance)
    return float(sigma)


def tan_noise_multiplier(noise_multiplier: float, batch_size: int, tan_batch_size: int) -> float:
    """TAN simulation's sigma' = sigma * B'/B: the same noise on the averaged gradient (sigma C / B) with batch B'.

    At a fixed number of steps, utility depends mostly on sigma / B (Sander, Stock & Sablayrolles 2023), so a run
    with B' << B and sigma' predicts the expensive run's accuracy. The cheap run itself has NO meaningful guarantee.
    """
    if not batch_size >= 1 or not tan_batch_size >= 1:
        raise ValueError(f"batch_size and tan_batch_size must be >= 1, got {batch_size}, {tan_batch_size}")
    return float(noise_multiplier) * tan_batch_size / batch_size


class PrivacyLedger:
    """The history of DP steps taken by a run, checkpointable, with epsilon under both accountants.

    Attributes:
        history: ``[[noise_multiplier, sample_rate, steps], ...]`` (JSON-able; what the checkpoint stores).
    """

    def __init__(self) -> None:
        self.history: list[list[float]] = []

    @property
    def steps(self) -> int:
        return int(sum(h[2] for h in self.history))

    def step(self, noise_multiplier: float, sample_rate: float, n: int = 1) -> None:
        """Record ``n`` steps at (sigma, q), merged with the last entry when it has the same sigma and q."""
        if self.history and self.history[-1][0] == noise_multiplier and self.history[-1][1] == sample_rate:
            self.history[-1][2] += n
        else:
            self.history.append([float(noise_multiplier), float(sample_rate), int(n)])

    def truncated(self, steps: int) -> list[list[float]]:
        """The history of the first ``steps`` steps."""
        out, left = [], int(steps)
        for sigma, q, n in self.history:
            if left <= 0:
                break
            take = min(int(n), left)
            out.append([sigma, q, take])
            left -= take
        return out

    def epsilon(self, delta: float, accountant: str = "rdp", *, steps: int | None = None) -> float:
        hist = self.history if steps is None else self.truncated(steps)
        return epsilon_from_history(hist, delta, accountant)

    def epsilons(self, delta: float, *, steps: int | None = None) -> dict[str, float]:
        """``{"rdp": eps, "prv": eps}``."""
        return {a: self.epsilon(delta, a, steps=steps) for a in ACCOUNTANTS}

    def state_dict(self) -> dict[str, Any]:
        return {"history": [list(h) for h in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        hist = state.get("history")
        if not isinstance(hist, list):
            raise ValueError(f"privacy ledger state: expected a 'history' list, got {type(hist).__name__}")
        self.history = [[float(s), float(q), int(n)] for s, q, n in _history(hist)]


