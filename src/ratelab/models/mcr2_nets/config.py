"""Architecture configs of the small MCR² feature networks and their named variants."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class SmallCNNConfig:
    """Architecture of :class:`~ratelab.models.mcr2_nets.nets.SmallCNN`.

    Attributes:
        width: channels of the first two conv layers (the third has ``2 * width``).
        hidden: penultimate width (``num_features``).
    """

    width: int = 32
    hidden: int = 256

    def __post_init__(self) -> None:
        for name in ("width", "hidden"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SmallCNNConfig.{name} must be positive, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SmallMLPConfig:
    """Architecture of :class:`~ratelab.models.mcr2_nets.nets.SmallMLP`.

    Attributes:
        hidden: width of the first hidden layer; the penultimate width is ``hidden // 2``.
    """

    hidden: int = 512

    def __post_init__(self) -> None:
        if self.hidden < 2:
            raise ValueError(f"SmallMLPConfig.hidden must be >= 2 (the penultimate width is hidden // 2), "
                             f"got {self.hidden}")

    def to_dict(self) -> dict:
        return asdict(self)


MCR2_CNN_VARIANTS: dict[str, SmallCNNConfig] = {"small": SmallCNNConfig()}
MCR2_MLP_VARIANTS: dict[str, SmallMLPConfig] = {"small": SmallMLPConfig()}
