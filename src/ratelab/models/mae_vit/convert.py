"""Weight loading for ViT-MAE: FAIR MAE's ``models_mae`` layout, which is also ratelab's.

The model uses the reference names unchanged (``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.{i}.*``,
``norm``, ``decoder_embed``, ``mask_token``, ``decoder_pos_embed``, ``decoder_blocks.{i}.*``, ``decoder_norm``,
``decoder_pred``; inside a block timm's ``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``),
so a FAIR file loads as it is once unwrapped (``{"model": ...}``, ``module.`` prefixes). The filter recognizes the
layout, names the family of a file that is something else, explains the two usual misfits (qkv biases, decoder
width) and replaces the fixed sin-cos tables of a file trained at another image size by the model's.

FAIR's released ``mae_pretrain_vit_*.pth`` hold the encoder only (for fine-tuning): not a masked autoencoder, they
are refused as "a timm/DeiT ViT checkpoint". Its ``mae_visualize_vit_large.pth`` is a whole MAE
(``mae_vit_large_patch16_dec512d8b_224``).
"""

from __future__ import annotations

from typing import Any

import torch

from ratelab.core.errors import CheckpointError
from ratelab.core.keymap import KeyMap, OfficialConverter
from ratelab.models.crate_mae.convert import fit_fixed_tables

_TOP = ("patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "pos_embed", "norm.weight", "norm.bias",
        "decoder_embed.weight", "decoder_embed.bias", "mask_token", "decoder_pos_embed", "decoder_norm.weight",
        "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias")
_BLOCK = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
          "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")

# Every key of FAIR's MaskedAutoencoderViT (``attn.qkv.bias`` only with qkv_bias=True); the map is the identity.
FAIR_KEYS: tuple[str, ...] = (*_TOP, *(f"{s}.{{i}}.{k}" for s in ("blocks", "decoder_blocks") for k in _BLOCK))
SIGNATURE = ("decoder_embed.weight", "decoder_pred.weight", "decoder_blocks.0.mlp.fc1.weight")

KEY_MAP = KeyMap({k: k for k in FAIR_KEYS}, ratelab_signature=SIGNATURE, official_signature=SIGNATURE)

_CONVERTER = OfficialConverter(
    family="ViT-MAE",
    source="facebookresearch/mae (models_mae)",
    key_map=KEY_MAP,
    width_key=None,
    head_prefixes=(),
    pos_embed_key=None,
    model_pattern="mae_vit_*",
)


def _depth(sd: dict[str, torch.Tensor], prefix: str) -> int:
    blocks = {int(k[len(prefix):].split(".", 1)[0]) for k in sd if k.startswith(prefix) and k[len(prefix)].isdigit()}
    return max(blocks) + 1 if blocks else 0


def _misfits(sd: dict[str, torch.Tensor], model: Any) -> list[str]:
    cfg = model.cfg
    problems = []
    has_bias = "blocks.0.attn.qkv.bias" in sd
    if has_bias != cfg.qkv_bias:
        problems.append(f"the file {'has' if has_bias else 'has no'} qkv biases, the model "
                        f"{'has' if cfg.qkv_bias else 'has none'} (build it with qkv_bias={has_bias}; FAIR's MAE has "
                        "them: mae_vit_*_dec512d8b_224)")
    shape = {k: tuple(sd[k].shape) for k in ("cls_token", "mask_token") if k in sd}
    file_arch = (_depth(sd, "blocks."), shape.get("cls_token", (-1,))[-1], _depth(sd, "decoder_blocks."),
                 shape.get("mask_token", (-1,))[-1])
    model_arch = (cfg.depth, cfg.embed_dim, cfg.decoder_depth, cfg.decoder_embed_dim)
    if file_arch != model_arch:
        problems.append("file: depth {} x width {}, decoder {} x {}; model: depth {} x width {}, decoder {} x {} (pass "
                        "depth=/embed_dim=/decoder_depth=/decoder_embed_dim=, e.g. FAIR's decoders are 8 x 512)"
                        .format(*file_arch, *model_arch))
    return problems


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: Any) -> dict[str, torch.Tensor]:
    """A ViT-MAE state dict (FAIR's ``models_mae`` names) for ``model``: prefixes stripped, fit checked, fixed
    tables of another grid replaced by the model's.

    Raises:
        CheckpointError: not a ViT-MAE (naming the family the keys match, if any), or one of another architecture
            (qkv biases, depths, widths named).
    """
    out = _CONVERTER(state_dict, model)
    problems = _misfits(out, model)
    if problems:
        raise CheckpointError("ViT-MAE checkpoint does not fit: " + "; ".join(problems))
    fit_fixed_tables(out, model)
    return out


__all__ = ["FAIR_KEYS", "checkpoint_filter_fn"]
