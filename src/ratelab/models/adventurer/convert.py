"""Weight conversion for Adventurer: ratelab's own layout and the official wangf3014/Adventurer layout.

The official model (``models_mamba.py``) keeps its blocks in ``layers``, names the block norms ``norm`` and
``norm_mlp``, the SwiGLU linears ``w1`` (gate), ``w2`` (value), ``w3`` (output) and the final norm ``norm_f``; the
mixer is a ``mamba_ssm`` 2.x ``Mamba2`` whose parameter names ratelab's :class:`ratelab.layers.mamba2.Mamba2` shares.
Released files (``adventurer_*_patch16_224.pth``) store the weights under ``"model"`` next to ``"model_ema"``;
:func:`ratelab.core.checkpoint.read_state_dict` unwraps ``model`` (``model_ema`` with ``use_ema=True``) before the
filter runs.

No tensor needs a transpose or a reshape: the stem is a Conv2d in both codes and the Mamba-2 tensors are identical.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ratelab.core.checkpoint import CheckpointError
from ratelab.core.keymap import KeyMap
from ratelab.layers.patch import resample_pos_embed

_MIXER_KEYS = (
    "in_proj.weight",
    "conv1d.weight",
    "conv1d.bias",
    "dt_bias",
    "A_log",
    "D",
    "norm.weight",
    "out_proj.weight",
)

# Official key -> ratelab key. ``{i}`` is the block index (kept as is). Every official tensor is listed.
OFFICIAL_KEY_MAP: dict[str, str] = {
    "patch_embed.proj.weight": "patch_embed.proj.weight",
    "patch_embed.proj.bias": "patch_embed.proj.bias",
    "cls_token": "cls_token",
    "pos_embed": "pos_embed",
    "layers.{i}.norm.weight": "blocks.{i}.norm1.weight",
    **{f"layers.{{i}}.mixer.{k}": f"blocks.{{i}}.mixer.{k}" for k in _MIXER_KEYS},
    "layers.{i}.norm_mlp.weight": "blocks.{i}.norm2.weight",
    "layers.{i}.mlp.w1.weight": "blocks.{i}.mlp.fc1_g.weight",
    "layers.{i}.mlp.w1.bias": "blocks.{i}.mlp.fc1_g.bias",
    "layers.{i}.mlp.w2.weight": "blocks.{i}.mlp.fc1_x.weight",
    "layers.{i}.mlp.w2.bias": "blocks.{i}.mlp.fc1_x.bias",
    "layers.{i}.mlp.w3.weight": "blocks.{i}.mlp.fc2.weight",
    "layers.{i}.mlp.w3.bias": "blocks.{i}.mlp.fc2.bias",
    "norm_f.weight": "norm.weight",
    "head.weight": "head.weight",
    "head.bias": "head.bias",
}

RATELAB_SIGNATURE = ("norm.weight", "blocks.0.mixer.in_proj.weight")
OFFICIAL_SIGNATURE = ("norm_f.weight", "layers.0.mixer.in_proj.weight")


KEY_MAP = KeyMap(OFFICIAL_KEY_MAP, ratelab_signature=RATELAB_SIGNATURE, official_signature=OFFICIAL_SIGNATURE)


def detect_layout(state_dict: dict[str, torch.Tensor]) -> str | None:
    """``"ratelab"``, ``"official"`` (wangf3014/Adventurer) or ``None`` when the keys match neither."""
    return KEY_MAP.detect_layout(state_dict)


def official_to_ratelab_key(key: str) -> str | None:
    """The ratelab key for one official key, or ``None`` when the key is not in :data:`OFFICIAL_KEY_MAP`."""
    return KEY_MAP.to_ratelab_key(key)


def map_official_keys(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename official keys to ratelab keys. Returns (renamed dict, official keys that matched no template)."""
    return KEY_MAP.map_keys(state_dict)


def _fit_pos_embed(state_dict: dict[str, torch.Tensor], model: Any) -> None:
    """Resample the file's position embedding in place when its patch grid differs from the model's.

    The class token's row is the LAST one; it is kept as is and only the N grid rows are resampled (the official
    fine-tuning code keeps the first row instead, see the model docstring).
    """
    pe = state_dict.get("pos_embed")
    own = model.pos_embed
    if pe is None or pe.ndim != 3 or pe.shape[1:] == own.shape[1:] or pe.shape[-1] != own.shape[-1]:
        return  # equal, absent, or a width mismatch the strict loader reports
    try:
        state_dict["pos_embed"] = resample_pos_embed(
            pe, model.grid_size, num_prefix_tokens=model.num_prefix_tokens, prefix_last=True
        )
    except ValueError as e:
        raise CheckpointError(f"pos_embed {tuple(pe.shape)} cannot be resampled to grid {model.grid_size}: {e}") from e


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: Any) -> dict[str, torch.Tensor]:
    """Turn an Adventurer state dict (ratelab or official layout) into ``model``'s keys.

    Args:
        state_dict: flat tensor dict, already unwrapped from ``model``/``model_ema`` containers and ``module.``
            prefixes (see :func:`ratelab.core.checkpoint.read_state_dict`).
        model: the :class:`ratelab.models.adventurer.Adventurer` that will receive the weights.

    Returns:
        A state dict with ratelab keys; ``pos_embed`` is resampled to the model's grid (class token kept last) when
        the file was trained at another image size. With ``num_classes=0`` the file's head is dropped.

    Raises:
        CheckpointError: the keys match neither layout, or an official file has keys outside the known map or a
            different depth/width than ``model``. The message lists the offending keys. (Missing keys and shape
            mismatches are reported by the strict loader that runs after this filter.)
    """
    layout = detect_layout(state_dict)
    if layout is None:
        keys = sorted(state_dict)
        raise CheckpointError(
            f"not an Adventurer checkpoint: expected ratelab keys {list(RATELAB_SIGNATURE)} or official "
            f"wangf3014/Adventurer keys {list(OFFICIAL_SIGNATURE)}. File keys ({len(keys)}): {keys[:16]}"
        )
    if layout == "ratelab":
        out = dict(state_dict)
    else:
        out, leftover = map_official_keys(state_dict)
        layers = {int(m.group(1)) for k in state_dict if (m := re.match(r"^layers\.(\d+)\.", k))}
        depth = max(layers) + 1 if layers else 0
        width = state_dict["norm_f.weight"].shape[0]
        problems = []
        if leftover:
            problems.append(f"keys outside the official Adventurer layout ({len(leftover)}): {leftover[:12]}")
        if (depth, width) != (model.cfg.depth, model.cfg.embed_dim):
            problems.append(
                f"file is an official Adventurer with depth {depth} and width {width}, the model has depth "
                f"{model.cfg.depth} and width {model.cfg.embed_dim} (pick the matching model or pass depth=/embed_dim=)"
            )
        if problems:
            raise CheckpointError("official Adventurer checkpoint does not fit: " + "; ".join(problems))
    if getattr(model, "num_classes", None) == 0:
        out = {k: v for k, v in out.items() if not k.startswith("head.")}
    _fit_pos_embed(out, model)
    return out


__all__ = [
    "OFFICIAL_KEY_MAP",
    "checkpoint_filter_fn",
    "detect_layout",
    "map_official_keys",
    "official_to_ratelab_key",
]
