"""Weight conversion for CRATE-MAE: ratelab's layout and the official Ma-Lab-Berkeley/CRATE ``model/crate_ae`` one.

The official ``MaskedAutoencoderViT`` keeps MAE's top-level names (``patch_embed.proj``, ``cls_token``,
``pos_embed``, ``norm``, ``decoder_embed``, ``mask_token``, ``decoder_pos_embed``, ``decoder_norm``,
``decoder_pred``), which ratelab uses as they are. Its blocks nest one ``layers`` ModuleList of two ``PreNorm``s:

* encoder ``blocks.{i}.layers.0`` = [PreNorm(Attention), PreNorm(ISTA FeedForward)];
* decoder ``decoder_blocks.{i}.layers.0`` = [PreNorm(linear FeedForward = D~), PreNorm(Attention)], i.e. the
  dictionary first. ratelab's decoder block names its pair after the encoder pair it inverts (``norm2`` +
  ``dictionary``, then ``norm1`` + ``attn``), hence ``.0.0`` -> ``norm2``/``dictionary`` and ``.0.1`` -> ``norm1``/
  ``attn`` below.

The attention output map is ``to_out = Sequential(Linear, Dropout)`` (``.to_out.0.``). No tensor needs a transpose:
both dictionaries are applied as ``F.linear(x, W)`` in both codes, and ``qkv`` splits as (head, head_dim) in both.
The official training runs through FAIR's MAE script, which saves ``{"model", "optimizer", "epoch", "scaler",
"args"}``; :func:`ratelab.core.checkpoint.read_state_dict` takes ``model`` (and refuses a file whose ``args`` would
need code-running unpickling, with the advice to re-save the state dict alone).

The number of heads is not recorded in a file (``qkv`` is (d, d) for any K): pick the model of the release.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ratelab.core.keymap import KeyMap, OfficialConverter, strip_prefixes

_SAME = ("patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "pos_embed", "norm.weight", "norm.bias",
         "decoder_embed.weight", "decoder_embed.bias", "mask_token", "decoder_pos_embed", "decoder_norm.weight",
         "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias")

# Official key -> ratelab key; ``{i}`` is the layer index (kept). Every official tensor is listed (the Dropouts hold
# none).
OFFICIAL_KEY_MAP: dict[str, str] = {
    **{k: k for k in _SAME},
    "blocks.{i}.layers.0.0.norm.weight": "blocks.{i}.norm1.weight",
    "blocks.{i}.layers.0.0.norm.bias": "blocks.{i}.norm1.bias",
    "blocks.{i}.layers.0.0.fn.qkv.weight": "blocks.{i}.attn.qkv.weight",
    "blocks.{i}.layers.0.0.fn.to_out.0.weight": "blocks.{i}.attn.proj.weight",
    "blocks.{i}.layers.0.0.fn.to_out.0.bias": "blocks.{i}.attn.proj.bias",
    "blocks.{i}.layers.0.1.norm.weight": "blocks.{i}.norm2.weight",
    "blocks.{i}.layers.0.1.norm.bias": "blocks.{i}.norm2.bias",
    "blocks.{i}.layers.0.1.fn.weight": "blocks.{i}.ista.weight",
    "decoder_blocks.{i}.layers.0.0.norm.weight": "decoder_blocks.{i}.norm2.weight",
    "decoder_blocks.{i}.layers.0.0.norm.bias": "decoder_blocks.{i}.norm2.bias",
    "decoder_blocks.{i}.layers.0.0.fn.weight": "decoder_blocks.{i}.dictionary.weight",
    "decoder_blocks.{i}.layers.0.1.norm.weight": "decoder_blocks.{i}.norm1.weight",
    "decoder_blocks.{i}.layers.0.1.norm.bias": "decoder_blocks.{i}.norm1.bias",
    "decoder_blocks.{i}.layers.0.1.fn.qkv.weight": "decoder_blocks.{i}.attn.qkv.weight",
    "decoder_blocks.{i}.layers.0.1.fn.to_out.0.weight": "decoder_blocks.{i}.attn.proj.weight",
    "decoder_blocks.{i}.layers.0.1.fn.to_out.0.bias": "decoder_blocks.{i}.attn.proj.bias",
}

RATELAB_SIGNATURE = ("blocks.0.ista.weight", "decoder_blocks.0.dictionary.weight")
OFFICIAL_SIGNATURE = ("blocks.0.layers.0.1.fn.weight", "decoder_blocks.0.layers.0.0.fn.weight")

KEY_MAP = KeyMap(OFFICIAL_KEY_MAP, ratelab_signature=RATELAB_SIGNATURE, official_signature=OFFICIAL_SIGNATURE)

FIXED_TABLES = ("pos_embed", "decoder_pos_embed")


def detect_layout(state_dict: dict[str, torch.Tensor]) -> str | None:
    """``"ratelab"``, ``"official"`` (Ma-Lab-Berkeley/CRATE ``model/crate_ae``) or ``None``."""
    return KEY_MAP.detect_layout(strip_prefixes(state_dict))


def _depth(sd: dict[str, torch.Tensor], prefix: str) -> int:
    blocks = {int(k[len(prefix):].split(".", 1)[0]) for k in sd if k.startswith(prefix)}
    return max(blocks) + 1 if blocks else 0


def _check_official(sd: dict[str, torch.Tensor], model: Any) -> list[str]:
    # Encoder and decoder depths separately (the skeleton's single depth would be the larger of the two).
    cfg = model.cfg
    width = sd["cls_token"].shape[-1] if "cls_token" in sd else -1
    depth, dec_depth = _depth(sd, "blocks."), _depth(sd, "decoder_blocks.")
    problems = []
    if (depth, dec_depth, width) != (cfg.depth, cfg.decoder_depth, cfg.embed_dim):
        problems.append(
            f"file is an official CRATE-MAE with depth {depth} + decoder_depth {dec_depth} and width {width}, the "
            f"model has {cfg.depth} + {cfg.decoder_depth} and {cfg.embed_dim} (pick the matching model or pass "
            "depth=/decoder_depth=/embed_dim=)"
        )
    pe, dpe = sd.get("pos_embed"), sd.get("decoder_pos_embed")
    if pe is not None and dpe is not None and pe.shape == dpe.shape and not torch.allclose(pe, dpe, atol=1e-6):
        problems.append("its pos_embed and decoder_pos_embed differ; the official encoder adds decoder_pos_embed, "
                        "ratelab's adds pos_embed, which are the same fixed sin-cos table in every official model")
    return problems


def _fill_identity_out_proj(out: dict[str, torch.Tensor], model: Any) -> None:
    # The official Attention has no output map (Identity) when heads == 1 and dim_head == dim: such files lack the
    # to_out keys, and identity weights reproduce the computation.
    d = model.cfg.embed_dim
    stacks = (("blocks", model.cfg.num_heads, model.cfg.depth),
              ("decoder_blocks", model.cfg.decoder_num_heads, model.cfg.decoder_depth))
    for prefix, heads, depth in stacks:
        if heads != 1:
            continue
        for i in range(depth):
            key = f"{prefix}.{i}.attn.proj.weight"
            if key not in out and f"{prefix}.{i}.attn.qkv.weight" in out:
                ref = out[f"{prefix}.{i}.attn.qkv.weight"]
                out[key] = torch.eye(d, dtype=ref.dtype)
                out[f"{prefix}.{i}.attn.proj.bias"] = torch.zeros(d, dtype=ref.dtype)


def fit_fixed_tables(state_dict: dict[str, torch.Tensor], model: Any, keys: tuple[str, ...] = FIXED_TABLES) -> None:
    """Replace, in place, fixed sin-cos tables of another grid (a file trained at another size) by the model's own.

    The tables are a function of the grid, not learned, so the model's table is the exact one for its size (MAE's
    fine-tuning code interpolates them instead). Tables of the model's shape are kept as the file has them.
    """
    for key in keys:
        t, own = state_dict.get(key), getattr(model, key, None)
        if t is None or not isinstance(own, torch.Tensor):
            continue
        if t.ndim == 3 and t.shape[-1] == own.shape[-1] and t.shape != own.shape:
            state_dict[key] = own.detach().clone()


_CONVERTER = OfficialConverter(
    family="CRATE-MAE",
    source="Ma-Lab-Berkeley/CRATE (model/crate_ae)",
    key_map=KEY_MAP,
    width_key=None,
    head_prefixes=(),
    pos_embed_key=None,
    check_official=_check_official,
    fix_official=_fill_identity_out_proj,
    model_pattern="crate_mae_*",
)


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: Any) -> dict[str, torch.Tensor]:
    """Turn a CRATE-MAE state dict (ratelab or official layout) into ``model``'s keys.

    ``state_dict`` is a flat tensor dict (``{"model": ...}`` containers and ``module.`` prefixes are unwrapped by
    :func:`ratelab.core.checkpoint.read_state_dict`; prefixes also here). The fixed position tables of a file of
    another image size are replaced by the model's (:func:`fit_fixed_tables`).

    Raises:
        CheckpointError: keys of neither layout (naming the family they match, if any), official keys outside
            :data:`OFFICIAL_KEY_MAP`, another encoder/decoder depth or width, or differing official tables.
    """
    out = _CONVERTER(state_dict, model)
    fit_fixed_tables(out, model)
    return out


def convert_official(path_in: str | os.PathLike, out_dir: str | os.PathLike, model_name: str, **kwargs: Any) -> Path:
    """Convert an official CRATE-MAE checkpoint to ratelab's format (``model.safetensors`` + config).

    Args:
        path_in: official ``.pth`` file (plain, ``{"model": ...}`` wrapped, or with ``module.`` prefixes).
        out_dir: directory to write; created if needed.
        model_name: ratelab registry name with the file's architecture, e.g. ``"crate_mae_base_patch16_224"``.
        **kwargs: forwarded to :func:`ratelab.create_model` (``img_size``, ``depth`` ...).

    Returns:
        Path of the written ``model.safetensors``.
    """
    from ratelab.models._factory import convert_official as convert

    return convert(path_in, out_dir, model_name, detect_layout=detect_layout, source=_CONVERTER.source, **kwargs)


__all__ = ["FIXED_TABLES", "OFFICIAL_KEY_MAP", "checkpoint_filter_fn", "convert_official", "detect_layout",
           "fit_fixed_tables"]
