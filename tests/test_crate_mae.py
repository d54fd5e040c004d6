"""CRATE-MAE and the matched ViT-MAE: parameter counts, MAE's masking / patch / loss conventions, the encoder that sees
every token, the decoder layer's equation, the encoder API (features, intermediates) and the per-layer quantities of
both stacks with the rate measures."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ratelab
from ratelab.analysis.layer_rates import compression, measure_layers
from ratelab.core.errors import ConfigError
from ratelab.models.crate_mae import CrateMAE
from ratelab.models.crate_mae.mae import mae_loss, random_masking, sincos_pos_embed_2d, unpatchify
from ratelab.models.mae_vit import MaeVit

torch.set_num_threads(1)

# Totals with both fixed position tables and the unused decoder_embed, as published (CRATE-MAE paper / book table;
# design note §4.5): tiny/large are the official code's other sizes, counted the same way.
PUBLISHED = {
    "crate_mae_tiny_patch16_224": 11_555_328,
    "crate_mae_small_patch16_224": 25_405_824,
    "crate_mae_base_patch16_224": 44_638_464,
    "crate_mae_large_patch16_224": 154_274_560,
    "mae_vit_base_patch16_224": 143_790_336,
}
MAE_MODELS = ("test_crate_mae", "test_mae_vit")
TWINS = [("crate_mae_nano_patch4_16", "mae_vit_nano_patch4_16"), ("crate_mae_pico_patch4_16", "mae_vit_pico_patch4_16"),
         ("test_crate_mae", "test_mae_vit")]


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def images(model, batch: int = 2, size: int | None = None, seed: int = 0) -> torch.Tensor:
    s = size or model.img_size
    return torch.randn(batch, model.in_chans, s, s, generator=torch.Generator().manual_seed(seed))


def noise_for(x: torch.Tensor, patch: int, seed: int = 1) -> torch.Tensor:
    n = (x.shape[-2] // patch) * (x.shape[-1] // patch)
    return torch.rand(x.shape[0], n, generator=torch.Generator().manual_seed(seed))


def closed_form_crate_mae(model: CrateMAE) -> int:
    """Stem conv, [CLS] + mask token, two (N+1) x d tables, (3 d^2 + 5 d) per layer of both stacks, norms,
    decoder_embed and the pixel predictor."""
    cfg, d = model.cfg, model.cfg.embed_dim
    p2c = cfg.patch_size**2 * model.in_chans
    n = (model.img_size // cfg.patch_size) ** 2
    return ((p2c * d + d) + 2 * d + 2 * (n + 1) * d + (cfg.depth + cfg.decoder_depth) * (3 * d * d + 5 * d)
            + 2 * 2 * d + (d * d + d) + (d * p2c + p2c))


# ---- sizes -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_parameter_counts(name):
    with torch.device("meta"):
        model = ratelab.create_model(name)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert count(model) == PUBLISHED[name]
    if isinstance(model, CrateMAE):
        assert count(model) == closed_form_crate_mae(model)


def test_parameter_ratio_is_the_papers_thirty_percent():
    ratio = PUBLISHED["crate_mae_base_patch16_224"] / PUBLISHED["mae_vit_base_patch16_224"]
    assert round(ratio, 3) == 0.310 and (round(44.6 / 143.8, 3)) == 0.310


@pytest.mark.parametrize("name", ratelab.list_models("crate_mae_*") + ["test_crate_mae"])
def test_every_crate_mae_size_has_the_closed_form_count(name):
    with torch.device("meta"):
        model = ratelab.create_model(name)
    assert count(model) == closed_form_crate_mae(model)
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad


def test_official_sizes_and_fair_sizes():
    with torch.device("meta"):
        cfg = {n: ratelab.create_model(n).cfg for n in ratelab.list_models("*mae*")}
    assert (cfg["crate_mae_tiny_patch16_224"].embed_dim, cfg["crate_mae_tiny_patch16_224"].num_heads) == (384, 6)
    large = cfg["crate_mae_large_patch16_224"]
    assert (large.embed_dim, large.depth, large.decoder_depth, large.num_heads) == (1024, 24, 24, 16)
    base = cfg["mae_vit_base_patch16_224"]
    assert (base.decoder_embed_dim, base.decoder_depth, base.decoder_num_heads, base.qkv_bias) == (768, 8, 16, False)
    fair = cfg["mae_vit_large_patch16_dec512d8b_224"]
    assert (fair.embed_dim, fair.depth, fair.decoder_embed_dim, fair.decoder_depth, fair.qkv_bias) == (
        1024, 24, 512, 8, True)


@pytest.mark.parametrize(("crate_name", "vit_name"), TWINS)
def test_small_vit_maes_are_block_for_block_twins(crate_name, vit_name):
    c, v = ratelab.create_model(crate_name), ratelab.create_model(vit_name)
    assert (c.img_size, c.in_chans, c.patch_size) == (v.img_size, v.in_chans, v.patch_size)
    assert (c.cfg.embed_dim, c.cfg.depth, c.cfg.num_heads, c.cfg.decoder_depth, c.cfg.decoder_num_heads) == (
        v.cfg.embed_dim, v.cfg.depth, v.cfg.num_heads, v.cfg.decoder_depth, v.cfg.decoder_num_heads)
    assert v.cfg.decoder_embed_dim == c.cfg.embed_dim
    assert count(c) < count(v) / 2.5  # 3 d^2 against 12 d^2 per layer


# ---- MAE conventions -------------------------------------------------------------------------------------------------
def test_masking_reproduces_maes_indices():
    # MAE's rule, computed here with numpy: ascending argsort of the noise, keep the first int(N * (1 - r)),
    # ids_restore the inverse permutation, mask 1 on the removed patches in the original order.
    g = torch.Generator().manual_seed(3)
    B, N, r = 3, 16, 0.75
    noise = torch.rand(B, N, generator=g)
    ids_keep, mask, ids_restore = random_masking(B, N, r, noise=noise)
    nz = noise.numpy()
    shuffle = np.argsort(nz, axis=1, kind="stable")
    keep = int(N * (1 - r))
    restore = np.empty_like(shuffle)
    for b in range(B):
        restore[b, shuffle[b]] = np.arange(N)
    expect_mask = np.ones((B, N), dtype=np.float32)
    for b in range(B):
        expect_mask[b, shuffle[b, :keep]] = 0
    np.testing.assert_array_equal(ids_keep.numpy(), shuffle[:, :keep])
    np.testing.assert_array_equal(ids_restore.numpy(), restore)
    np.testing.assert_array_equal(mask.numpy(), expect_mask)
    assert mask.dtype == torch.float32


@pytest.mark.parametrize("name", MAE_MODELS)
def test_models_use_the_given_noise(name):
    model = ratelab.create_model(name).eval()
    x = images(model, batch=3, size=16)
    noise = noise_for(x, model.patch_size)
    _, mask, ids_restore = model.forward_encoder(x, 0.75, noise)
    _, expect_mask, expect_restore = random_masking(3, 16, 0.75, noise=noise)
    assert torch.equal(mask, expect_mask) and torch.equal(ids_restore, expect_restore)
    loss1, pred1, mask1 = model(x, noise=noise)
    loss2, pred2, mask2 = model(x, noise=noise)
    assert torch.equal(loss1, loss2) and torch.equal(pred1, pred2) and torch.equal(mask1, mask)
    torch.manual_seed(0)
    _, _, m1 = model(x)
    torch.manual_seed(0)
    _, _, m2 = model(x)
    assert torch.equal(m1, m2) and m1.sum() == 3 * 12  # global-generator noise when none is given; 4 of 16 kept


def test_sincos_table_is_maes():
    dim, (h, w) = 16, (3, 5)
    table = sincos_pos_embed_2d(dim, (h, w))
    assert table.shape == (1, 1 + h * w, dim) and table.dtype == torch.float32
    assert torch.equal(table[0, 0], torch.zeros(dim))

    def one_d(pos, half):  # MAE: omega_k = 1 / 10000^(k / (half / 2)), [sin | cos]
        omega = 1.0 / 10000 ** (np.arange(half // 2) / (half / 2))
        out = np.outer(pos, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    rows, cols = np.divmod(np.arange(h * w), w)
    expect = np.concatenate([one_d(cols, dim // 2), one_d(rows, dim // 2)], axis=1)  # column first, as MAE
    np.testing.assert_allclose(table[0, 1:].numpy(), expect, atol=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d(18, (2, 2))


@pytest.mark.parametrize("chans", [3, 1])
def test_patchify_is_maes_order_and_unpatchify_inverts_it(chans):
    model = ratelab.create_model("test_crate_mae", in_chans=chans, img_size=8)
    x = images(model, batch=2)
    p, h = 4, 2
    # MAE: reshape (N, C, h, p, w, q) -> einsum nchpwq->nhwpqc -> (N, h*w, p*q*C)
    expect = torch.einsum("nchpwq->nhwpqc", x.reshape(2, chans, h, p, h, p)).reshape(2, h * h, p * p * chans)
    assert torch.equal(model.patchify(x), expect)
    assert torch.equal(model.unpatchify(model.patchify(x)), x)
    wide = torch.randn(1, chans, 8, 12)
    assert torch.equal(unpatchify(model.patchify(wide), p, chans, grid=(2, 3)), wide)


@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("name", MAE_MODELS)
def test_loss_is_the_mse_of_masked_patches(name, norm_pix):
    model = ratelab.create_model(name, norm_pix_loss=norm_pix).eval()
    assert model.norm_pix_loss is norm_pix and model.model_args["norm_pix_loss"] is norm_pix
    x = images(model, batch=3, size=16)
    loss, pred, mask = model(x, 0.75, noise_for(x, 4))
    target = model.patchify(x)
    if norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / torch.sqrt(target.var(-1, keepdim=True) + 1e-6)
    per_patch = ((pred - target) ** 2).mean(-1)
    expect = per_patch[mask.bool()].mean()
    torch.testing.assert_close(loss, expect, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model.forward_loss(x, pred, mask), loss, atol=0, rtol=0)
    # Changing predictions of visible patches changes nothing.
    bumped = pred + (1 - mask).unsqueeze(-1) * 5.0
    torch.testing.assert_close(mae_loss(model.patchify(x), bumped, mask, norm_pix_loss=norm_pix), loss)


@pytest.mark.parametrize("name", MAE_MODELS)
def test_masked_pixels_do_not_reach_the_prediction(name):
    # Both models ignore what is under the mask: CRATE-MAE replaces it by the mask token, ViT-MAE drops it.
    model = ratelab.create_model(name).eval()
    x = images(model, batch=2, size=16)
    noise = noise_for(x, 4)
    latent, mask, _ = model.forward_encoder(x, 0.75, noise)
    under = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, 48), grid=(4, 4))
    y = x + 3.0 * under * torch.randn_like(x)
    assert not torch.equal(x, y)
    latent2, _, _ = model.forward_encoder(y, 0.75, noise)
    torch.testing.assert_close(latent2, latent, atol=0, rtol=0)
    _, pred, _ = model(x, 0.75, noise)
    _, pred2, _ = model(y, 0.75, noise)
    torch.testing.assert_close(pred2, pred, atol=0, rtol=0)


def test_crate_mae_encoder_sees_every_token_vit_mae_only_the_kept_ones():
    c, v = ratelab.create_model("test_crate_mae").eval(), ratelab.create_model("test_mae_vit").eval()
    x = images(c, batch=2, size=16)
    noise = noise_for(x, 4)
    lc, _, _ = c.forward_encoder(x, 0.75, noise)
    lv, _, _ = v.forward_encoder(x, 0.75, noise)
    assert lc.shape == (2, 17, 32) and lv.shape == (2, 1 + 4, 32)


# ---- CRATE-MAE layers ------------------------------------------------------------------------------------------------
def _mssa(attn, z):
    w = attn.qkv(z).reshape(*z.shape[:2], attn.num_heads, attn.head_dim).transpose(1, 2)
    a = torch.softmax(w @ w.transpose(-1, -2) / math.sqrt(attn.head_dim), dim=-1)
    return attn.proj((a @ w).transpose(1, 2).reshape(z.shape))


def test_layers_are_the_papers_equations():
    model = ratelab.create_model("test_crate_mae").double().eval()
    torch.manual_seed(0)
    z = torch.randn(2, 5, 32, dtype=torch.float64)
    enc = model.blocks[0]
    assert (enc.ista.step, enc.ista.lambd) == (0.1, 0.5) and enc.norm1.eps == 1e-5
    half = z + _mssa(enc.attn, enc.norm1(z))
    b, D = enc.norm2(half), enc.ista.weight
    expect = torch.relu(b + 0.1 * (b - b @ D.T) @ D - 0.1 * 0.5)
    torch.testing.assert_close(enc(z), expect, atol=1e-12, rtol=1e-10)
    dec = model.decoder_blocks[0]
    y_half = dec.norm2(z) @ dec.dictionary.weight.T  # D~ LN(y): no bias, no ReLU
    expect = y_half - _mssa(dec.attn, dec.norm1(y_half))
    torch.testing.assert_close(dec(z), expect, atol=1e-12, rtol=1e-10)
    assert model.norm.eps == model.decoder_norm.eps == 1e-6 and dec.attn.proj.bias is not None


def test_fast_paths_match_the_reference_forms():
    model = ratelab.create_model("test_crate_mae").eval()
    x = images(model, batch=4, size=16)
    noise = noise_for(x, 4)
    fast = model(x, 0.75, noise)
    model.set_attn_backend("ref")
    model.set_fused_ista(False)
    ref = model(x, 0.75, noise)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_init_is_the_official_one():
    model = ratelab.create_model("crate_mae_pico_patch4_16")
    table = sincos_pos_embed_2d(64, (4, 4))
    assert torch.equal(model.pos_embed, table) and torch.equal(model.decoder_pos_embed, table)
    assert all(torch.count_nonzero(m.bias) == 0 for m in model.modules() if isinstance(m, torch.nn.Linear)
               and m.bias is not None)
    bound = math.sqrt(6 / 64)  # kaiming-uniform, a = 0: the dictionaries are not xavier-initialized Linears
    for w in (model.blocks[0].ista.weight, model.decoder_blocks[0].dictionary.weight):
        assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert 0.01 < model.cls_token.std() < 0.04


# ---- the encoder API -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MAE_MODELS)
def test_forward_features_is_the_unmasked_latent_and_draws_no_noise(name):
    model = ratelab.create_model(name).eval()
    x = images(model, batch=2, size=16)
    state = torch.random.get_rng_state()
    feats = model.forward_features(x)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert feats.shape == (2, 17, 32) and model.num_prefix_tokens == 1
    latent, mask, _ = model.forward_encoder(x, 0.0, torch.arange(16.0).expand(2, 16))
    assert mask.sum() == 0
    torch.testing.assert_close(latent, feats, atol=1e-6, rtol=1e-6)
    normed = F.layer_norm(feats, (32,), model.norm.weight, model.norm.bias, eps=1e-6)
    torch.testing.assert_close(normed, feats, atol=1e-5, rtol=1e-5)  # already after the final norm


@pytest.mark.parametrize("name", MAE_MODELS)
def test_forward_intermediates_with_attention(name):
    model = ratelab.create_model(name).eval()
    x = images(model, batch=2, size=16)
    final, inter, attn = model.forward_intermediates(x, return_attn=True)
    torch.testing.assert_close(final, model.forward_features(x), atol=1e-5, rtol=1e-5)
    assert len(inter) == len(attn) == 2 and inter[0].shape == (2, 16, 32)
    assert attn[0].shape == (2, 2, 17, 17)
    torch.testing.assert_close(attn[0].sum(-1), torch.ones(2, 2, 17))
    maps = model.forward_intermediates(x, indices=[-2], output_fmt="NCHW", intermediates_only=True)
    assert maps[0].shape == (2, 32, 4, 4)
    (spatial, cls), = model.forward_intermediates(x, indices=1, return_prefix_tokens=True, intermediates_only=True)
    assert cls.shape == (2, 1, 32)
    if name == "test_crate_mae":  # CRATE-MAE's maps are the MSSA's own softmax(U^T z (U^T z)^T / sqrt(p))
        blk = model.blocks[0]
        z = model._embed_visible(x)
        w = blk.attn.project(blk.norm1(z))
        torch.testing.assert_close(attn[0], torch.softmax(w @ w.transpose(-1, -2) / 4.0, -1), atol=1e-6, rtol=1e-5)
    else:  # ViT-MAE's maps, applied to the block's own values and projection, give the block's attention output
        blk = model.blocks[0]
        h = blk.norm1(model._embed_visible(x))
        v = blk.attn.qkv(h).reshape(2, 17, 3, 2, 16).permute(2, 0, 3, 1, 4)[2]
        out = blk.attn.proj((attn[0] @ v).transpose(1, 2).reshape(2, 17, 32))
        torch.testing.assert_close(out, blk.attn(h), atol=1e-6, rtol=1e-5)


def test_other_input_size_gets_its_own_table():
    model = ratelab.create_model("test_crate_mae").eval()  # built at 8 px: a 2 x 2 grid
    x = images(model, batch=1, size=12)
    feats = model.forward_features(x)
    z = model.patch_embed(x)
    z = torch.cat([model.cls_token, z], 1) + sincos_pos_embed_2d(32, (3, 3))
    for blk in model.blocks:
        z = blk(z)
    torch.testing.assert_close(feats, model.norm(z), atol=1e-6, rtol=1e-6)
    loss, pred, _ = model(x)
    assert pred.shape == (1, 9, 48) and torch.isfinite(loss)
    vit = ratelab.create_model("test_mae_vit").eval()
    assert vit(images(vit, batch=1, size=12))[1].shape == (1, 9, 48)


# ---- white-box quantities and the rate measures ----------------------------------------------------------------------
def test_layer_quantities_of_both_stacks():
    model = ratelab.create_model("test_crate_mae").eval()
    x = images(model, batch=2, size=16)
    enc = model.forward_layer_quantities(x)
    assert enc["part"] == "encoder" and enc["indices"] == [0, 1]
    assert enc["proj"][0].shape == (2, 2, 17, 16) and enc["codes"] is enc["tokens"]
    assert (enc["tokens"][-1] >= 0).all()  # ISTA output: non-negative codes
    torch.testing.assert_close(enc["features"], model.forward_features(x), atol=1e-6, rtol=1e-6)
    dec = model.forward_layer_quantities(x, part="decoder")
    assert dec["part"] == "decoder" and "codes" not in dec and dec["indices"] == [0, 1]
    torch.testing.assert_close(dec["latent"], model.forward_features(x), atol=1e-6, rtol=1e-6)
    blk = model.decoder_blocks[0]
    torch.testing.assert_close(dec["half"][0], blk.dictionary(blk.norm2(dec["latent"])))
    torch.testing.assert_close(dec["proj"][0], blk.attn.project(blk.norm1(dec["half"][0])))
    pred = model.decoder_pred(model.decoder_norm(dec["tokens"][-1]))[:, 1:]
    torch.testing.assert_close(pred, model.forward_decoder(dec["latent"]), atol=1e-6, rtol=1e-6)
    only = model.forward_layer_quantities(x, indices=[-1], part="decoder")
    assert only["indices"] == [1]
    torch.testing.assert_close(only["tokens"][0], dec["tokens"][1], atol=1e-6, rtol=1e-6)
    masked = model.forward_layer_quantities(x, part="decoder", mask_ratio=0.75, noise=noise_for(x, 4))
    assert masked["mask"].sum() == 2 * 12
    with pytest.raises(ValueError, match="part"):
        model.forward_layer_quantities(x, part="head")


def test_rate_measures_run_on_encoder_and_decoder():
    model = ratelab.create_model("test_crate_mae")
    x = images(model, batch=6, size=16)
    enc = measure_layers(model, x, batch_size=4)
    assert [r["layer"] for r in enc["layers"]] == [0, 1]
    assert all(r[k] is not None for r in enc["layers"] for k in ("compression", "compression_half", "sparsity"))
    stack = model.layer_stack("encoder")
    assert measure_layers(stack, x, batch_size=4)["layers"] == enc["layers"]
    dec = measure_layers(model.layer_stack("decoder"), x, batch_size=4)
    assert all(r["compression"] is not None and r["compression_half"] is not None and r["sparsity"] is None
               for r in dec["layers"])
    # compression_half of the decoder is the same layer's projection of the layer output (after the MSSA step).
    with torch.no_grad():
        q = model.forward_layer_quantities(x[:4], part="decoder")
        blk = model.decoder_blocks[1]
        after = compression(blk.attn.project(blk.norm1(q["tokens"][1]))).mean()
    first = measure_layers(model.layer_stack("decoder"), x[:4], batch_size=4)["layers"][1]["compression_half"]
    assert math.isclose(first, float(after), rel_tol=1e-5)
    m1 = measure_layers(model.layer_stack("decoder", mask_ratio=0.75, seed=5), x, batch_size=4)
    m2 = measure_layers(model.layer_stack("decoder", mask_ratio=0.75, seed=5), x, batch_size=4)
    assert m1 == m2 and m1["layers"] != dec["layers"]
    assert model.training  # measure_layers restores the mode through the view


def test_measure_cli_families():
    from ratelab.cli.measure import family_measures

    fams = family_measures()
    assert fams["crate_mae"] == ("compression", "compression_half", "sparsity") and "mae_vit" not in fams


# ---- training-facing behaviour ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MAE_MODELS)
def test_no_classifier(name):
    assert ratelab.create_model(name).num_classes is None
    assert ratelab.create_model(name, num_classes=0).num_classes is None
    with pytest.raises(ConfigError, match="without a classifier head.*linear probe"):
        ratelab.create_model(name, num_classes=10)


@pytest.mark.parametrize("name", MAE_MODELS)
def test_bad_arguments_are_clear_errors(name):
    model = ratelab.create_model(name)
    x = images(model, batch=2, size=16)
    with pytest.raises(ValueError, match="masks none of the 16 patches"):
        model(x, mask_ratio=0.0)
    with pytest.raises(ValueError, match=r"noise must have shape \(B, N\) = \(2, 16\)"):
        model(x, noise=torch.rand(2, 15))
    with pytest.raises(ValueError, match="mask_ratio must be a number in"):
        model(x, mask_ratio=1.5)
    with pytest.raises(ValueError, match=r"expected images \(B, 3, H, W\)"):
        model(torch.randn(2, 1, 16, 16))
    with pytest.raises(ValueError, match="not divisible by patch size"):
        model.forward_features(torch.randn(2, 3, 10, 10))
    with pytest.raises(ConfigError, match="divisible"):
        ratelab.create_model(name, embed_dim=30)


@pytest.mark.parametrize("name", MAE_MODELS)
def test_backward_and_optimizer_groups(name):
    from ratelab.train.optim import weight_decay_groups

    model = ratelab.create_model(name)
    x = images(model, batch=2, size=16)
    loss, _, _ = model(x)
    loss.backward()
    unused = {"decoder_embed.weight", "decoder_embed.bias"} if name == "test_crate_mae" else set()
    for n, p in model.named_parameters():
        if n in ("pos_embed", "decoder_pos_embed"):
            assert not p.requires_grad and p.grad is None
        elif n in unused:
            assert p.grad is None
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
    groups = weight_decay_groups(model, 0.05)
    names = {n for g in groups for n in g["param_names"]}
    assert "pos_embed" not in names and "decoder_pos_embed" not in names
    no_decay = next(g for g in groups if g["weight_decay"] == 0.0)["param_names"]
    assert {"cls_token", "mask_token"} <= set(no_decay)


@pytest.mark.parametrize("name", MAE_MODELS)
def test_grad_checkpointing_changes_nothing(name):
    model = ratelab.create_model(name).train()
    x = images(model, batch=2, size=16)
    noise = noise_for(x, 4)
    loss, _, _ = model(x, 0.75, noise)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    loss2, _, _ = model(x, 0.75, noise)
    loss2.backward()
    torch.testing.assert_close(loss2, loss, atol=0, rtol=0)
    for n, g in grads.items():
        torch.testing.assert_close(model.get_parameter(n).grad, g, atol=1e-6, rtol=1e-5)


def test_the_mae_task_trains_a_model_a_few_steps():
    # What the trainer's task does: model(imgs, mask_ratio) -> loss, backward, step.
    torch.manual_seed(0)
    model = ratelab.create_model("crate_mae_pico_patch4_16")
    x = torch.rand(16, 1, 16, 16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    noise = noise_for(x, 4)
    first = model(x, 0.75, noise)[0].item()
    for _ in range(30):
        loss, _, _ = model(x, 0.75)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model(x, 0.75, noise)[0].item() < 0.7 * first


def test_import_and_build_emit_no_warnings():
    code = ("import warnings; warnings.simplefilter('error'); import ratelab, torch; "
            "m = ratelab.create_model('test_crate_mae'); v = ratelab.create_model('test_mae_vit'); "
            "m(torch.randn(2, 3, 8, 8)); v(torch.randn(2, 3, 8, 8))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr


def test_model_types():
    assert isinstance(ratelab.create_model("test_crate_mae"), CrateMAE)
    assert isinstance(ratelab.create_model("test_mae_vit"), MaeVit)
    assert ratelab.models._factory.model_family("mae_vit_base_patch16_224") == "mae_vit"
    assert ratelab.models._factory.model_family("crate_mae_base_patch16_224") == "crate_mae"
