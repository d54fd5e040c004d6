"""Differential privacy: DP-SGD on opacus, with Poisson sampling, accounting and the checks that make epsilon real.

* :class:`PrivacyConfig` -- the ``privacy`` plugin's options (``TrainConfig(plugins={"privacy": {...}})``); the
  plugin itself is :class:`ratelab.train.privacy_plugin.PrivacyPlugin` (it needs the trainer's plugin base, which
  lives above this package).
* accounting: :func:`compute_epsilon`, :func:`find_noise_multiplier`, :func:`epsilon_from_history`,
  :func:`tan_noise_multiplier`, :class:`PrivacyLedger` (opacus' RDP and PRV accountants underneath).
* clipping: :func:`make_per_sample_module`, :func:`clipped_backward` (ghost / hooks / functorch, opacus
  underneath), :func:`check_private_module` (clear errors for layers that mix examples and for tied parameters);
  the ``torch.func`` oracle :func:`clipped_gradient_sum_ref`.

opacus is imported only when one of these runs. See docs/privacy.md for the task contract (per-example losses).
"""

from ratelab.privacy.accounting import (
    PrivacyLedger,
    compute_epsilon,
    epsilon_from_history,
    find_noise_multiplier,
    tan_noise_multiplier,
)
from ratelab.privacy.clipping import check_private_module, clipped_backward, make_per_sample_module
from ratelab.privacy.config import ACCOUNTANTS, CLIPPING_MODES, PrivacyConfig
from ratelab.privacy.reference import clipped_gradient_sum_ref, per_sample_gradients_ref

__all__ = [
    "ACCOUNTANTS",
    "CLIPPING_MODES",
    "PrivacyConfig",
    "PrivacyLedger",
    "check_private_module",
    "clipped_backward",
    "clipped_gradient_sum_ref",
    "compute_epsilon",
    "epsilon_from_history",
    "find_noise_multiplier",
    "make_per_sample_module",
    "per_sample_gradients_ref",
    "tan_noise_multiplier",
]
