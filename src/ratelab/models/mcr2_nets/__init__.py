"""Small feature networks for the MCR² recipes."""

from ratelab.models.mcr2_nets.config import SmallCNNConfig, SmallMLPConfig
from ratelab.models.mcr2_nets.nets import SmallCNN, SmallMLP

__all__ = ["SmallCNN", "SmallCNNConfig", "SmallMLP", "SmallMLPConfig"]
