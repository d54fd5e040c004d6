"""Rate-reduction objectives: coding rates, rate reduction and the MCR² loss as pure differentiable functions."""

from ratelab.objectives.coding_rate import coding_rate, coding_rate_ref, logdet_i_plus
from ratelab.objectives.rate_reduction import mcr2_loss, rate_reduction, rate_reduction_ref

__all__ = ["coding_rate", "coding_rate_ref", "logdet_i_plus", "mcr2_loss", "rate_reduction", "rate_reduction_ref"]
