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
import re
from pathlib import Path
from typing import Any

import torch

from ratelab.core.checkpoint import CheckpointError
from ratelab.core.keymap import KeyMap
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


def _official_shape(state_dict: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(depth, width) of an official state dict, read from its layer indices and the [CLS] token."""
    layers = {int(m.group(1)) for k in state_dict if (m := re.match(r"^transformer\.layers\.(\d+)\.", k))}
    width = state_dict["cls_token"].shape[-1] if "cls_token" in state_dict else -1
    return (max(layers) + 1 if layers else 0), width


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


def _fit_pos_embed(state_dict: dict[str, torch.Tensor], model: Any) -> None:
    """Resample the file's position embedding in place when its patch grid differs from the model's."""
    pe = state_dict.get("pos_embed")
    own = model.pos_embed
    if pe is None or pe.ndim != 3 or pe.shape[1:] == own.shape[1:] or pe.shape[-1] != own.shape[-1]:
        return  # equal, absent, or a width mismatch the strict loader reports
    try:
        state_dict["pos_embed"] = resample_pos_embed(pe, model.grid_size, num_prefix_tokens=model.num_prefix_tokens)
    except ValueError as e:
        raise CheckpointError(f"pos_embed {tuple(pe.shape)} cannot be resampled to grid {model.grid_size}: {e}") from e


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: Any) -> dict[str, torch.Tensor]:
    """Turn a CRATE state dict (ratelab or official layout) into ``model``'s keys.

    Args:
        state_dict: flat tensor dict, already unwrapped from ``model``/``state_dict`` containers and ``module.``
            prefixes (see :func:`ratelab.core.checkpoint.read_state_dict`).
        model: the :class:`ratelab.models.crate.Crate` that will receive the weights.

    Returns:
        A state dict with ratelab keys; ``pos_embed`` is resampled to the model's grid when the file was trained
        at another image size. With ``num_classes=0`` the file's head is dropped (features-only model).

    Raises:
        CheckpointError: the keys match neither layout, or an official file has keys outside the known map or a
            different depth/width than ``model``. The message lists the offending keys.
    """
    layout = detect_layout(state_dict)
    if layout is None:
        keys = sorted(state_dict)
        hint = " It looks like a timm/DeiT ViT checkpoint." if "patch_embed.proj.weight" in state_dict else ""
        raise CheckpointError(
            f"not a CRATE checkpoint: expected ratelab keys {list(RATELAB_SIGNATURE)} or official "
            f"Ma-Lab-Berkeley/CRATE keys {list(OFFICIAL_SIGNATURE)}.{hint} File keys ({len(keys)}): {keys[:16]}"
        )
    if layout == "ratelab":
        out = dict(state_dict)
    else:
        out, leftover = map_official_keys(state_dict)
        depth, width = _official_shape(state_dict)
        problems = []
        if leftover:
            problems.append(f"keys outside the official CRATE layout ({len(leftover)}): {leftover[:12]}")
        if (depth, width) != (model.cfg.depth, model.cfg.embed_dim):
            layer_of = {k: int(m.group(1)) for k in state_dict if (m := re.match(r"^transformer\.layers\.(\d+)\.", k))}
            extra = sorted(k for k, i in layer_of.items() if i >= model.cfg.depth)
            missing = sorted(
                k for k in model.state_dict() if (m := re.match(r"^blocks\.(\d+)\.", k)) and int(m.group(1)) >= depth
            )
            problems.append(
                f"file is an official CRATE with depth {depth} and width {width}, the model has depth "
                f"{model.cfg.depth} and width {model.cfg.embed_dim} (pick the matching model or pass depth=/embed_dim=)"
                + (f"; file layers beyond the model ({len(extra)} keys): {extra[:8]}" if extra else "")
                + (f"; model layers missing from the file ({len(missing)} keys): {missing[:8]}" if missing else "")
            )
            if width != model.cfg.embed_dim:
                own = model.state_dict()
                wrong = sorted(
                    f"{k} {tuple(v.shape)} vs model {tuple(own[new].shape)}"
                    for k, v in state_dict.items()
                    if (new := official_to_ratelab_key(k)) in own and v.shape != own[new].shape
                )
                problems.append(f"shape mismatches ({len(wrong)}): {wrong[:6]}")
        if problems:
            raise CheckpointError("official CRATE checkpoint does not fit: " + "; ".join(problems))
        _fill_identity_out_proj(out, model)
    if getattr(model, "num_classes", None) == 0:
        out = {k: v for k, v in out.items() if not k.startswith("head.")}
    _fit_pos_embed(out, model)
    return out


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
    from ratelab.core.checkpoint import read_state_dict, save_model
    from ratelab.core.registry import create_model

    sd = read_state_dict(path_in)
    if detect_layout(sd) != "official":
        raise CheckpointError(f"{path_in}: not an official Ma-Lab-Berkeley/CRATE checkpoint (no {OFFICIAL_SIGNATURE})")
    if kwargs.get("num_classes") is None and "mlp_head.1.weight" in sd:
        kwargs["num_classes"] = sd["mlp_head.1.weight"].shape[0]
    model = create_model(model_name, checkpoint_path=str(path_in), **kwargs)
    return save_model(model, out_dir)


__all__ = [
    "OFFICIAL_KEY_MAP",
    "checkpoint_filter_fn",
    "convert_official",
    "detect_layout",
    "map_official_keys",
    "official_to_ratelab_key",
]
