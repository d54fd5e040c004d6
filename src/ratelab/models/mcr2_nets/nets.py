"""Small feature networks for digits-sized inputs, used by the MCR² recipes (Yu et al., NeurIPS 2020).

Usable for both MCR² and cross-entropy with the same backbone (only the head width differs): ``mcr2_cnn_small``
(3 conv layers) and ``mcr2_mlp_small`` (2 hidden layers, the label-noise recipe's backbone: fast enough for CPU
minutes). The official MCR² code uses ResNet-18 on CIFAR-10; these are ratelab's own small stand-ins.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ratelab.core.registry import register_model

__all__ = ["SmallCNN", "SmallMLP", "mcr2_cnn_small", "mcr2_mlp_small"]


class SmallCNN(nn.Module):
    """conv(32)-conv(32)-pool-conv(64)-pool -> flatten -> Linear(256)-BN-ReLU (penultimate) -> Linear head.

    The head mirrors the official MCR² projection head (Linear-BN-ReLU-Linear) at a smaller width.

    Args:
        num_classes: head width: classes for cross-entropy, the feature dimension for MCR²; 0 = no head.
        img_size: input side, a multiple of 4.
        in_chans: input channels.
        width: channels of the first block (the second block has 2x).
        hidden: penultimate width (``num_features``).
    """

    def __init__(self, num_classes: int = 10, img_size: int = 16, in_chans: int = 1, width: int = 32,
                 hidden: int = 256) -> None:
        super().__init__()
        if img_size % 4:
            raise ValueError(f"SmallCNN: img_size must be a multiple of 4, got {img_size}")
        self.num_classes, self.img_size, self.in_chans = num_classes, img_size, in_chans
        self.width, self.hidden, self.num_features = width, hidden, hidden

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(in_chans, width), *block(width, width), nn.MaxPool2d(2),
            *block(width, 2 * width), nn.MaxPool2d(2), nn.Flatten(),
        )
        flat = 2 * width * (img_size // 4) ** 2
        self.pre = nn.Sequential(nn.Linear(flat, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True))
        self.head = nn.Linear(hidden, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, hidden) penultimate features."""
        return self.pre(self.features(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def mcr2_cnn_small(**kwargs: Any) -> SmallCNN:
    """Small CNN (3 conv layers, 256-d penultimate) for digits-sized inputs; see :class:`SmallCNN`."""
    return SmallCNN(**kwargs)


class SmallMLP(nn.Module):
    """flatten -> Linear(512)-BN-ReLU -> Linear(256)-BN-ReLU (penultimate) -> Linear head.

    Args:
        num_classes: head width (classes for cross-entropy, feature dimension for MCR²); 0 = no head.
        img_size: input side (the input is flattened, so any size works; it fixes the first layer's width).
        in_chans: input channels.
        hidden: width of the first hidden layer; the penultimate width is ``hidden // 2``.
    """

    def __init__(self, num_classes: int = 10, img_size: int = 8, in_chans: int = 1, hidden: int = 512) -> None:
        super().__init__()
        self.num_classes, self.img_size, self.in_chans = num_classes, img_size, in_chans
        self.hidden, self.num_features = hidden, hidden // 2
        self.body = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_chans * img_size * img_size, hidden, bias=False),
            nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden // 2, bias=False), nn.BatchNorm1d(hidden // 2), nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(hidden // 2, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, hidden // 2) penultimate features."""
        return self.body(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def mcr2_mlp_small(**kwargs: Any) -> SmallMLP:
    """Two-hidden-layer MLP (512, 256) for 8x8 digits; see :class:`SmallMLP`. The label-noise recipe's backbone."""
    return SmallMLP(**kwargs)
