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

import os
from pathlib import Path
from typing import Any

import torch

from ratelab.core.keymap import KeyMap, OfficialConverter
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


checkpoint_filter_fn = OfficialConverter(
    family="Adventurer",
    source="wangf3014/Adventurer",
    key_map=KEY_MAP,
    width_key=("norm_f.weight", 0),
    resample_pos_embed=resample_pos_embed,
    prefix_last=True,  # the class token's row is the LAST one (kept as is; only the N grid rows are resampled)
)
"""Turn an Adventurer state dict (ratelab or official layout) into ``model``'s keys: ``converter(sd, model)``.

``state_dict`` is a flat tensor dict (``model``/``model_ema`` containers and ``module.`` prefixes are unwrapped by
:func:`ratelab.core.checkpoint.read_state_dict`); ``model`` is the :class:`ratelab.models.adventurer.Adventurer` that
receives it. ``pos_embed`` is resampled to the model's grid with the class token kept last (the official fine-tuning
code keeps the first row instead, see the model docstring); with ``num_classes=0`` the head is dropped. A file that
matches neither layout, has keys outside the official map or another depth/width than ``model`` raises
:class:`~ratelab.core.errors.CheckpointError` naming the keys (missing keys and shape mismatches are reported by the
strict loader that runs after this filter).
"""


def convert_official(path_in: str | os.PathLike, out_dir: str | os.PathLike, model_name: str, **kwargs: Any) -> Path:
    """Convert an official wangf3014/Adventurer checkpoint to ratelab's format (``model.safetensors`` + config).

    Args:
        path_in: official ``.pth`` (``{"model": ..., "model_ema": ...}`` as released, or plain / ``module.``-prefixed).
        out_dir: directory to write; created if needed.
        model_name: ratelab registry name with the file's architecture, e.g. ``"adventurer_base_patch16_224"``.
        **kwargs: forwarded to :func:`ratelab.create_model` (``img_size``, ``flip`` ...). ``num_classes`` defaults to
            the width of the file's classifier.

    Returns:
        Path of the written ``model.safetensors``.
    """
    from ratelab.models._factory import convert_official as convert

    return convert(path_in, out_dir, model_name, detect_layout=detect_layout, official_head="head.weight",
                   source="wangf3014/Adventurer", **kwargs)


__all__ = [
    "OFFICIAL_KEY_MAP",
    "checkpoint_filter_fn",
    "convert_official",
    "detect_layout",
    "map_official_keys",
    "official_to_ratelab_key",
]
