"""Small feature networks for the MCR² recipes."""

from ratelab.models.mcr2_nets.nets import SmallCNN, SmallMLP

__all__ = ["SmallCNN", "SmallMLP"]
