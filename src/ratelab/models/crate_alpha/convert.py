"""Weight conversion for CRATE-alpha: ratelab's layout, the official PyTorch port and the official JAX/Flax tree.

**PyTorch port** (UCSC-VLAA/CRATE-alpha ``torch_inference/model/crate_alpha.py``, the layout of the released
``torch/*.pth`` files, plain state dicts): ``conv1`` (the patch conv), ``cls_token``, ``pos_embedding``,
``transformer.layers[i] = [PreNorm(Attention), PreNorm(OvercompleteISTABlock)]`` and ``mlp_head = Sequential(
LayerNorm, Linear)``. No tensor needs a transpose: the conv kernel is (d, C, p, p) in both; ``qkv`` is one bias-free
Linear whose output splits as (head, head_dim) in both; ``to_out.0`` is the bias-free output Linear; ``D`` and
``D1`` are (d, 4d) and used as ``x @ D`` / ``A @ D^T`` in both; ``mlp_head.0`` is our final ``norm``.

**JAX/Flax tree** (``models/crate.py`` of the same repository; the trainer saves ``np.savez`` files whose names are
the tree paths joined by "/", under ``params/``, beside ``opt/`` and ``chrono/``). Flax stores Dense kernels as
(in, out), so ``head/kernel`` is transposed; the patch conv kernel is HWIO (p, p, C, d) -> (d, C, p, p); the
subspace attention's DenseGeneral kernels are ``proj`` (d, K, p) -> ``qkv.weight`` (K p, d) and ``out`` (K, p, d) ->
``proj.weight`` (d, K p); ``D``/``D1`` keep their orientation; LayerNorm ``scale`` is our ``weight``. The tree is
first renamed to the PyTorch port's keys, so both official layouts go through one converter and its checks. No
Flax checkpoint was available to this code: the mapping is tested on trees built in that layout from the module
definitions, not on a released file. bfloat16 arrays (stored by ``np.savez`` as 2-byte void) are recovered.
ratelab's ``checkpoint_path=`` reader takes torch and safetensors files only, so an ``.npz`` goes through
:func:`convert_flax` (to ratelab's format) or :func:`load_flax_weights` (into a model).

**Light recipe** (:func:`init_from_larger_patch`): start a model of another patch size from a checkpoint, as the
official fine-tuning does (``dont_load``: the patch kernel and the head; the position table resampled).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ratelab.core.checkpoint import array_to_tensor, load_state_dict_strict, read_npz, read_state_dict
from ratelab.core.errors import CheckpointError
from ratelab.core.keymap import KeyMap, OfficialConverter, strip_prefixes
from ratelab.models.crate_alpha.crate_alpha import resample_pos_embed_bilinear

# Official PyTorch-port key -> ratelab key. ``{i}`` is the layer index. Every port tensor is listed; the Dropouts
# and the port's unused ``to_latent`` Identity hold no parameters.
OFFICIAL_KEY_MAP: dict[str, str] = {
    "conv1.weight": "patch_embed.proj.weight",
    "conv1.bias": "patch_embed.proj.bias",
    "cls_token": "cls_token",
    "pos_embedding": "pos_embed",
    "transformer.layers.{i}.0.norm.weight": "blocks.{i}.norm1.weight",
    "transformer.layers.{i}.0.norm.bias": "blocks.{i}.norm1.bias",
    "transformer.layers.{i}.0.fn.qkv.weight": "blocks.{i}.attn.qkv.weight",
    "transformer.layers.{i}.0.fn.to_out.0.weight": "blocks.{i}.attn.proj.weight",
    "transformer.layers.{i}.1.norm.weight": "blocks.{i}.norm2.weight",
    "transformer.layers.{i}.1.norm.bias": "blocks.{i}.norm2.bias",
    "transformer.layers.{i}.1.fn.D": "blocks.{i}.odl.D",
    "transformer.layers.{i}.1.fn.D1": "blocks.{i}.odl.D_hat",
    "mlp_head.0.weight": "norm.weight",
    "mlp_head.0.bias": "norm.bias",
    "mlp_head.1.weight": "head.weight",
    "mlp_head.1.bias": "head.bias",
}

# Keys that identify a layout: the ODL dictionary is what no other family has (the conv stem is shared with timm's
# ViT and CRATE-MAE, the qkv naming with CRATE).
RATELAB_SIGNATURE = ("patch_embed.proj.weight", "blocks.0.odl.D")
OFFICIAL_SIGNATURE = ("conv1.weight", "transformer.layers.0.1.fn.D")

KEY_MAP = KeyMap(OFFICIAL_KEY_MAP, ratelab_signature=RATELAB_SIGNATURE, official_signature=OFFICIAL_SIGNATURE)

# Flax tree path -> PyTorch-port key (the port's names, so the port's converter checks both official layouts).
_BLOCK = "Transformer/encoderblock_{i}/"
_MSSA = _BLOCK + "MultiHeadDotProductSubspaceAttention_0/"
FLAX_KEY_MAP: dict[str, str] = {
    "embedding/kernel": "conv1.weight",
    "embedding/bias": "conv1.bias",
    "cls": "cls_token",
    "pos_embedding": "pos_embedding",
    _BLOCK + "LayerNorm_0/scale": "transformer.layers.{i}.0.norm.weight",
    _BLOCK + "LayerNorm_0/bias": "transformer.layers.{i}.0.norm.bias",
    _MSSA + "proj/kernel": "transformer.layers.{i}.0.fn.qkv.weight",
    _MSSA + "out/kernel": "transformer.layers.{i}.0.fn.to_out.0.weight",
    _BLOCK + "LayerNorm_1/scale": "transformer.layers.{i}.1.norm.weight",
    _BLOCK + "LayerNorm_1/bias": "transformer.layers.{i}.1.norm.bias",
    _BLOCK + "OvercompleteISTABlock_0/D": "transformer.layers.{i}.1.fn.D",
    _BLOCK + "OvercompleteISTABlock_0/D1": "transformer.layers.{i}.1.fn.D1",
    "encoder_norm/scale": "mlp_head.0.weight",
    "encoder_norm/bias": "mlp_head.0.bias",
    "head/kernel": "mlp_head.1.weight",
    "head/bias": "mlp_head.1.bias",
}
FLAX_SIGNATURE = ("embedding/kernel", _BLOCK.format(i=0) + "OvercompleteISTABlock_0/D")
FLAX_KEY_NAMES = KeyMap(FLAX_KEY_MAP, ratelab_signature=OFFICIAL_SIGNATURE, official_signature=FLAX_SIGNATURE)

# Subtrees of a saved training checkpoint that hold the parameters (big_vision's load_params rule), tried in order.
_FLAX_PARAM_ROOTS = ("params/", "opt/target/")


def detect_layout(state_dict: Mapping[str, Any]) -> str | None:
    """``"ratelab"``, ``"official"`` (PyTorch port), ``"flax"`` (a flat JAX tree) or ``None``."""
    layout = KEY_MAP.detect_layout(state_dict)
    if layout is None and FLAX_KEY_NAMES.detect_layout(_flax_params(state_dict)) == "official":
        return "flax"
    return layout


def official_to_ratelab_key(key: str) -> str | None:
    """The ratelab key for one PyTorch-port key, or ``None`` when the key is not in :data:`OFFICIAL_KEY_MAP`."""
    return KEY_MAP.to_ratelab_key(key)


def map_official_keys(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename PyTorch-port keys to ratelab keys. Returns (renamed dict, port keys that matched no template)."""
    return KEY_MAP.map_keys(state_dict)


def _fill_identity_out_proj(out: dict[str, torch.Tensor], model: Any) -> None:
    # The port's Attention replaces to_out by Identity when heads == 1 and dim_head == dim, so such files have no
    # output-map key; ratelab always has the Linear, and an identity weight reproduces the computation.
    d, inner = model.cfg.embed_dim, model.cfg.inner_dim
    if model.cfg.num_heads != 1 or inner != d:
        return
    for i in range(model.cfg.depth):
        if f"blocks.{i}.attn.proj.weight" not in out and f"blocks.{i}.norm1.weight" in out:
            out[f"blocks.{i}.attn.proj.weight"] = torch.eye(d, dtype=out[f"blocks.{i}.norm1.weight"].dtype)


_PORT_CONVERTER = OfficialConverter(
    family="CRATE-alpha",
    source="UCSC-VLAA/CRATE-alpha",
    key_map=KEY_MAP,
    width_key=("cls_token", -1),
    resample_pos_embed=resample_pos_embed_bilinear,
    fix_official=_fill_identity_out_proj,
    model_pattern="crate_alpha_*",
    foreign_hints={
        "params/embedding/kernel": " The names look like a JAX/Flax tree of another model (no CRATE-alpha ODL "
                                   "parameters under Transformer/encoderblock_0/OvercompleteISTABlock_0).",
    },
)


# ---- Flax trees ------------------------------------------------------------------------------------------------
def _to_tensor(value: Any, name: str) -> torch.Tensor:
    return array_to_tensor(value, f"Flax parameter {name!r}")


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "/"))
        else:
            flat[name] = value
    return flat


def _flax_params(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The parameter subtree of a flat tree: under ``params/`` (or ``opt/target/``) when present, else the root."""
    for root in _FLAX_PARAM_ROOTS:
        if any(k.startswith(root) for k in flat):
            return {k[len(root):]: v for k, v in flat.items() if k.startswith(root)}
    return dict(flat)


def read_flax_params(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The flat parameter dict ("embedding/kernel", ...) of a CRATE-alpha Flax checkpoint, as tensors.

    Args:
        source: an ``.npz`` file as the official trainer writes it (read with ``allow_pickle=False``: no code can
            run), or a nested / flat dict of arrays (e.g. ``flax.traverse_util.flatten_dict(params, sep="/")``).

    Raises:
        CheckpointError: unreadable file, non-numeric arrays.
    """
    flat = _flatten(source) if isinstance(source, Mapping) else read_npz(source)
    return {k: _to_tensor(v, k) for k, v in _flax_params(flat).items()}


def _flax_value(port_key: str, v: torch.Tensor) -> torch.Tensor:
    if port_key == "conv1.weight":
        return v.permute(3, 2, 0, 1).contiguous()  # HWIO -> OIHW
    if port_key.endswith(".0.fn.qkv.weight"):
        return v.reshape(v.shape[0], -1).t().contiguous()  # (d, K, p) -> (K p, d), heads major as ours
    if port_key.endswith(".0.fn.to_out.0.weight"):
        return v.reshape(-1, v.shape[-1]).t().contiguous()  # (K, p, d) -> (d, K p)
    if port_key == "mlp_head.1.weight":
        return v.t().contiguous()  # Dense kernel (in, out) -> Linear weight (out, in)
    return v


def flax_to_official(params: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Rename and reshape a flat Flax parameter dict into the PyTorch port's layout.

    Raises:
        CheckpointError: names outside :data:`FLAX_KEY_MAP` (e.g. LayerScale ``ls1``/``ls2``, not in any released
            config, or a CLIPA image tower), listed.
    """
    flat = _flax_params(params)
    out: dict[str, torch.Tensor] = {}
    leftover = []
    for name, value in flat.items():
        port = FLAX_KEY_NAMES.to_ratelab_key(name)
        if port is None:
            leftover.append(name)
        else:
            out[port] = _flax_value(port, _to_tensor(value, name))
    if leftover:
        raise CheckpointError(f"Flax parameters outside the CRATE-alpha layout ({len(leftover)}): "
                              f"{sorted(leftover)[:12]}")
    return out


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: Any) -> dict[str, torch.Tensor]:
    """Turn a CRATE-alpha state dict into ``model``'s keys: ``checkpoint_filter_fn(sd, model)``.

    Accepted layouts: ratelab's, the official PyTorch port's (``torch/*.pth``) and a flat JAX/Flax tree ("/"-joined
    names, with or without the ``params/`` root). ``pos_embed`` is resampled to the model's grid (bilinear on
    corner-aligned grids, as the official ``resample_posemb``); with ``num_classes=0`` the file's head is dropped.
    A file that matches no layout (the message names the family whose keys it matches, if any), has keys outside
    the official map or another depth/width than ``model`` raises :class:`~ratelab.core.errors.CheckpointError`.
    """
    sd = strip_prefixes(state_dict)
    if KEY_MAP.detect_layout(sd) is None and FLAX_KEY_NAMES.detect_layout(_flax_params(sd)) == "official":
        sd = flax_to_official(sd)
    return _PORT_CONVERTER(sd, model)


def load_flax_weights(model: Any, source: str | os.PathLike | Mapping[str, Any]) -> Any:
    """Load a CRATE-alpha Flax checkpoint (``.npz`` or dict of arrays, see :func:`read_flax_params`) into ``model``,
    strictly. Returns ``model``."""
    name = "a Flax tree" if isinstance(source, Mapping) else str(source)
    try:
        sd = checkpoint_filter_fn(read_flax_params(source), model)
    except CheckpointError as e:
        raise CheckpointError(f"{name}: {e}") from e
    load_state_dict_strict(model, sd, source=name)
    return model


def convert_flax(source: str | os.PathLike | Mapping[str, Any], out_dir: str | os.PathLike, model_name: str,
                 **kwargs: Any) -> Path:
    """Convert a CRATE-alpha Flax checkpoint to ratelab's format (``model.safetensors`` + ``model_config.json``).

    Args:
        source: ``.npz`` written by the official trainer, or a (nested or flat) dict of arrays.
        out_dir: directory to write; created if needed.
        model_name: ratelab registry name with the file's architecture, e.g. ``"crate_alpha_base_patch16_224"``.
        **kwargs: forwarded to :func:`ratelab.create_model` (``img_size``, ``depth`` ...). ``num_classes`` defaults
            to the width of the tree's ``head/kernel`` (0 when it has none).

    Returns:
        Path of the written ``model.safetensors``.
    """
    from ratelab.core.checkpoint import save_model
    from ratelab.models._factory import create_model

    params = read_flax_params(source)
    if kwargs.get("num_classes") is None:
        kwargs["num_classes"] = int(params["head/kernel"].shape[-1]) if "head/kernel" in params else 0
    model = create_model(model_name, **kwargs)
    load_flax_weights(model, params)
    return save_model(model, out_dir)


def convert_official(path_in: str | os.PathLike, out_dir: str | os.PathLike, model_name: str, **kwargs: Any) -> Path:
    """Convert an official PyTorch-port checkpoint to ratelab's format (``model.safetensors`` + config).

    Args:
        path_in: the port's ``.pth`` (a plain state dict; wrapped or ``module.``-prefixed files are unwrapped).
        out_dir: directory to write; created if needed.
        model_name: ratelab registry name with the file's architecture, e.g. ``"crate_alpha_large_patch14_224"``.
        **kwargs: forwarded to :func:`ratelab.create_model`. ``num_classes`` defaults to the file's head width.

    Returns:
        Path of the written ``model.safetensors``.
    """
    from ratelab.models._factory import convert_official as convert

    return convert(path_in, out_dir, model_name, detect_layout=KEY_MAP.detect_layout, official_head="mlp_head.1.weight",
                   source="UCSC-VLAA/CRATE-alpha", **kwargs)


# ---- light recipe ----------------------------------------------------------------------------------------------
PATCH_KERNEL = "patch_embed.proj.weight"
HEAD_KEYS = ("head.weight", "head.bias")


def init_from_larger_patch(
    model: Any,
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    *,
    keep_head: bool = False,
) -> dict[str, list[str]]:
    """Start ``model`` from a checkpoint of another patch size (or resolution): the paper's "light recipe".

    What the official fine-tuning does (``model_load.dont_load = [head/kernel, head/bias, embedding/kernel]`` and
    ``resample_posemb``): every tensor is copied from ``source`` except the patch-embedding kernel, which keeps
    ``model``'s own (fresh) initialization because its shape depends on the patch size; the patch-embedding *bias*
    (d,) is copied; the position table is resampled to ``model``'s grid (bilinear, corner-aligned, [CLS] row kept);
    the head keeps ``model``'s initialization unless ``keep_head`` (continued training on the same label set).
    Call it on a freshly built model: "fresh initialization" is whatever ``model`` holds for those keys.

    Args:
        model: a :class:`~ratelab.models.crate_alpha.CrateAlpha` of the same width and depth as the source.
        source: a ratelab file or run directory, an official PyTorch-port ``.pth``, a Flax ``.npz``, or a state
            dict in any of these layouts.
        keep_head: copy the source's classifier too (it must have ``model``'s number of classes).

    Returns:
        ``{"copied": [...], "resampled": [...], "reinitialized": [...]}``, model key names.

    Raises:
        CheckpointError: the source is not a CRATE-alpha checkpoint, differs in depth or width, lacks a tensor the
            model needs, or has a head of another shape with ``keep_head=True``.

    Example::

        big = "runs/alpha_l32/checkpoints/last.pt"
        small = ratelab.create_model("crate_alpha_large_patch14_224", num_classes=1000)
        report = init_from_larger_patch(small, big, keep_head=True)
    """
    name = "a state dict" if isinstance(source, Mapping) else str(source)
    if isinstance(source, Mapping):
        sd = dict(source)
    elif Path(source).suffix == ".npz":
        sd = read_flax_params(source)
    else:
        sd = read_state_dict(source)
    rows = _pos_rows(sd)
    try:
        sd = checkpoint_filter_fn(sd, model)
    except CheckpointError as e:
        raise CheckpointError(f"{name}: {e}") from e
    own = model.state_dict()
    fresh = {PATCH_KERNEL, *(() if keep_head else HEAD_KEYS)}
    missing = sorted(k for k in own if k not in fresh and k not in sd)
    wrong = sorted(f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                   for k in own if k not in fresh and k in sd and sd[k].shape != own[k].shape)
    unused = sorted(k for k in sd if k not in own)
    if missing or wrong or unused:
        head_wrong = keep_head and any(w.startswith("head.") for w in wrong)
        hint = " (pass keep_head=False to re-initialize the head)" if head_wrong else ""
        raise CheckpointError(f"{name} cannot initialize {type(model).__name__}: missing {missing[:8]}, shape "
                              f"mismatches {wrong[:8]}{hint}, unused source keys {unused[:8]}")
    load_state_dict_strict(model, {k: (v if k in fresh else sd[k]) for k, v in own.items()}, source=name)
    resampled = ["pos_embed"] if rows is not None and rows != own["pos_embed"].shape[1] else []
    return {
        "copied": sorted(k for k in own if k not in fresh and k not in resampled),
        "resampled": resampled,
        "reinitialized": sorted(k for k in own if k in fresh),
    }


def _pos_rows(sd: Mapping[str, Any]) -> int | None:
    """Rows of the source's position table, in whichever layout it comes."""
    flat = _flax_params(strip_prefixes(sd))
    for key in ("pos_embed", "pos_embedding"):
        if key in flat:
            return int(flat[key].shape[1])
    return None


__all__ = [
    "FLAX_KEY_MAP",
    "OFFICIAL_KEY_MAP",
    "checkpoint_filter_fn",
    "convert_flax",
    "convert_official",
    "detect_layout",
    "flax_to_official",
    "init_from_larger_patch",
    "load_flax_weights",
    "map_official_keys",
    "official_to_ratelab_key",
    "read_flax_params",
]
