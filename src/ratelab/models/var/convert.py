"""Weight conversion for the VAR family (FoundationVision/VAR; M-VAR's tokenizer is the same file).

The weights registry names :func:`checkpoint_filter_fn` for every ``var_*`` release; it dispatches on the model
(the tokenizer here; VAR / M-VAR add their branch).

Tokenizer (``vae_ch160v4096z32.pth``): ratelab's :class:`~ratelab.models.var.vqvae.VQVAE` keeps the official
key names (``encoder.*``, ``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*``, ``quantize.embedding.weight``,
``quantize.quant_resi.qresi_ls.{j}.*``, ``quantize.ema_vocab_hit_SV``), so the two layouts are one and the map is
the identity. What the converter adds: the file is recognized (an error naming what it is otherwise), its widths
are checked against the model's (ch, vocab, C_vae, number of phi convs, named in the error), and the codebook-usage
buffer of a file with another number of scales is replaced by the model's own (the official ``load_state_dict``
does the same: it is a training statistic, not a weight).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ratelab.core.errors import CheckpointError
from ratelab.core.keymap import KeyMap, OfficialConverter, strip_prefixes

__all__ = ["VQVAE_SIGNATURE", "checkpoint_filter_fn", "convert_vqvae_checkpoint", "convert_vqvae_official",
           "detect_vqvae_layout"]

VQVAE_SIGNATURE = ("quantize.embedding.weight", "encoder.conv_in.weight", "decoder.conv_out.weight",
                   "post_quant_conv.weight")
_EMA = "quantize.ema_vocab_hit_SV"

# Same names in both layouts: the signature is the official one and the table maps every key to itself.
_VQVAE_KEY_MAP = KeyMap({}, ratelab_signature=VQVAE_SIGNATURE, official_signature=VQVAE_SIGNATURE)
_VQVAE_CONVERTER = OfficialConverter(
    family="VAR tokenizer", source="FoundationVision/VAR (models/vqvae.py)", key_map=_VQVAE_KEY_MAP,
    width_key=None, head_prefixes=(), pos_embed_key=None, model_pattern="var_vae_*",
)


def detect_vqvae_layout(state_dict: dict[str, torch.Tensor]) -> str | None:
    """``"official"`` (also ratelab's: the same keys) for a VAR tokenizer state dict, else ``None``."""
    return "official" if _VQVAE_KEY_MAP.detect_layout(strip_prefixes(state_dict)) else None


def _vqvae_problems(sd: dict[str, torch.Tensor], model: Any) -> list[str]:
    cfg = model.cfg
    have = {
        "vocab_size": sd["quantize.embedding.weight"].shape[0],
        "z_channels": sd["quantize.embedding.weight"].shape[1],
        "ch": sd["encoder.conv_in.weight"].shape[0],
        "in_channels": sd["encoder.conv_in.weight"].shape[1],
    }
    want = {k: getattr(cfg, k) for k in have}
    wrong = [f"{k}={have[k]} (model {want[k]})" for k in have if have[k] != want[k]]
    levels = {int(k.split(".")[2]) for k in sd if k.startswith("encoder.down.")}
    if levels and len(levels) != len(cfg.ch_mult):
        wrong.append(f"{len(levels)} encoder levels (model ch_mult={cfg.ch_mult})")
    if wrong:
        return [f"file has {', '.join(wrong)}; build the tokenizer with these values"]
    return []


def convert_vqvae_checkpoint(state_dict: dict[str, torch.Tensor], model: Any) -> dict[str, torch.Tensor]:
    """A VAR tokenizer state dict (official = ratelab layout) -> ``model``'s keys.

    Raises:
        CheckpointError: not a tokenizer file (naming the family it belongs to, if any) or widths that differ
            from the model's (named). Remaining key/shape mismatches are reported by the strict load.
    """
    out = _VQVAE_CONVERTER(state_dict, model)
    problems = _vqvae_problems(out, model)
    if problems:
        raise CheckpointError("official VAR tokenizer checkpoint does not fit: " + "; ".join(problems))
    own = model.quantize.ema_vocab_hit_SV
    if _EMA not in out or out[_EMA].shape != own.shape:
        out[_EMA] = own.detach().clone()
    return out


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: Any) -> dict[str, torch.Tensor]:
    """The VAR family's converter (named by the weights registry): dispatches on the receiving model."""
    from ratelab.models.var.vqvae import VQVAE

    if isinstance(model, VQVAE):
        return convert_vqvae_checkpoint(state_dict, model)
    own = getattr(type(model), "checkpoint_filter_fn", None)
    if own is None:
        raise CheckpointError(f"no VAR-family converter for a {type(model).__name__}")
    return own(state_dict, model)


def convert_vqvae_official(path_in: str | os.PathLike, out_dir: str | os.PathLike,
                           model_name: str = "var_vae_ch160v4096z32", **kwargs: Any) -> Path:
    """Convert an official tokenizer file to ratelab's format (``model.safetensors`` + config).

    Args:
        path_in: ``vae_ch160v4096z32.pth`` (or a tokenizer of the same layout).
        out_dir: directory to write.
        model_name: registry name; ``**kwargs`` (``ch``, ``vocab_size``, ``patch_nums`` ...) go to create_model.
    """
    from ratelab.models._factory import convert_official as convert

    return convert(path_in, out_dir, model_name, detect_layout=detect_vqvae_layout,
                   source=_VQVAE_CONVERTER.source, **kwargs)
