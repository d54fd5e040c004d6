"""Small feature networks for digits-sized inputs, used by the MCR² recipes (Yu et al., NeurIPS 2020).

Usable for both MCR² and cross-entropy with the same backbone (only the head width differs): ``mcr2_cnn_small``
(3 conv layers) and ``mcr2_mlp_small`` (2 hidden layers, the label-noise recipe's backbone: fast enough for CPU
minutes). The official MCR² code uses ResNet-18 on CIFAR-10; these are ratelab's own small stand-ins.

Model API (docs/models.md, "Model API"): ``forward_features`` / ``forward_head`` / ``forward_intermediates`` as timm.
The CNN's intermediates are its three conv stages' feature maps (``"NCHW"`` by default), the MLP's its two hidden
layers (``"NC"``, (B, width)). Neither has a final norm or attention (``norm=True`` / ``return_attn=True`` are
errors). Architecture lives in :class:`SmallCNNConfig` / :class:`SmallMLPConfig`; ``num_classes``, ``img_size`` and
``in_chans`` are runtime options.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ratelab.core.builder import build_model_with_cfg
from ratelab.core.registry import register_model
from ratelab.layers.intermediates import check_output_fmt, pack_intermediates, resolve_indices
from ratelab.models.mcr2_nets.config import MCR2_CNN_VARIANTS, MCR2_MLP_VARIANTS, SmallCNNConfig, SmallMLPConfig

__all__ = ["SmallCNN", "SmallMLP", "mcr2_cnn_small", "mcr2_mlp_small"]


def _no_norm_no_attn(model: nn.Module, norm: bool, return_attn: bool) -> None:
    name = type(model).__name__
    if norm:
        raise ValueError(f"{name}.forward_intermediates: norm=True, but {name} has no final norm layer")
    if return_attn:
        raise ValueError(f"{name}.forward_intermediates: return_attn=True, but {name} has no attention")


def _taps(seq: nn.Sequential) -> list[int]:
    # A stage ends at each ReLU: its output is the stage's feature (before any pooling that follows).
    return [i for i, m in enumerate(seq) if isinstance(m, nn.ReLU)]


class SmallCNN(nn.Module):
    """conv(32)-conv(32)-pool-conv(64)-pool -> flatten -> Linear(256)-BN-ReLU (penultimate) -> Linear head.

    The head mirrors the official MCR² projection head (Linear-BN-ReLU-Linear) at a smaller width.

    Args:
        cfg: architecture (:class:`SmallCNNConfig`: ``width``, ``hidden``).
        num_classes: head width: classes for cross-entropy, the feature dimension for MCR²; 0 = no head.
        img_size: input side, a multiple of 4.
        in_chans: input channels.
    """

    def __init__(
        self, cfg: SmallCNNConfig | None = None, *, num_classes: int = 10, img_size: int = 16, in_chans: int = 1
    ) -> None:
        super().__init__()
        cfg = cfg or SmallCNNConfig()
        if img_size % 4:
            raise ValueError(f"SmallCNN: img_size must be a multiple of 4, got {img_size}")
        self.cfg = cfg
        width, hidden = cfg.width, cfg.hidden
        self.num_classes, self.img_size, self.in_chans = num_classes, img_size, in_chans
        self.width, self.hidden, self.num_features = width, hidden, hidden

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(in_chans, width), *block(width, width), nn.MaxPool2d(2),
            *block(width, 2 * width), nn.MaxPool2d(2), nn.Flatten(),
        )  # fmt: skip
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

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        return_attn: bool = False,
    ) -> Any:
        """The three conv stages' outputs (after their ReLU, before pooling), timm's convention.

        Args:
            x: (B, C, H, W) images.
            indices: stages to keep (0, 1, 2): ``None`` all, an int n the last n, a list those.
            norm: must be False (no final norm).
            output_fmt: ``"NCHW"`` (B, c, h, w) maps, or ``"NLC"`` (B, h*w, c).
            intermediates_only: return only the list.
            return_attn: must be False (no attention).

        Returns:
            ``(final, intermediates)`` with ``final`` (B, hidden) = :meth:`forward_features`; shapes (B, width, H, W),
            (B, width, H, W), (B, 2 width, H/2, W/2) in ``"NCHW"``. The list alone with ``intermediates_only``.
        """
        check_output_fmt(output_fmt, ("NCHW", "NLC"), type(self).__name__)
        _no_norm_no_attn(self, norm, return_attn)
        taps = _taps(self.features)
        take = {taps[i] for i in resolve_indices(len(taps), indices, what="stage")}
        inter = []
        for j, m in enumerate(self.features):
            x = m(x)
            if j in take:
                # Safe to keep without a copy: the in-place ReLUs only ever act on a fresh conv/BN output.
                inter.append(x.flatten(2).transpose(1, 2) if output_fmt == "NLC" else x)
        return pack_intermediates(self.pre(x), inter, None, intermediates_only=intermediates_only)


@register_model
def mcr2_cnn_small(**kwargs: Any) -> SmallCNN:
    """Small CNN (3 conv layers, 256-d penultimate) for digits-sized inputs; see :class:`SmallCNN`."""
    return build_model_with_cfg(SmallCNN, SmallCNNConfig, MCR2_CNN_VARIANTS["small"], **kwargs)


class SmallMLP(nn.Module):
    """flatten -> Linear(512)-BN-ReLU -> Linear(256)-BN-ReLU (penultimate) -> Linear head.

    Args:
        cfg: architecture (:class:`SmallMLPConfig`: ``hidden``, the first hidden width; the penultimate is half).
        num_classes: head width (classes for cross-entropy, feature dimension for MCR²); 0 = no head.
        img_size: input side (the input is flattened, so any size works; it fixes the first layer's width).
        in_chans: input channels.
    """

    def __init__(
        self, cfg: SmallMLPConfig | None = None, *, num_classes: int = 10, img_size: int = 8, in_chans: int = 1
    ) -> None:
        super().__init__()
        cfg = cfg or SmallMLPConfig()
        self.cfg = cfg
        hidden = cfg.hidden
        self.num_classes, self.img_size, self.in_chans = num_classes, img_size, in_chans
        self.hidden, self.num_features = hidden, hidden // 2
        self.body = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_chans * img_size * img_size, hidden, bias=False),
            nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden // 2, bias=False), nn.BatchNorm1d(hidden // 2), nn.ReLU(inplace=True),
        )  # fmt: skip
        self.head = nn.Linear(hidden // 2, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, hidden // 2) penultimate features."""
        return self.body(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        output_fmt: str = "NC",
        intermediates_only: bool = False,
        return_attn: bool = False,
    ) -> Any:
        """The two hidden layers' outputs (after BN-ReLU), timm's convention.

        Args:
            x: (B, C, H, W) images.
            indices: layers to keep (0, 1): ``None`` both, an int n the last n, a list those.
            norm: must be False (no final norm).
            output_fmt: ``"NC"`` only: (B, hidden) and (B, hidden // 2).
            intermediates_only: return only the list.
            return_attn: must be False (no attention).

        Returns:
            ``(final, intermediates)`` with ``final`` = :meth:`forward_features` (the same tensor as the last hidden
            layer), or the list alone with ``intermediates_only``.
        """
        check_output_fmt(output_fmt, ("NC",), type(self).__name__)
        _no_norm_no_attn(self, norm, return_attn)
        taps = _taps(self.body)
        take = {taps[i] for i in resolve_indices(len(taps), indices)}
        inter = []
        for j, m in enumerate(self.body):
            x = m(x)
            if j in take:
                inter.append(x)
        return pack_intermediates(x, inter, None, intermediates_only=intermediates_only)


@register_model
def mcr2_mlp_small(**kwargs: Any) -> SmallMLP:
    """Two-hidden-layer MLP (512, 256) for 8x8 digits; see :class:`SmallMLP`. The label-noise recipe's backbone."""
    return build_model_with_cfg(SmallMLP, SmallMLPConfig, MCR2_MLP_VARIANTS["small"], **kwargs)
