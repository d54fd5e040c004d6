"""ratelab.analysis.segmentation: attention maps against direct computations, thresholds, IoU, NCut, MaskCut, PCA."""

from __future__ import annotations

import pytest
import torch

from ratelab import create_model
from ratelab.analysis.segmentation import (
    best_head_miou,
    cls_attention_maps,
    iou,
    mask_boxes,
    maskcut,
    normalized_cut,
    patch_features,
    pca_rgb,
    semantic_targets,
    threshold_top,
)


# ---- attention maps ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def crate():
    torch.manual_seed(0)
    return create_model("test_crate").eval()


def test_crate_attention_reading_is_the_cls_row_of_forward_intermediates(crate):
    x = torch.randn(2, 3, 8, 8)
    maps = cls_attention_maps(crate, x, layer=-2, upsample=False)
    _, _, attn = crate.forward_intermediates(x, indices=[-2], return_attn=True)
    K = attn[0].shape[1]
    grid = crate.grid_size
    assert maps.shape == (2, K, *grid)
    torch.testing.assert_close(maps, attn[0][:, :, 0, 1:].reshape(2, K, *grid))


def test_crate_equation_reading_is_the_papers_formula(crate):
    x = torch.randn(2, 3, 8, 8)
    maps = cls_attention_maps(crate, x, layer=-2, reading="equation", upsample=False)
    w = crate.forward_layer_quantities(x, indices=[-2])["proj"][0]  # (B, K, N+1, p)
    B, K = w.shape[:2]
    expect = torch.empty(B, K, w.shape[2] - 1)
    for b in range(B):
        for k in range(K):
            logits = w[b, k, 1:] @ w[b, k, 0]  # <U_k^T z_i, U_k^T z_cls>, no temperature
            expect[b, k] = torch.exp(logits - logits.max()) / torch.exp(logits - logits.max()).sum()
    torch.testing.assert_close(maps.flatten(2), expect)
    torch.testing.assert_close(maps.sum(dim=(-2, -1)), torch.ones(B, K))


def test_larger_input_and_upsampling(crate):
    x = torch.randn(1, 3, 8, 8)
    maps = cls_attention_maps(crate, x, img_size=16, upsample=False)
    assert maps.shape[-2:] == (16 // crate.cfg.patch_size,) * 2
    # equals the model run directly on the resized image (its position embeddings resampled to the 2x grid)
    big = torch.nn.functional.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(maps, cls_attention_maps(crate, big, upsample=False))
    up = cls_attention_maps(crate, x, img_size=16)
    assert up.shape[-2:] == (8, 8)
    nearest = cls_attention_maps(crate, x, upsample="nearest")
    coarse = cls_attention_maps(crate, x, upsample=False)
    p = crate.cfg.patch_size
    torch.testing.assert_close(nearest[..., ::p, ::p], coarse)
    assert cls_attention_maps(crate, x, upsample="bilinear").shape == nearest.shape
    assert crate.training is False


def test_timm_vit_adapter_matches_a_direct_computation():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, depth=2,
                            num_heads=3, embed_dim=48, num_classes=0, dynamic_img_size=True).eval()
    x = torch.randn(2, 3, 16, 16)
    maps = cls_attention_maps(vit, x, layer=-1, upsample=False)
    # direct: the last block's attention from its own normalized input, the explicit softmax path
    with torch.no_grad():
        t = vit.patch_embed(x)
        t = vit._pos_embed(t)
        t = vit.norm_pre(vit.patch_drop(t))
        t = vit.blocks[0](t)
        blk = vit.blocks[1]
        a = blk.norm1(t)
        B, N, C = a.shape
        qkv = blk.attn.qkv(a).reshape(B, N, 3, 3, C // 3).permute(2, 0, 3, 1, 4)
        q, k = qkv[0], qkv[1]
        attn = ((q * blk.attn.scale) @ k.transpose(-2, -1)).softmax(-1)
    torch.testing.assert_close(maps, attn[:, :, 0, 1:].reshape(2, 3, 4, 4))
    eq = cls_attention_maps(vit, x, layer=-1, reading="equation", upsample=False)
    torch.testing.assert_close(eq.flatten(2), (q[:, :, :1] @ k[:, :, 1:].transpose(-2, -1)).softmax(-1)[:, :, 0])
    bigger = cls_attention_maps(vit, x, layer=-1, img_size=32, upsample=False)
    assert bigger.shape == (2, 3, 8, 8)


@pytest.mark.parametrize("name", ["crate_mlp_pico_patch4_16", "crate_mhsa_pico_patch4_16", "test_crate_alpha",
                                  "test_crate_mae"])
def test_every_family_gives_maps_and_features(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    c = model.in_chans
    size = model.img_size if isinstance(model.img_size, int) else model.img_size[0]
    x = torch.randn(2, c, size, size)
    maps = cls_attention_maps(model, x, upsample=False)
    _, _, attn = model.forward_intermediates(x, indices=[-2], return_attn=True)
    torch.testing.assert_close(maps.flatten(2), attn[0][:, :, 0, 1:])
    assert cls_attention_maps(model, x, img_size=2 * size).shape[-2:] == (size, size)
    feats = patch_features(model, x)
    assert feats.shape[:2] == (2, maps.shape[-2] * maps.shape[-1])
    if "mhsa" in name:
        with pytest.raises(TypeError, match="reading='attention'"):
            cls_attention_maps(model, x, reading="equation")
    else:
        eq = cls_attention_maps(model, x, reading="equation", upsample=False)
        torch.testing.assert_close(eq.sum(dim=(-2, -1)), torch.ones(eq.shape[:2]))


def test_patch_features_are_the_concatenated_projections(crate):
    x = torch.randn(1, 3, 8, 8)
    w = crate.forward_layer_quantities(x, indices=[-2])["proj"][0][0, :, 1:]  # (K, N, p)
    f = patch_features(crate, x)[0]
    # <f_i, f_j> = sum_k <U_k^T z_i, U_k^T z_j>, the paper's MaskCut affinity
    torch.testing.assert_close(f @ f.T, torch.einsum("kip,kjp->ij", w, w))
    assert patch_features(crate, x, kind="tokens").shape == (1, 4, crate.embed_dim)


def test_attention_maps_reject_models_without_attention():
    with pytest.raises(TypeError, match="patch size|exposes no attention"):
        cls_attention_maps(torch.nn.Linear(2, 2), torch.randn(1, 3, 8, 8))


# ---- thresholds and IoU ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [10, 16, 49])
def test_entries_threshold_keeps_exactly_the_share(n):
    torch.manual_seed(n)
    maps = torch.rand(3, 2, n, 1)
    m = threshold_top(maps, p=0.6, mode="entries")
    expect = -(-6 * n // 10)  # ceil(0.6 n) in exact integer arithmetic
    assert (m.sum(dim=(-2, -1)) == expect).all()
    # kept entries are the largest ones
    for a, k in zip(maps.reshape(6, n), m.reshape(6, n)):
        assert a[k].min() >= a[~k].max() if (~k).any() else True


def test_entries_threshold_breaks_ties_to_keep_the_count():
    m = threshold_top(torch.ones(1, 5, 2), p=0.6)
    assert int(m.sum()) == 6


def test_mass_threshold_keeps_the_smallest_set_holding_the_share():
    torch.manual_seed(1)
    maps = torch.rand(4, 7, 7) ** 3
    m = threshold_top(maps, p=0.6, mode="mass")
    for a, k in zip(maps.reshape(4, -1).double(), m.reshape(4, -1)):
        share = a[k].sum() / a.sum()
        assert share >= 0.6
        assert a[k].min() >= a[~k].max()
        # dropping the smallest kept entry falls below the share: the set is minimal
        assert (a[k].sum() - a[k].min()) / a.sum() < 0.6
    exact = torch.tensor([[0.5, 0.125], [0.25, 0.125]])  # binary fractions: 0.5 + 0.25 is exactly 0.75 of the mass
    assert threshold_top(exact, p=0.75, mode="mass").tolist() == [[True, False], [True, False]]
    assert not threshold_top(torch.zeros(3, 3), mode="mass").any()


def test_iou_and_best_head_miou_on_hand_made_masks():
    a = torch.zeros(4, 4, dtype=torch.bool)
    a[:2, :2] = True  # 4 pixels
    b = torch.zeros(4, 4, dtype=torch.bool)
    b[:2, :] = True  # 8 pixels, contains a
    assert float(iou(a, b)) == pytest.approx(0.5)
    assert float(iou(a, a)) == 1.0
    assert float(iou(a, ~a)) == 0.0
    # two images, two heads; image 0 has classes 1 and 2, image 1 has class 1
    gt = torch.stack([a, ~b, b])
    labels = [1, 2, 1]
    image_index = [0, 0, 1]
    masks = torch.stack([torch.stack([a, ~b]), torch.stack([b, a])])  # (2 images, 2 heads, 4, 4)
    res = best_head_miou(masks, gt, labels, image_index=image_index)
    # class 1: head 0 -> IoU(a, a) = 1 on image 0, IoU(b, b) = 1 on image 1; head 1 -> 0 and 0.5
    # class 2 (image 0 only): head 1 -> IoU(~b, ~b) = 1
    assert res["best_head"] == {1: 0, 2: 1}
    assert res["per_class"] == {1: pytest.approx(1.0), 2: pytest.approx(1.0)}
    assert res["mIoU"] == pytest.approx(1.0)
    # swap image 1's heads: class 1's best head stays 0 (mean (1 + 0.5) / 2 vs (0 + 1) / 2)
    masks2 = torch.stack([torch.stack([a, ~b]), torch.stack([a, b])])
    res2 = best_head_miou(masks2, gt, labels, image_index=image_index)
    assert res2["best_head"][1] == 0
    assert res2["per_class"][1] == pytest.approx(0.75)
    # image 0: (1 + 1) / 2; image 1: 0.5 -> mIoU 0.75 (classes averaged within an image, then images)
    assert res2["mIoU"] == pytest.approx(0.75)


def test_void_pixels_count_neither_as_hit_nor_miss():
    """VOC scoring: the 255 band around objects is left out of both masks; a prediction that spills into it loses
    nothing, one that covers real background does."""
    lm = torch.zeros(2, 6, 6, dtype=torch.int64)
    lm[0, 1:4, 1:4] = 7
    lm[0, 0, :] = 255  # void band above the object
    lm[1, 2:5, 2:5] = 3
    lm[1, 0:2, 0:2] = 7
    t = semantic_targets(lm)
    assert t["labels"] == [7, 3, 7] and t["image_index"] == [0, 1, 1]
    assert t["gt_masks"].shape == (3, 6, 6) and int(t["gt_masks"][0].sum()) == 9
    assert int(t["ignore"].sum()) == 6 and bool(t["ignore"][0, 0].all())
    pred = torch.zeros(2, 1, 6, 6, dtype=torch.bool)
    pred[0, 0] = (lm[0] == 7) | (lm[0] == 255)  # object + the void band
    pred[1, 0] = lm[1] > 0
    with_void = best_head_miou(pred, t["gt_masks"], t["labels"], image_index=t["image_index"], ignore=t["ignore"])
    without = best_head_miou(pred, t["gt_masks"], t["labels"], image_index=t["image_index"])
    # image 0: 1 with the band ignored, 9/15 without; image 1: both classes share the one head's mask
    iou_3, iou_7 = 9 / 13, 4 / 13
    assert with_void["per_class"][7] == pytest.approx((1 + iou_7) / 2)
    assert with_void["mIoU"] == pytest.approx((1 + (iou_3 + iou_7) / 2) / 2)
    assert without["per_class"][7] == pytest.approx((9 / 15 + iou_7) / 2)
    assert float(iou(pred[0, 0], lm[0] == 7, lm[0] == 255)) == 1.0
    spill = pred[0, 0] | (lm[0] == 0)  # covering real background is still a miss
    assert float(iou(spill, lm[0] == 7, lm[0] == 255)) < 1.0
    with pytest.raises(ValueError, match="ignore"):
        best_head_miou(pred, t["gt_masks"], t["labels"], image_index=t["image_index"], ignore=t["ignore"][:1])
    with pytest.raises(ValueError, match="label_maps"):
        semantic_targets(lm.float())


def test_best_head_miou_thresholds_float_maps():
    gt = torch.zeros(1, 5, 2, dtype=torch.bool)
    gt[0, :3] = True  # 6 of 10 pixels
    maps = torch.stack([gt[0].float() + 0.01 * torch.rand(5, 2), torch.rand(5, 2)])[None]
    res = best_head_miou(maps, gt, [3])
    assert res["best_head"] == {3: 0}
    assert res["mIoU"] == pytest.approx(1.0)


# ---- normalized cut and MaskCut ----------------------------------------------------------------------------------
def test_normalized_cut_recovers_two_blocks():
    g = torch.Generator().manual_seed(0)
    n = 30
    truth = torch.zeros(n, dtype=torch.bool)
    truth[torch.randperm(n, generator=g)[:12]] = True
    same = truth[:, None] == truth[None, :]
    affinity = torch.where(same, 0.8, 0.0) + 0.1 * torch.randn(n, n, generator=g)
    affinity = (affinity + affinity.T) / 2
    for solver in ("scipy", "sparse", "torch"):
        part, vec = normalized_cut(affinity, tau=0.4, solver=solver)
        assert part.dtype == torch.bool and vec.shape == (n,)
        assert torch.equal(part, truth) or torch.equal(part, ~truth)
        assert torch.equal(part, vec > vec.mean())
        # seed rule: the entry of largest magnitude is on the foreground side
        assert part[int(vec.abs().argmax())] or part.sum() == 0


def test_normalized_cut_corner_rule_picks_the_object_not_the_frame():
    h = w = 6
    obj = torch.zeros(h, w, dtype=torch.bool)
    obj[2:4, 2:4] = True
    lab = obj.reshape(-1)
    affinity = torch.where(lab[:, None] == lab[None, :], 1.0, 0.0)
    part, _ = normalized_cut(affinity, tau=0.5, grid=(h, w))
    assert torch.equal(part.reshape(h, w), obj)


def _planted(h: int, w: int, boxes, d: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    # orthonormal directions: background and objects have cosine ~0, far below tau
    dirs = torch.linalg.qr(torch.randn(d, len(boxes) + 1, generator=g))[0].T
    feats = dirs[0].expand(h, w, d).clone()
    truths = []
    for i, (y0, y1, x0, x1) in enumerate(boxes, start=1):
        feats[y0:y1, x0:x1] = dirs[i]
        m = torch.zeros(h, w, dtype=torch.bool)
        m[y0:y1, x0:x1] = True
        truths.append(m)
    feats = feats + 0.05 * torch.randn(h, w, d, generator=g)
    return feats.reshape(h * w, d), truths


def test_maskcut_finds_two_planted_objects():
    h, w = 12, 12
    feats, truths = _planted(h, w, [(1, 5, 1, 6), (7, 11, 6, 11)])
    masks = maskcut(feats, tau=0.15, n_objects=3, grid=(h, w))
    assert 2 <= len(masks) <= 3
    for t in truths:
        assert max(float(iou(m, t)) for m in masks) > 0.9
    for i in range(len(masks)):
        for j in range(i):
            assert not (masks[i] & masks[j]).any()
    boxes = mask_boxes(torch.stack(masks[:2]))
    found = {tuple(b.tolist()) for b in boxes}
    assert {(1.0, 1.0, 5.0, 4.0), (6.0, 7.0, 5.0, 4.0)} <= found


def test_maskcut_checks_the_grid():
    with pytest.raises(ValueError, match="h\\*w"):
        maskcut(torch.randn(10, 4), grid=(3, 3))


# ---- PCA ---------------------------------------------------------------------------------------------------------
def test_pca_rgb_shape_range_and_background():
    h, w = 10, 10
    feats, truths = _planted(h, w, [(2, 8, 3, 7)], d=8)
    feats = feats + 0.3 * torch.randn(feats.shape, generator=torch.Generator().manual_seed(3))
    rgb = pca_rgb(feats, (h, w))
    assert rgb.shape == (h, w, 3) and rgb.dtype == torch.float32
    assert rgb.min() >= 0 and rgb.max() <= 1
    fg = rgb.abs().sum(-1) > 0
    assert float(iou(fg, truths[0])) > 0.8
    both = pca_rgb(torch.stack([feats, feats]), (h, w), background_threshold=None)
    assert both.shape == (2, h, w, 3) and both.min() >= 0 and both.max() <= 1
