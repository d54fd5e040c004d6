"""Rate-reduction objectives: coding rates (and, later, MCR² losses) as pure differentiable functions."""

from ratelab.objectives.coding_rate import coding_rate, coding_rate_ref, logdet_i_plus

__all__ = ["coding_rate", "coding_rate_ref", "logdet_i_plus"]
