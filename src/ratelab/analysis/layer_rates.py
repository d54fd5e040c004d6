"""Layer-wise compression and sparsity of CRATE-like models (the measurement behind CRATE's Fig. 3 / Fig. 4a).

Per layer l of a model whose ``forward_layer_quantities(x)`` returns, per kept layer, ``proj`` (B, K, N, p) = U_k^T
of the layer's normalized input, ``half`` (B, N, d) = Z^{l+1/2} and ``codes`` (B, N, d) = the sparse codes (CRATE: the
ISTA output Z^{l+1}) -- the one documented way to reach them (docs/models.md, "Model API"):

* compression  Rc(U_l^T Z^l) = sum_k R(unit-normalized tokens of U_k^T LN1_l(Z^l), eps), with d = p and n = N;
* compression_half  Rc(U_l^T Z^{l+1/2}): the same measure on LN1_l(Z^{l+1/2}) projected by the same layer's U_l
  (see :func:`measure_layers` for why);
* sparsity  fraction of exact zeros of Z^{l+1} (zeros come from the ISTA ReLU).

Official convention (Ma-Lab-Berkeley/CRATE ``vis_utils/coding_rate.py`` + ``vis_utils/crate_hook.py``): a hook on
each layer's bias-free projection gives W_{b,k} (N x p) for image b and head k; every token (row) is divided by its
L2 norm; R_{b,k} = 1/2 logdet(I_N + p / (N * 0.01) W_{b,k} W_{b,k}^T); Rc_b = sum_k R_{b,k}; mean and std over
images are plotted. Its ``eps = 0.01`` multiplies N directly, so it plays the role of eps^2: our ``eps=0.1``
reproduces it. All N tokens of the layer, [CLS] included, are used. Sparsity there is the per-image fraction of
exactly-zero entries of the ISTA output (its plot shows 1 minus that fraction).

Differences from the official script, on purpose: tokens of zero norm are left at zero (``F.normalize``) instead of
producing NaN; the d x d (p x p) side is factorized when p <= N (same value by Sylvester, cheaper); the standard
deviations here are population ones (ddof = 0) for both quantities (the official compression std uses ddof = 1,
its sparsity std ddof = 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Real
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ratelab.objectives.coding_rate import coding_rate

CONVENTION = (
    "compression: sum over heads k of 1/2 logdet(I + p/(N eps^2) W_k^T W_k), W_k = (N, p) head projection "
    "U_k^T LN1(Z^l) of all N tokens ([CLS] included) with every token L2-normalized (official CRATE vis_utils "
    "convention; its eps=0.01 is our eps^2); compression_half: same on U_k^T LN1(Z^{l+1/2}) with layer l's own "
    "LN1 and U; sparsity: per-image fraction of exact zeros of the ISTA output Z^{l+1}; mean and population std "
    "(ddof=0) over images; natural log (nats)"
)

Projector = Callable[[nn.Module, int, torch.Tensor], torch.Tensor]

MEASURES = ("compression", "compression_half", "sparsity")
# What each measure needs from forward_layer_quantities, and why (for the error a user sees).
_NEEDS = {
    "compression": ("proj", "per-head subspace projections U_k^T z (an MSSA-style layer)"),
    "compression_half": ("half", "the half step Z^{l+1/2} and per-head subspace projections"),
    "sparsity": ("codes", "sparse codes (an ISTA / sparse-coding step)"),
}


def supported_measures(model: nn.Module) -> tuple[str, ...]:
    """The measures of :func:`measure_layers` a model supports, from its ``layer_measures`` attribute.

    A model that declares nothing but has ``forward_layer_quantities`` is probed by the keys it returns (see
    :func:`measure_layers`); a model without that method supports none.
    """
    declared = getattr(model, "layer_measures", None)
    if declared is not None:
        return tuple(m for m in MEASURES if m in declared)
    return MEASURES if hasattr(model, "forward_layer_quantities") else ()


def model_family_name(model: nn.Module) -> str | None:
    """The registry family (``"crate"``, ``"adventurer"``, ...) of a model built by ``create_model``, else None."""
    from ratelab.core.errors import UnknownNameError
    from ratelab.core.registry import registered_family

    name = getattr(model, "model_name", None)
    if not isinstance(name, str):
        return None
    try:
        return registered_family(name)
    except UnknownNameError:
        return None


def unsupported_message(model: nn.Module, measures: tuple[str, ...] = MEASURES) -> str:
    """One sentence naming the model and its family, which measures it lacks and what each one needs."""
    name = getattr(model, "model_name", type(model).__name__)
    family = model_family_name(model)
    have = supported_measures(model)
    missing = [m for m in measures if m not in have]
    needs = "; ".join(f"{m} needs {_NEEDS[m][1]}" for m in missing)
    who = f"model {name} (family {family})" if family else f"model {name}"
    return f"{who} supports {list(have) or 'none'} of the layer measures {list(measures)} ({needs})"


def compression(
    proj: torch.Tensor,
    eps: float = 0.1,
    *,
    dtype: torch.dtype | None = None,
    side: str = "auto",
) -> torch.Tensor:
    """Per-image compression term Rc of one layer, official CRATE measurement convention.

    Args:
        proj: (B, K, N, p) per-head projections U_k^T z of the N tokens of each image.
        eps: precision epsilon, not squared (0.1 reproduces the official ``CodingRate(eps=0.01)``).
        dtype: compute dtype (float32 default, float64 on request).
        side: ``"auto"``, ``"feature"`` (p x p) or ``"sample"`` (N x N) Gram matrix; same value.

    Returns:
        (B,) sum over heads of the coding rate of the unit-normalized tokens.
    """
    if not isinstance(proj, torch.Tensor) or proj.ndim != 4:
        shape = tuple(proj.shape) if isinstance(proj, torch.Tensor) else type(proj).__name__
        raise ValueError(f"compression: proj must be a (B, K, N, p) tensor, got {shape}")
    # Upcast before normalizing so that half-precision projections are normalized in the compute dtype too.
    cdtype = torch.float64 if (dtype == torch.float64 or proj.dtype == torch.float64) else torch.float32
    w = F.normalize(proj.to(cdtype), dim=-1)  # zero tokens stay zero (the official division gives NaN)
    return coding_rate(w, eps, dtype=dtype, side=side).sum(dim=1)


def sparsity(tokens: torch.Tensor) -> torch.Tensor:
    """Per-image fraction of exactly-zero entries.

    Args:
        tokens: (B, ...) layer outputs, e.g. (B, N, d) ISTA outputs.

    Returns:
        (B,) float32 fractions in [0, 1].
    """
    if not isinstance(tokens, torch.Tensor) or tokens.ndim < 2:
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"sparsity: tokens must be a (B, ...) tensor with at least 2 dims, got {shape}")
    return (tokens.reshape(tokens.shape[0], -1) == 0).to(torch.float32).mean(dim=1)


def block_projector(model: nn.Module, layer: int, z: torch.Tensor) -> torch.Tensor:
    """Default projector: layer ``layer``'s own U_k^T LN1(z) through ``model.blocks[layer].{norm1, attn.project}``.

    Args:
        model: a model with ``blocks[layer].norm1`` and ``blocks[layer].attn.project`` (CRATE layout).
        layer: layer index.
        z: (B, N, d) tokens.

    Returns:
        (B, K, N, p).
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise AttributeError(
            f"{type(model).__name__} has no `blocks`; pass measure_layers(..., projector=fn) to project Z^(l+1/2)"
        )
    blk = blocks[layer]
    for path in ("norm1", "attn"):
        if not hasattr(blk, path):
            raise AttributeError(
                f"{type(model).__name__}.blocks[{layer}] has no `{path}`; pass measure_layers(..., projector=fn)"
            )
    if not hasattr(blk.attn, "project"):
        raise AttributeError(
            f"{type(model).__name__}.blocks[{layer}].attn has no `project`; pass measure_layers(..., projector=fn)"
        )
    return blk.attn.project(blk.norm1(z))


def _mean_std(values: torch.Tensor) -> tuple[float, float]:
    v = values.to(torch.float64)
    return float(v.mean()), float(v.std(correction=0))


def measure_layers(
    model: nn.Module,
    images: torch.Tensor,
    *,
    eps: float = 0.1,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    projector: Projector | None = block_projector,
    dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Layer-wise compression and sparsity of ``model`` over a set of images.

    Which "Z^{l+1/2}" is measured: the compression step of layer l descends Rc(Z; U_l) starting from Z^l, and the
    official measurement reads Z^l through layer l's LN1 and U_l. ``compression_half`` applies exactly the same
    map (layer l's LN1, then U_l, then per-token normalization) to Z^{l+1/2} = Z^l + MSSA(LN1(Z^l)). The pair
    (compression, compression_half) then isolates what the MSSA step did to the objective it was derived from,
    with nothing else changed; the next layer's U_{l+1} is never applied to Z^{l+1/2} (ISTA sits in between).

    Args:
        model: module with ``forward_layer_quantities(x) -> {"indices", "proj", "half", "codes", ...}`` (CRATE).
            Evaluated in eval mode under ``torch.no_grad``; its training flag is restored afterwards. Only the
            measures it supports (its ``layer_measures``, or for an undeclared model the keys it returns: ``proj``
            for compression, ``codes`` for sparsity) are computed; the others are ``None``.
        images: (N_img, C, H, W) float tensor.
        eps: precision epsilon (0.1 = official convention).
        batch_size: images per forward pass.
        device: where to run; the model is moved there in place (``nn.Module.to``). Default: the device of the
            model's first parameter (CPU for a parameterless model).
        projector: ``fn(model, layer, z) -> (B, K, N, p)`` used for ``compression_half``; default
            :func:`block_projector`. ``None`` skips ``compression_half`` (its entries are then ``None``).
        dtype: compute dtype of the coding rates (float32 default).

    Returns:
        JSON-able dict ``{"eps", "num_images", "num_tokens", "num_heads", "head_dim", "convention", "layers": [...]}``
        with per layer ``{"layer", "compression", "compression_std", "compression_half", "compression_half_std",
        "sparsity", "sparsity_std"}`` (means and population stds over images); ``num_heads``/``head_dim`` are
        ``None`` without compression.

    Raises:
        AttributeError: no ``forward_layer_quantities``, or no ``blocks`` for the default projector.
        ValueError: bad arguments, or a model that supports none of the measures (the message says what each needs).
    """
    if not hasattr(model, "forward_layer_quantities"):
        raise AttributeError(f"{type(model).__name__} has no forward_layer_quantities(x) (forward_intermediates gives "
                             "layer outputs only, not U_k^T z or sparse codes); cannot measure layer rates "
                             "(docs/models.md, 'Model API')")
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"measure_layers: images must be a (N_img, C, H, W) tensor, got {shape}")
    if images.shape[0] == 0:
        raise ValueError("measure_layers: images is empty")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"measure_layers: batch_size must be a positive int, got {batch_size!r}")
    if isinstance(eps, bool) or not isinstance(eps, Real) or not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"measure_layers: eps must be a finite positive number, got {eps!r}")
    measures = supported_measures(model)
    if not measures:
        raise ValueError(unsupported_message(model))

    if device is not None:
        model.to(device)
    else:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    comp: list[list[torch.Tensor]] = []
    half: list[list[torch.Tensor]] = []
    spars: list[list[torch.Tensor]] = []
    layer_ids: list[int] | None = None
    shape_info: dict[str, int | None] = {}
    do_comp = do_half = do_spars = False
    try:
        with torch.no_grad():
            for start in range(0, images.shape[0], batch_size):
                x = images[start : start + batch_size].to(device)
                res = model.forward_layer_quantities(x)
                if layer_ids is None:
                    layer_ids = [int(i) for i in res["indices"]]
                    comp, half, spars = ([[] for _ in layer_ids] for _ in range(3))
                    # An undeclared model supports what it returns; a declared one must return what it declares.
                    declared = getattr(model, "layer_measures", None) is not None
                    do_comp = "compression" in measures and (declared or "proj" in res)
                    do_half = (do_comp and projector is not None and "compression_half" in measures
                               and (declared or "half" in res))
                    do_spars = "sparsity" in measures and (declared or "codes" in res)
                    if not (do_comp or do_spars):
                        raise ValueError(unsupported_message(model) + f"; it returned {sorted(res)}")
                    # A declared measure whose quantity is absent is the model's bug; name it, not a bare KeyError.
                    needed = [_NEEDS[m][0] for m, run in (("compression", do_comp), ("compression_half", do_half),
                                                          ("sparsity", do_spars)) if run]
                    absent = [k for k in needed if k not in res]
                    if absent:
                        raise ValueError(
                            f"{getattr(model, 'model_name', type(model).__name__)} declares layer_measures "
                            f"{list(measures)} but its forward_layer_quantities returned no {absent} "
                            f"(it returned {sorted(res)})")
                    tokens = res["proj"][0] if do_comp else res["codes"][0]
                    shape_info = {"num_tokens": int(tokens.shape[-2])}
                    if do_comp:
                        _, K, _, p = res["proj"][0].shape
                        shape_info.update(num_heads=int(K), head_dim=int(p))
                    else:
                        shape_info.update(num_heads=None, head_dim=None)
                for j, layer in enumerate(layer_ids):
                    if do_comp:
                        comp[j].append(compression(res["proj"][j], eps, dtype=dtype).cpu())
                    if do_spars:
                        spars[j].append(sparsity(res["codes"][j]).cpu())
                    if do_half:
                        ph = projector(model, layer, res["half"][j])
                        half[j].append(compression(ph, eps, dtype=dtype).cpu())
    finally:
        model.train(was_training)

    layers = []
    for j, layer in enumerate(layer_ids or []):
        c_mean, c_std = _mean_std(torch.cat(comp[j])) if do_comp else (None, None)
        s_mean, s_std = _mean_std(torch.cat(spars[j])) if do_spars else (None, None)
        h_mean, h_std = _mean_std(torch.cat(half[j])) if do_half else (None, None)
        layers.append(
            {
                "layer": layer,
                "compression": c_mean,
                "compression_std": c_std,
                "compression_half": h_mean,
                "compression_half_std": h_std,
                "sparsity": s_mean,
                "sparsity_std": s_std,
            }
        )
    return {
        "eps": float(eps),
        "num_images": int(images.shape[0]),
        **shape_info,
        "convention": CONVENTION,
        "layers": layers,
    }


_ARRAY_KEYS = (
    "compression",
    "compression_std",
    "compression_half",
    "compression_half_std",
    "sparsity",
    "sparsity_std",
)


def rates_to_arrays(result: dict[str, Any]) -> dict[str, np.ndarray]:
    """Column view of a :func:`measure_layers` result.

    Returns:
        ``{"layer": int array (L,), "compression": float array (L,), ...}``; missing values (``None``) become NaN.
    """
    if "layers" not in result:
        raise KeyError("rates_to_arrays: result has no 'layers' key (expected the output of measure_layers)")
    rows = result["layers"]
    out = {"layer": np.array([r["layer"] for r in rows], dtype=np.int64)}
    for key in _ARRAY_KEYS:
        out[key] = np.array([np.nan if r.get(key) is None else r[key] for r in rows], dtype=np.float64)
    return out


def plot_layer_rates(results: dict[str, dict[str, Any]], path: str | None = None, *, show_half: bool = True):
    """Two panels: compression per layer (left) and fraction of zeros per layer (right), one curve per label.

    Args:
        results: ``{label: measure_layers result}``, e.g. ``{"trained": r1, "random init": r2}``.
        path: if given, the figure is saved there (format from the suffix).
        show_half: also draw Rc(U_l^T Z^{l+1/2}) as a dashed curve of the same color.

    Returns:
        ``matplotlib.figure.Figure`` (Agg canvas; pyplot and the global backend are untouched).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not results:
        raise ValueError("plot_layer_rates: results is empty")
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax_c, ax_s = fig.subplots(1, 2)
    for i, (label, res) in enumerate(results.items()):
        a = rates_to_arrays(res)
        x = a["layer"] + 1  # 1-based layer index, as in the paper's plots
        color = f"C{i % 10}"
        ax_c.errorbar(x, a["compression"], yerr=a["compression_std"], color=color, marker="o", capsize=3,
                      label=rf"{label}: $R^c(U_\ell^\top Z^\ell)$")
        if show_half and np.isfinite(a["compression_half"]).any():
            ax_c.errorbar(x, a["compression_half"], yerr=a["compression_half_std"], color=color, marker="s",
                          linestyle="--", capsize=3, alpha=0.8, label=rf"{label}: $R^c(U_\ell^\top Z^{{\ell+1/2}})$")
        ax_s.errorbar(x, a["sparsity"], yerr=a["sparsity_std"], color=color, marker="s", capsize=3, label=label)
    eps = next(iter(results.values())).get("eps")
    ax_c.set_title(f"Compression per layer (eps={eps})")
    ax_c.set_xlabel(r"layer $\ell$")
    ax_c.set_ylabel("coding rate, sum over heads (nats)")
    ax_s.set_title("Sparsity of ISTA output per layer")
    ax_s.set_xlabel(r"layer $\ell$")
    ax_s.set_ylabel(r"fraction of zeros in $Z^{\ell+1}$")
    ax_s.set_ylim(-0.02, 1.02)
    for ax in (ax_c, ax_s):
        ax.grid(linestyle="--", alpha=0.5)
        ax.legend(fontsize=8)
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


__all__ = [
    "CONVENTION",
    "MEASURES",
    "block_projector",
    "compression",
    "measure_layers",
    "model_family_name",
    "plot_layer_rates",
    "rates_to_arrays",
    "sparsity",
    "supported_measures",
    "unsupported_message",
]
