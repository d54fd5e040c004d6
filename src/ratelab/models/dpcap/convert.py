"""Weight loading for DP-Cap: the released ``MaskedAutoencoderViT_autoregressive`` layout (facebookresearch/dpcap
``models_mae.py``, ``model/torch_transformer.py``; the README's ``base-eps7.pth`` holds it under ``"model"``).

Official -> ratelab names (the encoder, its norm, the bridge and the decoder layers keep theirs):

=========================================== ==========================================
``text_embedding_layer_SimVLM.weight``      ``text_embed.weight``
``text_decoder_pos_embed``                  ``text_pos_embed`` (the decoder's 1-D table)
``decoder_pred_text.0.*`` / ``.1.*``        ``head_norm.*`` / ``head.*``
=========================================== ==========================================

Left out, because captioning never reads them: ``mask_token`` and ``mask_token_text`` (masking and parallel
decoding), the encoder-side ``text_pos_embed`` and ``encoder_text_type_embedding`` (the released class's unused
text-encoder path) and each decoder layer's ``self_attn.bias`` (a lower-triangular mask buffer; ours is a flag).
"""

from __future__ import annotations

from typing import Any

import torch

from ratelab.core.keymap import KeyMap, OfficialConverter, strip_prefixes
from ratelab.models.crate_mae.convert import fit_fixed_tables

_BLOCK = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.proj.weight", "attn.proj.bias", "norm2.weight",
          "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")
_DEC = ("self_attn.c_attn.weight", "self_attn.c_proj.weight", "multihead_attn.q_proj.weight",
        "multihead_attn.kv_proj.weight", "multihead_attn.c_proj.weight", "linear1.weight", "linear2.weight",
        "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "norm3.weight", "norm3.bias")
_SAME = ("patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "pos_embed", "encoder_image_type_embedding",
         "norm.weight", "norm.bias", "decoder_embed.weight", "decoder_embed.bias", "decoder_pos_embed",
         "decoder_image_type_embedding", "decoder_text_type_embedding")
_RENAMED = {"text_embedding_layer_SimVLM.weight": "text_embed.weight", "text_decoder_pos_embed": "text_pos_embed",
            "decoder_pred_text.0.weight": "head_norm.weight", "decoder_pred_text.0.bias": "head_norm.bias",
            "decoder_pred_text.1.weight": "head.weight", "decoder_pred_text.1.bias": "head.bias"}
OFFICIAL_UNUSED = ("mask_token", "mask_token_text", "text_pos_embed", "encoder_text_type_embedding")

TABLE: dict[str, str] = {**{k: k for k in _SAME}, **_RENAMED,
                         **{f"blocks.{{i}}.{k}": f"blocks.{{i}}.{k}" for k in _BLOCK},
                         **{f"decoder.layers.{{i}}.{k}": f"decoder.layers.{{i}}.{k}" for k in _DEC}}
OFFICIAL_SIGNATURE = ("text_embedding_layer_SimVLM.weight", "decoder_pred_text.1.weight", "decoder_embed.weight")
RATELAB_SIGNATURE = ("text_embed.weight", "head_norm.weight", "decoder_embed.weight")

KEY_MAP = KeyMap(TABLE, ratelab_signature=RATELAB_SIGNATURE, official_signature=OFFICIAL_SIGNATURE)


def _check_official(sd: dict[str, torch.Tensor], model: Any) -> list[str]:
    cfg, problems = model.cfg, []
    if "blocks.0.attn.qkv.bias" in sd:
        problems.append("the file has qkv biases (a released non-'nobias' config); DP-Cap's model has none")
    if any(k.startswith("decoder.layers.0.") and k.endswith(".bias") and "norm" not in k for k in sd):
        problems.append("the file's decoder Linears have biases; build the model with decoder_bias=True")
    vocab = sd["text_embedding_layer_SimVLM.weight"].shape
    if tuple(vocab) != (cfg.vocab_size, cfg.decoder_dim):
        problems.append(f"text embedding {tuple(vocab)}, model (vocab_size, decoder_dim) = "
                        f"({cfg.vocab_size}, {cfg.decoder_dim})")
    layers = {int(k.split(".")[2]) for k in sd if k.startswith("decoder.layers.")}
    blocks = {int(k.split(".")[1]) for k in sd if k.startswith("blocks.")}
    if (len(blocks), len(layers)) != (cfg.depth, cfg.decoder_depth):
        problems.append(f"file: {len(blocks)} encoder blocks and {len(layers)} decoder layers, model: {cfg.depth} and "
                        f"{cfg.decoder_depth}")
    return problems


_CONVERTER = OfficialConverter(
    family="DP-Cap",
    source="facebookresearch/dpcap (models_mae)",
    key_map=KEY_MAP,
    width_key=("cls_token", -1),
    head_prefixes=(),
    pos_embed_key=None,
    check_official=_check_official,
    model_pattern="dpcap_*",
)


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: Any) -> dict[str, torch.Tensor]:
    """A DP-Cap state dict (ratelab's names or the released layout, optionally under ``"model"``) for ``model``.

    Raises:
        CheckpointError: not a DP-Cap file (naming the family its keys match, if any), or one that does not fit
            (biases, vocabulary, depths named).
    """
    if isinstance(state_dict.get("model"), dict):
        state_dict = state_dict["model"]
    sd = strip_prefixes(state_dict)
    if all(k in sd for k in OFFICIAL_SIGNATURE):
        sd = {k: v for k, v in sd.items() if k not in OFFICIAL_UNUSED
              and not (k.startswith("decoder.layers.") and k.endswith(".self_attn.bias"))}
    out = _CONVERTER(sd, model)
    fit_fixed_tables(out, model, ("pos_embed", "decoder_pos_embed"))
    return out


__all__ = ["KEY_MAP", "OFFICIAL_UNUSED", "checkpoint_filter_fn"]
