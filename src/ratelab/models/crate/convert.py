"""Weight conversion for CRATE: ratelab's own layout and the official Ma-Lab-Berkeley/CRATE layout.

The official classifier (``model/crate.py`` in Ma-Lab-Berkeley/CRATE) nests its modules as
``to_patch_embedding = Sequential(Rearrange, LayerNorm, Linear, LayerNorm)``,
``transformer.layers[i] = [PreNorm(Attention), PreNorm(FeedForward)]`` and ``mlp_head = Sequential(LayerNorm, Linear)``;
its attention output map is ``to_out = Sequential(Linear, Dropout)``, hence the ``.to_out.0.`` keys. Its released
training script saves ``{"epoch", "arch", "state_dict", "best_acc1", "optimizer", "scheduler"}`` with DataParallel
``module.`` prefixes; :func:`ratelab.core.checkpoint.read_state_dict` unwraps both before the filter runs.

No tensor needs a transpose or a reshape:

* the stem flattens a patch as (row, column, channel) in both codes, so the first LayerNorm and Linear line up;
* the ISTA dictionary D is applied as ``F.linear(x, D)`` in both codes (same orientation);
* ``qkv`` is one bias-free Linear whose output splits as (head, head_dim) in both codes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ratelab.core.keymap import KeyMap, OfficialConverter
from ratelab.layers.patch import resample_pos_embed

# Official key -> ratelab key. ``{i}`` is the layer index (kept as is). Every official tensor is listed; the
# Rearrange at ``to_patch_embedding.0`` and the two Dropouts hold no parameters.
OFFICIAL_KEY_MAP: dict[str, str] = {
    "cls_token": "cls_token",
    "pos_embedding": "pos_embed",
    "to_patch_embedding.1.weight": "patch_norm.weight",
    "to_patch_embedding.1.bias": "patch_norm.bias",
    "to_patch_embedding.2.weight": "patch_proj.weight",
    "to_patch_embedding.2.bias": "patch_proj.bias",
    "to_patch_embedding.3.weight": "patch_post_norm.weight",
    "to_patch_embedding.3.bias": "patch_post_norm.bias",
    "transformer.layers.{i}.0.norm.weight": "blocks.{i}.norm1.weight",
    "transformer.layers.{i}.0.norm.bias": "blocks.{i}.norm1.bias",
    "transformer.layers.{i}.0.fn.qkv.weight": "blocks.{i}.attn.qkv.weight",
    "transformer.layers.{i}.0.fn.to_out.0.weight": "blocks.{i}.attn.proj.weight",
    "transformer.layers.{i}.0.fn.to_out.0.bias": "blocks.{i}.attn.proj.bias",
    "transformer.layers.{i}.1.norm.weight": "blocks.{i}.norm2.weight",
    "transformer.layers.{i}.1.norm.bias": "blocks.{i}.norm2.bias",
    "transformer.layers.{i}.1.fn.weight": "blocks.{i}.ista.weight",
    "mlp_head.0.weight": "fc_norm.weight",
    "mlp_head.0.bias": "fc_norm.bias",
    "mlp_head.1.weight": "head.weight",
    "mlp_head.1.bias": "head.bias",
}

# Keys that identify a layout. A timm ViT shares ``cls_token``/``pos_embed``/``blocks.*`` with ratelab, so the
# signatures use the stem, which differs in all three.
RATELAB_SIGNATURE = ("patch_proj.weight", "patch_post_norm.weight")
OFFICIAL_SIGNATURE = ("pos_embedding", "to_patch_embedding.2.weight")


KEY_MAP = KeyMap(OFFICIAL_KEY_MAP, ratelab_signature=RATELAB_SIGNATURE, official_signature=OFFICIAL_SIGNATURE)


def detect_layout(state_dict: dict[str, torch.Tensor]) -> str | None:
    """``"ratelab"``, ``"official"`` (Ma-Lab-Berkeley/CRATE) or ``None`` when the keys match neither."""
    return KEY_MAP.detect_layout(state_dict)


def official_to_ratelab_key(key: str) -> str | None:
    """The ratelab key for one official key, or ``None`` when the key is not in :data:`OFFICIAL_KEY_MAP`."""
    return KEY_MAP.to_ratelab_key(key)


def map_official_keys(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename official keys to ratelab keys. Returns (renamed dict, official keys that matched no template)."""
    return KEY_MAP.map_keys(state_dict)


def _fill_identity_out_proj(out: dict[str, torch.Tensor], model: Any) -> None:
    # The official Attention replaces ``to_out`` by Identity when heads == 1 and dim_head == dim, so such files
    # have no output-map keys; ratelab always has the Linear, and identity weights reproduce the computation.
    d, inner = model.cfg.embed_dim, model.cfg.inner_dim
    if model.cfg.num_heads != 1 or inner != d:
        return
    for i in range(model.cfg.depth):
        if f"blocks.{i}.attn.proj.weight" not in out and f"blocks.{i}.norm1.weight" in out:
            ref = out[f"blocks.{i}.norm1.weight"]
            out[f"blocks.{i}.attn.proj.weight"] = torch.eye(d, dtype=ref.dtype)
            out[f"blocks.{i}.attn.proj.bias"] = torch.zeros(d, dtype=ref.dtype)


checkpoint_filter_fn = OfficialConverter(
    family="CRATE",
    source="Ma-Lab-Berkeley/CRATE",
    key_map=KEY_MAP,
    width_key=("cls_token", -1),
    resample_pos_embed=resample_pos_embed,
    fix_official=_fill_identity_out_proj,
)
"""Turn a CRATE state dict (ratelab or official layout) into ``model``'s keys: ``checkpoint_filter_fn(sd, model)``.

``state_dict`` is a flat tensor dict (containers and ``module.`` prefixes are unwrapped by
:func:`ratelab.core.checkpoint.read_state_dict`); ``model`` is the :class:`ratelab.models.crate.Crate` that receives
it. ``pos_embed`` is resampled to the model's grid when the file was trained at another image size; with
``num_classes=0`` the file's head is dropped. A file that matches neither layout, has keys outside the official map
or another depth/width than ``model`` raises :class:`~ratelab.core.errors.CheckpointError` naming the keys. The
CRATE quirk: an official model with one head of the full width has no output map, which is filled in as identity.
"""


def convert_official(path_in: str | os.PathLike, out_dir: str | os.PathLike, model_name: str, **kwargs: Any) -> Path:
    """Convert an official Ma-Lab-Berkeley/CRATE checkpoint to ratelab's format (``model.safetensors`` + config).

    Args:
        path_in: official ``.pth``/``.pth.tar`` file (plain, ``{"state_dict": ...}``/``{"model": ...}`` wrapped, or
            with DataParallel ``module.`` prefixes).
        out_dir: directory to write; created if needed.
        model_name: ratelab registry name with the file's architecture, e.g. ``"crate_base_patch16_224"``.
        **kwargs: forwarded to :func:`ratelab.create_model` (``img_size``, ``depth`` ...). ``num_classes`` defaults
            to the width of the file's classifier.

    Returns:
        Path of the written ``model.safetensors``.
    """
    from ratelab.models._factory import convert_official as convert

    return convert(path_in, out_dir, model_name, detect_layout=detect_layout, official_head="mlp_head.1.weight",
                   source="Ma-Lab-Berkeley/CRATE", **kwargs)


__all__ = [
    "OFFICIAL_KEY_MAP",
    "checkpoint_filter_fn",
    "convert_official",
    "detect_layout",
    "map_official_keys",
    "official_to_ratelab_key",
]
