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


# ---- VAR and M-VAR transformers ----------------------------------------------------------------------------------
# Official (FoundationVision/VAR models/var.py + basic_var.py; OliverRensu/MVAR basic_mvar.py) -> ratelab. The
# official buffers (attention mask, level ids, zero k bias, M-VAR's per-block scale sizes) are recomputed from
# patch_nums by ratelab's models: they are mapped to a holding name, checked against the model, and dropped.
_BUFFER = "_official_buffer."
_MAMBA_KEYS = ("in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "norm.weight",
               "out_proj.weight")
_VAR_KEY_MAP: dict[str, str] = {
    "word_embed.weight": "word_embed.weight",
    "word_embed.bias": "word_embed.bias",
    "class_emb.weight": "class_emb.weight",
    "pos_start": "pos_start",
    "pos_1LC": "pos_embed",
    "lvl_embed.weight": "lvl_embed.weight",
    "blocks.{i}.ada_lin.1.weight": "blocks.{i}.ada_lin.weight",
    "blocks.{i}.ada_lin.1.bias": "blocks.{i}.ada_lin.bias",
    "blocks.{i}.attn.mat_qkv.weight": "blocks.{i}.attn.qkv.weight",
    "blocks.{i}.attn.q_bias": "blocks.{i}.attn.q_bias",
    "blocks.{i}.attn.v_bias": "blocks.{i}.attn.v_bias",
    "blocks.{i}.attn.scale_mul_1H11": "blocks.{i}.attn.logit_scale",
    "blocks.{i}.attn.proj.weight": "blocks.{i}.attn.proj.weight",
    "blocks.{i}.attn.proj.bias": "blocks.{i}.attn.proj.bias",
    "blocks.{i}.ffn.fc1.weight": "blocks.{i}.mlp.fc1.weight",
    "blocks.{i}.ffn.fc1.bias": "blocks.{i}.mlp.fc1.bias",
    "blocks.{i}.ffn.fc2.weight": "blocks.{i}.mlp.fc2.weight",
    "blocks.{i}.ffn.fc2.bias": "blocks.{i}.mlp.fc2.bias",
    "head_nm.ada_lin.1.weight": "head_adaln.proj.weight",
    "head_nm.ada_lin.1.bias": "head_adaln.proj.bias",
    "head.weight": "head.weight",
    "head.bias": "head.bias",
    "attn_bias_for_masking": _BUFFER + "attn_bias_for_masking",
    "lvl_1L": _BUFFER + "lvl_1L",
    "blocks.{i}.attn.zero_k_bias": _BUFFER + "blocks.{i}.attn.zero_k_bias",
}
_MVAR_KEY_MAP: dict[str, str] = {
    **_VAR_KEY_MAP,
    **{f"blocks.{{i}}.mamba.{k}": f"blocks.{{i}}.mixer.{k}" for k in _MAMBA_KEYS},
    "blocks.{i}.attn.patch_nums": _BUFFER + "blocks.{i}.attn.patch_nums",
}
# The ratelab signatures name VAR's own embeddings: "pos_embed" + "blocks.0.attn.qkv.weight" alone is also every timm
# ViT, and a ViT file would then be called a VAR checkpoint.
VAR_KEY_MAP = KeyMap(_VAR_KEY_MAP, ratelab_signature=("class_emb.weight", "lvl_embed.weight",
                                                       "blocks.0.attn.qkv.weight"),
                     official_signature=("pos_1LC", "blocks.0.attn.mat_qkv.weight"))
MVAR_KEY_MAP = KeyMap(_MVAR_KEY_MAP, ratelab_signature=("class_emb.weight", "lvl_embed.weight",
                                                         "blocks.0.mixer.in_proj.weight"),
                      official_signature=("pos_1LC", "blocks.0.mamba.in_proj.weight"))


def _official_buffer_problems(sd: dict[str, torch.Tensor], model: Any, *, intra_scale: bool) -> list[str]:
    """The official buffers must be those of ``model``'s schedule; q/k normalization must match its option."""
    problems = []
    L, ids = model.L, model.scale_ids.cpu()
    mask = sd.get("attn_bias_for_masking")
    if mask is not None:
        allowed = (ids[None, :] == ids[:, None]) if intra_scale else (ids[None, :] <= ids[:, None])
        if tuple(mask.shape) != (1, 1, L, L):
            problems.append(f"attn_bias_for_masking {tuple(mask.shape)} != (1, 1, {L}, {L}): the file was built for "
                            f"another patch_nums than the model's {model.patch_nums}")
        elif not torch.equal(~torch.isneginf(mask[0, 0].float()), allowed):
            what = "block-diagonal (intra-scale)" if intra_scale else "block-causal"
            problems.append(f"attn_bias_for_masking is not the {what} mask of patch_nums {model.patch_nums}")
    lvl = sd.get("lvl_1L")
    if lvl is not None and (tuple(lvl.shape) != (1, L) or not torch.equal(lvl[0].long().cpu(), ids)):
        problems.append(f"lvl_1L {tuple(lvl.shape)} is not the scale index of patch_nums {model.patch_nums}")
    sizes = torch.tensor([p * p for p in model.patch_nums])
    for k, v in sd.items():
        if k.endswith("attn.zero_k_bias") and bool(v.ne(0).any()):
            problems.append(f"{k} is not zero")
        if k.endswith("attn.patch_nums") and not torch.equal(v.long().cpu(), sizes):
            problems.append(f"{k} = {v.tolist()} != the model's scale sizes {sizes.tolist()}")
    has_l2 = any(k.endswith("attn.scale_mul_1H11") for k in sd)
    if has_l2 != bool(model.cfg.attn_l2_norm):
        problems.append(f"the file {'has' if has_l2 else 'has no'} attn.scale_mul_1H11: build the model with "
                        f"attn_l2_norm={has_l2} (M-VAR's README: False for d16/d20)")
    V, C = model.vocab_size, model.cfg.embed_dim
    if "head.weight" in sd and tuple(sd["head.weight"].shape) != (V, C):
        problems.append(f"head.weight {tuple(sd['head.weight'].shape)}: vocab_size {sd['head.weight'].shape[0]} vs "
                        f"the model's {V}")
    if "class_emb.weight" in sd and sd["class_emb.weight"].shape[0] != model.num_classes + 1:
        problems.append(f"class_emb.weight has {sd['class_emb.weight'].shape[0]} rows = num_classes + 1, the model "
                        f"has num_classes={model.num_classes}")
    return problems


def _drop_buffers(out: dict[str, torch.Tensor], model: Any) -> None:
    for k in [k for k in out if k.startswith(_BUFFER)]:
        del out[k]


_VAR_CONVERTER = OfficialConverter(
    family="VAR", source="FoundationVision/VAR", key_map=VAR_KEY_MAP, width_key=("class_emb.weight", 1),
    head_prefixes=(), pos_embed_key=None, model_pattern="var_d*",
    check_official=lambda sd, m: _official_buffer_problems(sd, m, intra_scale=False), fix_official=_drop_buffers,
)
_MVAR_CONVERTER = OfficialConverter(
    family="M-VAR", source="OliverRensu/MVAR", key_map=MVAR_KEY_MAP, width_key=("class_emb.weight", 1),
    head_prefixes=(), pos_embed_key=None, model_pattern="mvar_d*", article="an",
    check_official=lambda sd, m: _official_buffer_problems(sd, m, intra_scale=True), fix_official=_drop_buffers,
)


def convert_var_checkpoint(state_dict: dict[str, torch.Tensor], model: Any) -> dict[str, torch.Tensor]:
    """A VAR state dict (ratelab or official ``var_d*.pth`` layout) -> ``model``'s keys.

    Raises:
        CheckpointError: an M-VAR file, a file of another depth/width/vocabulary/schedule, official buffers that do
            not match the model's schedule, or an ``attn_l2_norm`` mismatch (all named).
    """
    sd = strip_prefixes(state_dict)
    if any(".mamba." in k or ".mixer." in k for k in sd):
        raise CheckpointError("this is an M-VAR checkpoint (it has Mamba-2 keys): use an mvar_d* model")
    return _VAR_CONVERTER(sd, model)


def convert_mvar_checkpoint(state_dict: dict[str, torch.Tensor], model: Any) -> dict[str, torch.Tensor]:
    """An M-VAR state dict (ratelab or official OliverRensu/MVAR layout) -> ``model``'s keys.

    A depth-30 file offered to ``mvar_d32`` (the paper's "3.0B" vs the code's 3.66B, unresolved) is reported with
    the depth and width found: build ``mvar_d32(depth=30)`` for it.
    """
    return _MVAR_CONVERTER(strip_prefixes(state_dict), model)


def detect_var_layout(state_dict: dict[str, torch.Tensor]) -> str | None:
    sd = strip_prefixes(state_dict)
    return None if any(".mamba." in k or ".mixer." in k for k in sd) else VAR_KEY_MAP.detect_layout(sd)


def detect_mvar_layout(state_dict: dict[str, torch.Tensor]) -> str | None:
    return MVAR_KEY_MAP.detect_layout(strip_prefixes(state_dict))


def convert_var_official(path_in: str | os.PathLike, out_dir: str | os.PathLike, model_name: str,
                         **kwargs: Any) -> Path:
    """Convert an official ``var_d*.pth`` to ratelab's format (``model.safetensors`` + config)."""
    from ratelab.models._factory import convert_official as convert

    return convert(path_in, out_dir, model_name, detect_layout=detect_var_layout, source="FoundationVision/VAR",
                   **kwargs)


def convert_mvar_official(path_in: str | os.PathLike, out_dir: str | os.PathLike, model_name: str,
                          **kwargs: Any) -> Path:
    """Convert an official M-VAR ``d*.pth`` to ratelab's format (``model.safetensors`` + config)."""
    from ratelab.models._factory import convert_official as convert

    return convert(path_in, out_dir, model_name, detect_layout=detect_mvar_layout, source="OliverRensu/MVAR",
                   **kwargs)


__all__ += ["MVAR_KEY_MAP", "VAR_KEY_MAP", "convert_mvar_checkpoint", "convert_mvar_official",
            "convert_var_checkpoint", "convert_var_official", "detect_mvar_layout", "detect_var_layout"]
