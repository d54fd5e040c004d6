"""The ``privacy`` config section: DP-SGD's budget, clipping, sampling and TAN-simulation settings.

Set it with ``TrainConfig(plugins={"privacy": {"target_epsilon": 8}})`` or ``--set plugins.privacy.target_epsilon=8``;
the trainer plugin (:mod:`ratelab.train.privacy_plugin`) reads it. Pure data: importing it pulls in neither opacus nor
the trainer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ratelab.core.config import config_field

__all__ = ["ACCOUNTANTS", "CLIPPING_MODES", "PrivacyConfig"]

ACCOUNTANTS = ("rdp", "prv")
CLIPPING_MODES = ("ghost", "hooks", "functorch")

_f = config_field


@dataclass
class PrivacyConfig:
    """DP-SGD settings (Abadi et al. 2016, with Poisson subsampling as the accountants assume).

    Exactly one of ``target_epsilon`` (the noise multiplier is then found with the accountant for the run's sample
    rate ``q = batch_size / N`` and its number of steps) and ``noise_multiplier`` is given.
    """

    target_epsilon: float | None = _f(None, "Privacy budget epsilon to reach at the end of the run (sigma is solved "
                                            "for); give this or noise_multiplier.")
    delta: float | None = _f(None, "delta of (epsilon, delta)-DP; default 1/N for N training examples.")
    noise_multiplier: float | None = _f(None, "sigma: noise std on the summed clipped gradient is sigma * "
                                              "max_grad_norm; give this or target_epsilon.")
    max_grad_norm: float = _f(1.0, "C: every example's gradient (all parameters together) is clipped to this L2 "
                                   "norm.")
    accountant: str = _f("rdp", "Accountant that solves sigma for target_epsilon and gives 'dp_epsilon' (TAN: "
                                "'tan_simulated_epsilon'); both RDP and PRV epsilons are always reported.",
                         choices=ACCOUNTANTS)
    poisson: bool = _f(True, "Poisson sampling (each example joins a batch with probability q; variable and empty "
                             "batches). False: fixed-size shuffled batches, which the accountants do NOT cover "
                             "(results are flagged as carrying no guarantee).")
    physical_batch_size: int | None = _f(None, "Largest micro-batch per rank: a logical (Poisson) batch is split "
                                                "into as many physical micro-batches as needed; one noisy update.")
    clipping: str = _f("ghost", "Per-sample clipping: 'ghost' (norms without per-sample gradients, two backward "
                                "passes), 'hooks' (opacus per-layer per-sample gradients), 'functorch' (opacus "
                                "vmap per-sample gradients).", choices=CLIPPING_MODES)
    tan_batch_size: int | None = _f(None, "TAN simulation (Sander et al. 2023): train with this expected batch B' "
                                          "and sigma' = sigma * B'/B at the same steps; carries NO privacy "
                                          "guarantee (every output says so, and names the simulated run's epsilon "
                                          "tan_simulated_epsilon_*, never dp_epsilon*).")
    dp_seed: int | None = _f(None, "Seed of the noise and of the Poisson batches (None: fresh OS entropy, kept only "
                                   "in the checkpoints). A known seed lets anyone recompute both: use one for tests "
                                   "and reproductions, not for a release.")

    def check(self) -> None:
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("give exactly one of target_epsilon and noise_multiplier (got "
                             f"target_epsilon={self.target_epsilon}, noise_multiplier={self.noise_multiplier})")
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            raise ValueError(f"target_epsilon: must be > 0, got {self.target_epsilon}")
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise ValueError(f"noise_multiplier: must be > 0 (sigma = 0 adds no noise), got {self.noise_multiplier}")
        if self.delta is not None and not 0.0 < self.delta < 1.0:
            raise ValueError(f"delta: must be in (0, 1), got {self.delta}")
        if not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm: must be > 0, got {self.max_grad_norm}")
        for name in ("physical_batch_size", "tan_batch_size"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name}: must be >= 1, got {v}")

    def no_guarantee_reasons(self) -> list[str]:
        """Why the reported epsilon is not a formal guarantee of this run, from these settings alone (empty: it is,
        given Poisson sampling with fresh noise; a task can add reasons of its own, see ``guarantee_note``)."""
        out = []
        if self.tan_batch_size is not None:
            out.append(f"TAN simulation (trained with expected batch {self.tan_batch_size} and sigma' = sigma * B'/B); "
                       "its tan_simulated_epsilon_* are those of the simulated full-batch run, not of this one")
        if not self.poisson:
            out.append("fixed-size shuffled batches; the epsilon assumes Poisson sampling, which this run did not use")
        if self.dp_seed is not None:
            out.append(f"dp_seed={self.dp_seed} is known, so the noise and the Poisson batches can be recomputed (a "
                       "test or reproduction setting)")
        return out

    @property
    def has_guarantee(self) -> bool:
        """Whether the reported epsilon is a formal guarantee of this run: Poisson sampling, no TAN simulation, and no
        known ``dp_seed`` (with the seed anyone can regenerate every noise draw and batch, and subtract them)."""
        return not self.no_guarantee_reasons()

    def guarantee_note(self, extra_reasons: Sequence[str] = ()) -> str:
        """One line saying what the reported epsilon means for this run; ``extra_reasons`` (e.g. a vocabulary built
        from the private data, from the task) void the guarantee too."""
        reasons = [*self.no_guarantee_reasons(), *extra_reasons]
        if reasons:
            return "NO PRIVACY GUARANTEE: " + "; ".join(reasons)
        return "(epsilon, delta)-DP for the released weights under Poisson sampling (example-level)"
