"""Official Ma-Lab-Berkeley/CRATE state dict -> ratelab key layout (to be completed)."""

from __future__ import annotations

import torch


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    return state_dict
