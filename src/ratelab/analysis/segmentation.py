"""Emergent segmentation: [CLS] attention maps, top-P thresholds, best-head mIoU, MaskCut and PCA of patch features.

Paper: Yu, Chu et al., "Emergence of Segmentation with Minimalistic White-Box Transformers" (CPAL 2024, arXiv
2308.16271), design note ``crate_family.md`` §3 and §5.6. MaskCut follows CutLER (Wang et al., CVPR 2023,
facebookresearch/CutLER ``maskcut/maskcut.py``); this is an independent re-implementation of the rules it documents.

Everything here is a pure function of tensors (or of a model's own ``forward_intermediates``): no trainer, no files.
Shapes: maps and masks are (..., h, w); patch features are (N, D) with N = h * w in row-major grid order.

COCO AP of the masks goes through ``pycocotools`` in :func:`ratelab.eval.coco.coco_box_mask_ap`. CRF
post-processing is not provided: ``pydensecrf`` (CutLER's CRF) does not build on Python 3.11 here and no maintained
drop-in installs, so masks are the raw normalized-cut masks (the paper drops the CRF for its ablations, §3.5).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "best_head_miou",
    "cls_attention_maps",
    "iou",
    "mask_boxes",
    "maskcut",
    "normalized_cut",
    "patch_features",
    "pca_rgb",
    "semantic_targets",
    "threshold_top",
    "upsample_maps",
]


# ---- attention maps ----------------------------------------------------------------------------------------------
def _patch_size(model: torch.nn.Module) -> tuple[int, int]:
    pe = getattr(model, "patch_embed", None)
    for p in (getattr(pe, "patch_size", None), getattr(getattr(model, "cfg", None), "patch_size", None),
              getattr(model, "patch_size", None)):
        if p is not None:
            return (int(p), int(p)) if isinstance(p, int) else (int(p[0]), int(p[1]))
    raise TypeError(f"{type(model).__name__}: cannot find the patch size (patch_embed.patch_size, cfg.patch_size "
                    f"or patch_size)")


def _has_native_attn(model: torch.nn.Module) -> bool:
    fi = getattr(model, "forward_intermediates", None)
    return fi is not None and "return_attn" in inspect.signature(fi).parameters


def upsample_maps(maps: torch.Tensor, size: tuple[int, int], mode: str = "nearest") -> torch.Tensor:
    """(..., h, w) -> (..., H, W) by ``"nearest"`` (each patch a constant block, DINO's figures) or ``"bilinear"``."""
    if mode not in ("nearest", "bilinear"):
        raise ValueError(f"mode must be 'nearest' or 'bilinear', got {mode!r}")
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, 1, *maps.shape[-2:]).float()
    kw = {"align_corners": False} if mode == "bilinear" else {}
    out = F.interpolate(flat, size=tuple(size), mode=mode, **kw)
    return out.reshape(*lead, *out.shape[-2:])


def _timm_qk(model: torch.nn.Module, x: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k (B, H, N, dh) of block ``layer`` of a timm VisionTransformer, recomputed from the attention's input.

    A pre-hook on the block's ``attn`` captures its input (the normalized tokens), so q and k are exactly those the
    block uses (q_norm/k_norm included), whatever attention kernel timm picked.
    """
    blocks = model.blocks
    attn = blocks[layer % len(blocks)].attn
    seen: dict[str, torch.Tensor] = {}
    handle = attn.register_forward_pre_hook(lambda _m, args: seen.__setitem__("x", args[0]))
    try:
        model.forward_features(x)
    finally:
        handle.remove()
    t = seen["x"]
    B, N, _ = t.shape
    qkv = attn.qkv(t).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return q, k


@torch.no_grad()
def cls_attention_maps(
    model: torch.nn.Module,
    images: torch.Tensor,
    layer: int = -2,
    *,
    reading: str = "attention",
    img_size: int | tuple[int, int] | None = None,
    upsample: bool | str = True,
) -> torch.Tensor:
    """[CLS] -> patch attention of one layer, per head: (B, C, H, W) images -> (B, heads, h, w) maps.

    Args:
        model: a ratelab model whose ``forward_intermediates`` takes ``return_attn`` (CRATE, CRATE-alpha, the
            CRATE-MAE encoder, ...) or a timm ``VisionTransformer`` (``blocks[i].attn.qkv``).
        images: (B, C, H, W), normalized as the model expects.
        layer: block index (negative counts from the end); the paper uses the penultimate layer (-2) for CRATE and
            the last (-1) for its ViT baselines.
        reading: which reading of §3.2:
            ``"attention"`` -- the model's own attention row of the [CLS] query with the [CLS] (prefix) columns
            dropped: it carries the model's softmax temperature (1/sqrt(p)) and was normalized over all tokens, so
            a row sums to less than 1 (the notebooks' route);
            ``"equation"`` -- the paper's formula A_k,i = exp<U_k^T z_i, U_k^T z_cls> / sum_j exp<U_k^T z_j,
            U_k^T z_cls>, the sum over patches only and no temperature, from ``forward_layer_quantities``'s
            ``proj`` (for a ViT: the [CLS] query against the patch keys). Each map sums to 1.
        img_size: run the model at this input size (images resized bilinearly first); the models resample their
            position embeddings to the new grid (CRATE: bicubic, CRATE-alpha: bilinear). A timm ViT needs
            ``dynamic_img_size=True`` for this. ``None`` keeps the images' size.
        upsample: ``True``/``"nearest"`` or ``"bilinear"`` resizes the maps to the images' (H, W) (the input size
            before ``img_size``, i.e. the ground-truth masks' size); ``False`` returns the (h, w) patch grid.

    Returns:
        float32 maps (B, heads, h, w), or (B, heads, H, W) when upsampled. The model's train/eval state is restored.
    """
    if reading not in ("attention", "equation"):
        raise ValueError(f"reading must be 'attention' or 'equation', got {reading!r}")
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got {tuple(images.shape)}")
    out_size = tuple(images.shape[-2:])
    x = images
    if img_size is not None:
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if size != out_size:
            x = F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False).to(images.dtype)
    ph, pw = _patch_size(model)
    grid = (x.shape[-2] // ph, x.shape[-1] // pw)
    n_prefix = int(getattr(model, "num_prefix_tokens", 1))
    was_training = model.training
    model.eval()
    try:
        if _has_native_attn(model):
            if reading == "attention":
                _, _, attn = model.forward_intermediates(x, indices=[layer], return_attn=True)
                row = attn[0][:, :, 0, n_prefix:]
            else:
                q = model.forward_layer_quantities(x, indices=[layer]) if hasattr(
                    model, "forward_layer_quantities") else {}
                if "proj" not in q:
                    # e.g. CRATE-MHSA: its keys are exposed but not the [CLS] query the formula pairs them with
                    raise TypeError(f"{type(model).__name__} exposes no subspace projections U_k^T z "
                                    f"(forward_layer_quantities()['proj']): use reading='attention'")
                w = q["proj"][0]  # (B, K, N+1, p)
                logits = torch.einsum("bkp,bknp->bkn", w[:, :, 0], w[:, :, n_prefix:])
                row = logits.softmax(dim=-1)
        elif hasattr(model, "blocks") and hasattr(model.blocks[0], "attn"):
            if not getattr(model, "dynamic_img_size", True) and tuple(x.shape[-2:]) != tuple(
                model.patch_embed.img_size
            ):
                raise ValueError(f"this timm model was built for {tuple(model.patch_embed.img_size)} inputs; create "
                                 f"it with dynamic_img_size=True to run at {tuple(x.shape[-2:])}")
            q, k = _timm_qk(model, x, layer)
            logits = torch.einsum("bhd,bhnd->bhn", q[:, :, 0], k[:, :, n_prefix:])
            if reading == "attention":
                full = torch.einsum("bhd,bhnd->bhn", q[:, :, 0], k) * model.blocks[0].attn.scale
                row = full.softmax(dim=-1)[:, :, n_prefix:]
            else:
                row = logits.softmax(dim=-1)
        else:
            raise TypeError(f"{type(model).__name__} exposes no attention: need forward_intermediates(..., "
                            f"return_attn=True) or timm-style blocks[i].attn.qkv")
    finally:
        model.train(was_training)
    if row.shape[-1] != grid[0] * grid[1]:
        raise ValueError(f"{row.shape[-1]} patch tokens do not fill the {grid} grid of a {tuple(x.shape[-2:])} input")
    maps = row.float().reshape(*row.shape[:2], *grid)
    if upsample:
        maps = upsample_maps(maps, out_size, "nearest" if upsample is True else upsample)
    return maps


@torch.no_grad()
def patch_features(
    model: torch.nn.Module, images: torch.Tensor, layer: int = -2, *, kind: str = "proj"
) -> torch.Tensor:
    """Per-patch features of one layer for :func:`maskcut` / :func:`pca_rgb`: (B, C, H, W) -> (B, N, D), no [CLS].

    Args:
        model: a ratelab model with ``forward_layer_quantities`` or a timm ``VisionTransformer``.
        images: (B, C, H, W) at the size to run (resize first for a larger grid, §5.6 uses 448).
        layer: block index (negative from the end).
        kind: ``"proj"`` -- the heads' projections concatenated [U_1^T z; ...; U_K^T z] of LN1(z) (CRATE's MaskCut
            affinity sum_k <U_k^T z_i, U_k^T z_j>, §3.5); for models without U_k (CRATE-MHSA, timm ViTs) the
            attention keys, the ViT features of §3.4; ``"tokens"`` -- the layer's output tokens (CRATE-alpha's
            "return_x" features, §5.6).
    """
    if kind not in ("proj", "tokens"):
        raise ValueError(f"kind must be 'proj' or 'tokens', got {kind!r}")
    n_prefix = int(getattr(model, "num_prefix_tokens", 1))
    was_training = model.training
    model.eval()
    try:
        if hasattr(model, "forward_layer_quantities"):
            q = model.forward_layer_quantities(images, indices=[layer])
            if kind == "tokens":
                return q["tokens"][0][:, n_prefix:]
            w = (q["proj"] if "proj" in q else q["keys"])[0]  # (B, K, N+1, p)
            return w[:, :, n_prefix:].permute(0, 2, 1, 3).flatten(2)
        if hasattr(model, "blocks") and hasattr(model.blocks[0], "attn"):
            if kind == "tokens":
                inter = model.forward_intermediates(images, indices=[layer], output_fmt="NLC",
                                                    intermediates_only=True)
                return inter[0]
            _, k = _timm_qk(model, images, layer)
            return k[:, :, n_prefix:].permute(0, 2, 1, 3).flatten(2)
    finally:
        model.train(was_training)
    raise TypeError(f"{type(model).__name__}: no forward_layer_quantities and no timm-style blocks[i].attn")


# ---- thresholds and IoU ------------------------------------------------------------------------------------------
def threshold_top(maps: Any, p: float = 0.6, mode: str = "entries") -> torch.Tensor:
    """Binary masks keeping the top share ``p`` of each (h, w) map: (..., h, w) floats -> (..., h, w) bool.

    Args:
        maps: non-negative maps (tensor or array), thresholded independently over their last two dims.
        p: share in [0, 1].
        mode: ``"entries"`` -- the ceil(p * h * w) largest entries (the paper's text, §3.3);
            ``"mass"`` -- the smallest set of largest entries holding at least a share p of the map's total
            (DINO's reading). A map summing to 0 keeps nothing.

    Ties are broken by position (earlier entries first), so exactly that many entries are kept.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    if mode not in ("entries", "mass"):
        raise ValueError(f"mode must be 'entries' or 'mass', got {mode!r}")
    m = torch.as_tensor(maps)
    if m.ndim < 2:
        raise ValueError(f"maps must be (..., h, w), got shape {tuple(m.shape)}")
    flat = m.reshape(-1, m.shape[-2] * m.shape[-1]).double()
    n = flat.shape[1]
    order = torch.argsort(flat, dim=1, descending=True, stable=True)
    if mode == "entries":
        # round() first: 0.6 * 10 is 6.000000000000001 in floating point and must keep 6, not 7
        k = torch.full((flat.shape[0],), math.ceil(round(p * n, 9)), dtype=torch.long)
    else:
        if (flat < 0).any():
            raise ValueError("mode='mass' needs non-negative maps")
        csum = torch.gather(flat, 1, order).cumsum(dim=1)
        total = csum[:, -1:]
        k = torch.searchsorted(csum, p * total * (1 - 1e-12)).squeeze(1) + 1
        k = torch.where(total.squeeze(1) > 0, k.clamp(max=n), torch.zeros_like(k))
        if p == 0:
            k = torch.zeros_like(k)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n).expand_as(order).contiguous())
    keep = rank < k[:, None]
    return keep.reshape(m.shape)


def iou(pred: Any, gt: Any, ignore: Any = None) -> torch.Tensor:
    """|pred & gt| / |pred | gt| over the last two dims, broadcasting the rest; 1.0 where both masks are empty.

    ``ignore`` (bool, broadcastable): pixels left out of both masks, e.g. VOC's 255 "void" boundary band, which
    counts neither as a hit nor as a false positive in the official scoring.
    """
    a, b = torch.as_tensor(pred).bool(), torch.as_tensor(gt).bool()
    if ignore is not None:
        keep = ~torch.as_tensor(ignore).bool()
        a, b = a & keep, b & keep
    inter = (a & b).sum(dim=(-2, -1)).double()
    union = (a | b).sum(dim=(-2, -1)).double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def semantic_targets(
    label_maps: Any, *, background: int = 0, ignore_index: int | None = 255
) -> dict[str, Any]:
    """Per-(image, class) ground truth for :func:`best_head_miou` from semantic label maps (VOC's
    ``SegmentationClass`` PNGs: 0 background, 1..20 classes, 255 void).

    Args:
        label_maps: (n, H, W) integer class per pixel.
        background: the label that is not a class (no mask is made for it).
        ignore_index: the void label (None: none); its pixels go into ``ignore``.

    Returns:
        ``{"gt_masks" (M, H, W) bool, "labels" (M,), "image_index" (M,), "ignore" (n, H, W) bool}``, one mask per
        class present in each image, images in order and classes ascending within an image. An image holding no
        class contributes nothing (it has no class to average over).
    """
    lm = torch.as_tensor(label_maps)
    if lm.ndim != 3 or lm.is_floating_point() or lm.dtype == torch.bool:
        raise ValueError(f"label_maps: expected an integer (n, H, W) tensor, got {lm.dtype} {tuple(lm.shape)}")
    ignore = lm == ignore_index if ignore_index is not None else torch.zeros_like(lm, dtype=torch.bool)
    masks, labels, index = [], [], []
    for i in range(lm.shape[0]):
        present = torch.unique(lm[i][~ignore[i]]).tolist()
        for c in present:
            if c == background:
                continue
            masks.append(lm[i] == c)
            labels.append(int(c))
            index.append(i)
    gt = torch.stack(masks) if masks else torch.zeros((0, *lm.shape[1:]), dtype=torch.bool)
    return {"gt_masks": gt, "labels": labels, "image_index": index, "ignore": ignore}


def best_head_miou(
    maps_or_masks: Any,
    gt_masks: Any,
    labels: Sequence[int],
    *,
    image_index: Sequence[int] | None = None,
    p: float = 0.6,
    mode: str = "entries",
    ignore: Any = None,
) -> dict[str, Any]:
    """Best-head mIoU over a dataset (§3.3).

    Args:
        maps_or_masks: (n_images, heads, H, W): float attention maps (thresholded with :func:`threshold_top`,
            ``p`` and ``mode``) or bool masks (used as given).
        gt_masks: (M, H, W) bool, one mask per (image, class) pair: the pixels of that class in that image.
        labels: (M,) the class of each ground-truth mask (leave out the background and ignore labels).
        image_index: (M,) the image of each ground-truth mask; ``None`` when M == n_images, mask i on image i.
        p, mode: the threshold for float maps (the share is taken over all of an image's pixels, void ones too:
            the maps know nothing of the annotation).
        ignore: (n_images, H, W) bool pixels scored as neither hit nor miss (VOC's void label;
            :func:`semantic_targets` builds it with the masks from label maps).

    Returns:
        ``{"mIoU": float, "best_head": {class: head}, "per_class": {class: mean IoU with its head}}``.

    For each class c the head k*_c maximizing the mean IoU over all of c's masks in the dataset is chosen (one head
    per class for the whole dataset, ties to the lower head index). Each mask is scored with its class's head; an
    image's score is the mean over its classes, and mIoU is the mean over images ("average over classes, then over
    images", §3.3).
    """
    x = torch.as_tensor(maps_or_masks)
    masks = x if x.dtype == torch.bool else threshold_top(x, p=p, mode=mode)
    gt = torch.as_tensor(gt_masks).bool()
    lab = [int(c) for c in labels]
    idx = list(range(len(lab))) if image_index is None else [int(i) for i in image_index]
    if masks.ndim != 4 or gt.ndim != 3 or len(lab) != gt.shape[0] or len(idx) != gt.shape[0]:
        raise ValueError(f"expected maps (n, heads, H, W), gt (M, H, W), M labels and M image indices; got "
                         f"{tuple(masks.shape)}, {tuple(gt.shape)}, {len(lab)} labels, {len(idx)} indices")
    if masks.shape[-2:] != gt.shape[-2:]:
        raise ValueError(f"maps {tuple(masks.shape[-2:])} and ground truth {tuple(gt.shape[-2:])} differ in size")
    if max(idx) >= masks.shape[0]:
        raise ValueError(f"image_index up to {max(idx)} but only {masks.shape[0]} images of maps")
    ign = None
    if ignore is not None:
        ign = torch.as_tensor(ignore).bool()
        if ign.shape != (masks.shape[0], *masks.shape[-2:]):
            raise ValueError(f"ignore: expected (n_images, H, W) = {(masks.shape[0], *masks.shape[-2:])}, got "
                             f"{tuple(ign.shape)}")
        ign = ign[idx][:, None]
    scores = iou(masks[idx], gt[:, None], ign)  # (M, heads)
    lab_t = torch.tensor(lab)
    best_head: dict[int, int] = {}
    per_class: dict[int, float] = {}
    chosen = torch.empty(len(lab), dtype=torch.float64)
    for c in sorted(set(lab)):
        sel = lab_t == c
        mean = scores[sel].mean(dim=0)
        k = int(torch.argmax(mean))
        best_head[c], per_class[c] = k, float(mean[k])
        chosen[sel] = scores[sel, k]
    idx_t = torch.tensor(idx)
    per_image = [float(chosen[idx_t == i].mean()) for i in sorted(set(idx))]
    return {"mIoU": float(np.mean(per_image)), "best_head": best_head, "per_class": per_class}


# ---- normalized cut and MaskCut ----------------------------------------------------------------------------------
def _second_eigvec(W: np.ndarray, solver: str) -> np.ndarray:
    """Second-smallest generalized eigenvector x of (D - W) x = lambda D x, D = diag(W 1)."""
    d = W.sum(axis=1)
    if solver == "scipy":
        from scipy.linalg import eigh

        _, vecs = eigh(np.diag(d) - W, np.diag(d), subset_by_index=[1, 1])
        return vecs[:, 0]
    # the symmetric form: D^-1/2 W D^-1/2 y = (1 - lambda) y, x = D^-1/2 y; the second LARGEST eigenvalue of the
    # normalized affinity is the second smallest lambda, and Lanczos finds the top of the spectrum fast
    s = 1.0 / np.sqrt(d)
    M = s[:, None] * W * s[None, :]
    if solver == "sparse":
        from scipy.sparse.linalg import eigsh

        vals, vecs = eigsh(M, k=2, which="LA", v0=np.sqrt(d))
        y = vecs[:, np.argsort(vals)[0]]
    else:
        _, vecs = torch.linalg.eigh(torch.from_numpy(M))
        y = vecs[:, -2].numpy()
    return s * y


def _corners(mask: np.ndarray, grid: tuple[int, int]) -> int:
    g = mask.reshape(grid)
    return int(g[0, 0]) + int(g[0, -1]) + int(g[-1, 0]) + int(g[-1, -1])


def normalized_cut(
    affinity: Any,
    tau: float,
    *,
    grid: tuple[int, int] | None = None,
    eps: float = 1e-5,
    solver: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground/background bipartition of a patch graph by normalized cut (Shi & Malik), as MaskCut cuts.

    Args:
        affinity: (N, N) similarities (MaskCut: cosine similarities of patch features).
        tau: edges with affinity > tau get weight 1, all others ``eps`` (a binary graph that stays connected).
        grid: (h, w) with h * w = N, enabling the corner rule below; ``None`` uses the seed rule alone.
        eps: weight of the non-edges (CutLER: 1e-5).
        solver: ``"scipy"`` (dense generalized ``scipy.linalg.eigh``, CutLER's), ``"sparse"`` (Lanczos,
            ``scipy.sparse.linalg.eigsh`` on the normalized affinity), ``"torch"`` (``torch.linalg.eigh``), or
            ``"auto"`` (scipy up to 4096 patches, else sparse).

    Returns:
        ``(bipartition, eigvec)``: (N,) bool foreground, and the (N,) float64 second-smallest generalized
        eigenvector of (D - W) x = lambda D x, signed so that the foreground is where it exceeds its mean.

    Foreground side (CutLER's rule): split the eigenvector at its mean; the side above the mean is the foreground
    unless (a) it covers 3 or 4 of the grid's corners (an object rarely fills the corners), or, when (a) does not
    apply, (b) the entry of largest absolute value lies on the other side. In either case the sides and the
    eigenvector's sign are swapped.
    """
    A = np.asarray(torch.as_tensor(affinity).detach().cpu().double())
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"affinity must be (N, N), got {A.shape}")
    n = A.shape[0]
    if grid is not None and grid[0] * grid[1] != n:
        raise ValueError(f"grid {tuple(grid)} does not hold {n} patches")
    if solver not in ("auto", "scipy", "sparse", "torch"):
        raise ValueError(f"solver must be 'auto', 'scipy', 'sparse' or 'torch', got {solver!r}")
    if solver == "auto":
        solver = "scipy" if n <= 4096 else "sparse"
    W = np.where(A > tau, 1.0, eps)
    vec = _second_eigvec(W, solver)
    fg = vec > vec.mean()
    seed = int(np.argmax(np.abs(vec)))
    flip = (grid is not None and _corners(fg, grid) >= 3) or not fg[seed]
    if flip:
        vec, fg = -vec, ~fg
    return torch.from_numpy(fg.copy()), torch.from_numpy(np.ascontiguousarray(vec))


def maskcut(
    features: Any,
    tau: float = 0.15,
    n_objects: int = 3,
    grid: tuple[int, int] | None = None,
    *,
    eps: float = 1e-5,
    solver: str = "auto",
    max_overlap: float = 0.5,
    min_area: float = 0.01,
) -> list[torch.Tensor]:
    """MaskCut (CutLER): up to ``n_objects`` object masks from patch features by repeated normalized cuts.

    Args:
        features: (N, D) patch features in row-major grid order (no [CLS]). Any features work; for CRATE the
            paper's affinity sum_k <U_k^T z_i, U_k^T z_j> is the inner product of the heads' projections
            concatenated, i.e. ``proj[l][b, :, 1:].permute(1, 0, 2).flatten(1)`` from ``forward_layer_quantities``.
        tau: affinity threshold on the cosine similarities (CutLER / the CRATE paper: 0.15; CRATE-alpha: 0.3).
        n_objects: rounds of normalized cut (N = 3).
        grid: (h, w) patch grid, h * w = N.
        eps, solver: as :func:`normalized_cut`.
        max_overlap, min_area: a round's mask (after the first) is discarded when its IoU with the previous round's
            mask exceeds ``max_overlap`` or it covers at most ``min_area`` of the grid (CutLER's filters).

    Returns:
        The non-empty (h, w) bool masks in discovery order, pairwise disjoint (a later mask loses the patches an
        earlier one took), at most ``n_objects``.

    Each round: cosine affinity of the features, :func:`normalized_cut` with the corner and seed rules; the mask is
    the 4-connected component of the foreground containing the seed (the largest entry of the signed eigenvector).
    Between rounds the features of every patch found so far are set to zero, so their cosine with everything is 0
    and they keep only ``eps`` edges, as CutLER masks the affinity.
    """
    from scipy import ndimage

    f = torch.as_tensor(features).detach().cpu().double()
    if grid is None:
        raise ValueError("maskcut needs the patch grid (h, w)")
    h, w = grid
    if f.ndim != 2 or f.shape[0] != h * w:
        raise ValueError(f"features must be (h*w, D) = ({h * w}, D), got {tuple(f.shape)}")
    taken = torch.zeros(h * w, dtype=torch.bool)
    prev: torch.Tensor | None = None
    out: list[torch.Tensor] = []
    for i in range(n_objects):
        if int((~taken).sum()) < 2:
            break
        g = F.normalize(f * (~taken).double()[:, None], dim=1)
        fg, vec = normalized_cut(g @ g.T, tau, grid=grid, eps=eps, solver=solver)
        seed = int(torch.argmax(vec))
        labels, _ = ndimage.label(fg.numpy().reshape(h, w))
        mask = torch.from_numpy(labels == labels.reshape(-1)[seed])
        if i >= 1 and prev is not None and (
            float(iou(prev, mask)) > max_overlap or float(mask.float().mean()) <= min_area
        ):
            mask = torch.zeros_like(mask)
        prev = mask
        new = mask & ~taken.reshape(h, w)
        taken |= mask.reshape(-1)
        if new.any():
            out.append(new)
    return out


def mask_boxes(masks: Any) -> torch.Tensor:
    """(M, H, W) bool masks -> (M, 4) COCO boxes [x, y, w, h] tight around each mask's pixels (as
    ``pycocotools.mask.toBbox``: a mask on columns 3..5 has x = 3, w = 3); an empty mask gives zeros."""
    m = torch.as_tensor(masks).bool()
    if m.ndim == 2:
        m = m[None]
    boxes = torch.zeros(m.shape[0], 4, dtype=torch.float64)
    for i, mk in enumerate(m):
        ys, xs = torch.nonzero(mk, as_tuple=True)
        if len(xs):
            x0, y0 = int(xs.min()), int(ys.min())
            boxes[i] = torch.tensor([x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1], dtype=torch.float64)
    return boxes


# ---- PCA ---------------------------------------------------------------------------------------------------------
def _pca(x: torch.Tensor, k: int) -> torch.Tensor:
    """Scores (n, k) on the top-k principal components, each component signed so its largest loading is positive
    (sklearn's ``svd_flip`` convention, so results do not depend on the SVD routine's sign choice)."""
    xc = x - x.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(xc, full_matrices=False)
    vh = vh[:k]
    sign = torch.sign(vh.gather(1, vh.abs().argmax(dim=1, keepdim=True)))
    vh = vh * torch.where(sign == 0, torch.ones_like(sign), sign)
    scores = xc @ vh.T
    if scores.shape[1] < k:
        scores = torch.cat([scores, scores.new_zeros(scores.shape[0], k - scores.shape[1])], dim=1)
    return scores


def _minmax(s: torch.Tensor) -> torch.Tensor:
    lo, hi = s.min(dim=0).values, s.max(dim=0).values
    return (s - lo) / (hi - lo).clamp(min=1e-12)


def pca_rgb(
    features: Any,
    grid: tuple[int, int],
    background_threshold: float | None = 0.4,
    *,
    fill_holes: bool = True,
) -> torch.Tensor:
    """PCA of patch features as an RGB picture (§3.4): (N, D) -> (h, w, 3), or (J, N, D) -> (J, h, w, 3), in [0, 1].

    Args:
        features: patch features of one image (N, D) or of J images fitted together (J, N, D) (the paper: J
            same-class images; CRATE: the heads' projections concatenated, ViT: the keys).
        grid: (h, w), h * w = N.
        background_threshold: foreground = patches whose first-component score, min-max normalized to [0, 1] per
            image, exceeds this (the authors' ``pca_visualization.py`` uses 0.4 on the normalized score; the 12
            quoted for a demo is on raw scores, which depend on the features' scale, so it is not the default).
            The first component's sign is arbitrary: when the foreground covers 3 or more corners of the grid the
            sides are swapped (the MaskCut corner rule). ``None``: no background removal (the layer-wise figure).
        fill_holes: fill holes of each image's foreground (``scipy.ndimage.binary_fill_holes``, as the script).

    Returns:
        float32 RGB, the top-3 components of a second PCA fitted on the foreground patches only, each min-max
        normalized over an image's foreground; background patches are 0 (black).
    """
    x = torch.as_tensor(features).detach().cpu().double()
    single = x.ndim == 2
    if single:
        x = x[None]
    J, N, D = x.shape
    h, w = grid
    if h * w != N:
        raise ValueError(f"grid {tuple(grid)} does not hold {N} patches")
    flat = x.reshape(J * N, D)
    if background_threshold is None:
        fg = torch.ones(J, N, dtype=torch.bool)
    else:
        from scipy import ndimage

        first = _pca(flat, 1).reshape(J, N)
        fg = torch.stack([_minmax(s[:, None])[:, 0] > background_threshold for s in first])
        masks = []
        for m in fg:
            g = m.numpy().reshape(h, w)
            if _corners(g.reshape(-1), grid) >= 3:
                g = ~g
            if fill_holes:
                g = ndimage.binary_fill_holes(g)
            masks.append(torch.from_numpy(np.ascontiguousarray(g)).reshape(-1))
        fg = torch.stack(masks)
    rgb = torch.zeros(J, N, 3, dtype=torch.float64)
    sel = fg.reshape(-1)
    if int(sel.sum()) >= 2:
        scores = torch.zeros(J * N, 3, dtype=torch.float64)
        scores[sel] = _pca(flat[sel], 3)
        scores = scores.reshape(J, N, 3)
        for j in range(J):
            if fg[j].any():
                rgb[j, fg[j]] = _minmax(scores[j, fg[j]])
    out = rgb.reshape(J, h, w, 3).float()
    return out[0] if single else out
