"""Exponential moving average of model weights.

``ema <- decay * ema + (1 - decay) * w`` after every optimizer step, for every floating-point entry of the state
dict (parameters and float buffers); integer buffers are copied. The average starts at the initial weights.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

from ratelab.core.checkpoint import unwrap_model

__all__ = ["ModelEma"]


class ModelEma:
    """A frozen copy of ``model`` that tracks the moving average of its weights.

    Args:
        model: the model being trained (wrappers are peeled).
        decay: in [0, 1); 0.999 averages over roughly the last 1000 steps.

    Example:
        >>> ema = ModelEma(model, decay=0.999)
        >>> optimizer.step(); ema.update(model)
        >>> logits = ema.module(x)
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.module = copy.deepcopy(unwrap_model(model)).eval()
        self.module.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        src = unwrap_model(model).state_dict()
        for name, ema_v in self.module.state_dict().items():
            v = src[name].detach()
            if ema_v.is_floating_point():
                # lerp_(v, w) = ema + w * (v - ema) = (1 - w) * ema + w * v with w = 1 - decay.
                ema_v.lerp_(v.to(ema_v.dtype), 1.0 - self.decay)
            else:
                ema_v.copy_(v)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "module": self.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
