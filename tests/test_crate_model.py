"""CRATE model: registry sweep, parameter counts, fast path vs reference path, and the model API surface."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

import ratelab
import ratelab.kernels.attention as attn_mod
from ratelab.core.registry import registered_family
from ratelab.layers.patch import resample_pos_embed
from ratelab.models.crate import ISTA, Crate

# Fast (SDPA + two-matmul ISTA) vs reference (explicit softmax + three-matmul ISTA) on the same weights: the same
# math in a different summation order, so the gap is accumulated rounding (a few ulps per op, grown over depth).
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float64: dict(atol=1e-12, rtol=1e-10),
}

# Published parameter counts (CRATE paper Table 1 / design note §2.3), 224 px, 1000 classes, in millions.
PAPER_PARAMS_M = {
    "crate_tiny_patch16_224": 6.09,
    "crate_small_patch16_224": 13.12,
    "crate_base_patch16_224": 22.80,
    "crate_large_patch16_224": 77.64,
}

# By family, not by name: crate_alpha_* and crate_mae_* share the prefix.
ALL_CRATE = [n for n in ratelab.list_models("crate*") if registered_family(n) == "crate"] + ["test_crate"]
SMALL = ["test_crate", "crate_pico_patch4_16", "crate_nano_patch4_16"]  # cheap enough to run in every test


def closed_form_params(model: Crate) -> int:
    """Count from the architecture: stem, [CLS] + positions, L x (3 d^2 + 5 d) when inner == d, head."""
    cfg = model.cfg
    d, inner, L = cfg.embed_dim, cfg.inner_dim, cfg.depth
    patch_dim = model.in_chans * cfg.patch_size**2
    n = (model.img_size // cfg.patch_size) ** 2
    stem = 2 * patch_dim + (patch_dim * d + d) + 2 * d
    tokens = d + (n + 1) * d
    # MSSA: U, W_out (+bias); MHSA: QKV (+bias), out (+bias)
    attn = d * inner + (inner * d + d) if cfg.attn == "mssa" else (3 * d * d + 3 * d) + (d * d + d)
    h = round(cfg.mlp_ratio * d)
    second = d * d if cfg.mlp == "ista" else (d * h + h) + (h * d + d)  # D | fc1, fc2
    layer = 2 * d + attn + 2 * d + second  # LN1, attention, LN2, ISTA or MLP
    head = 2 * d + (d * model.num_classes + model.num_classes if model.num_classes else 0)
    return stem + tokens + L * layer + head


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def images(model: Crate, batch: int = 2, size: int | None = None, seed: int = 0, dtype=torch.float32):
    s = size or model.img_size
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, model.in_chans, s, s, generator=g, dtype=dtype)


def set_path(model: Crate, fast: bool) -> None:
    model.set_attn_backend("auto" if fast else "ref")
    model.set_fused_ista(fast)


# ---- registry sweep and parameter counts ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL_CRATE)
def test_registry_param_count(name):
    with torch.device("meta"):  # no memory, no init cost: CRATE-L is built in milliseconds
        model = ratelab.create_model(name)
    assert isinstance(model, Crate) and model.model_name == name
    assert all(p.device.type == "meta" for p in model.parameters())
    assert count(model) == closed_form_params(model)
    d = model.cfg.embed_dim
    if model.cfg.inner_dim == d and model.cfg.variant_name == "crate":
        per_layer = sum(p.numel() for p in model.blocks[0].parameters())
        assert per_layer == 3 * d * d + 5 * d
    if name in PAPER_PARAMS_M:
        assert round(count(model) / 1e6, 2) == PAPER_PARAMS_M[name]


@pytest.mark.parametrize("name", SMALL)
def test_small_models_run(name):
    model = ratelab.create_model(name).eval()
    x = images(model)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, model.num_classes) and torch.isfinite(out).all()


# ---- fast path vs reference path ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("batch", [3, 8], ids=["ista2mm", "istafolded"])  # tokens < d vs >= d: both ISTA forms
@pytest.mark.parametrize(
    ("name", "overrides"),
    [("test_crate", {}), ("crate_pico_patch4_16", {}), ("test_crate", dict(num_heads=4, head_dim=4, pool="mean"))],
    ids=["test", "pico", "narrow_heads_mean"],
)
def test_fast_matches_reference(dtype, batch, name, overrides):
    model = ratelab.create_model(name, **overrides).to(dtype)
    x = images(model, batch=batch, dtype=dtype)
    cot = torch.randn(batch, model.num_classes, dtype=dtype)
    results = {}
    for fast in (True, False):
        set_path(model, fast)
        xi = x.clone().requires_grad_()
        out = model(xi)
        grads = torch.autograd.grad(out, [xi, *model.parameters()], cot)
        results[fast] = (out, grads)
    (out_f, g_f), (out_r, g_r) = results[True], results[False]
    torch.testing.assert_close(out_f, out_r, **TOL[dtype])
    names = ["input", *(n for n, _ in model.named_parameters())]
    for n, a, b in zip(names, g_f, g_r, strict=True):
        torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m, n=n: f"grad of {n}: {m}")


def test_fast_path_is_taken(monkeypatch):
    calls = {"sdpa": 0, "ista_ref": 0}
    real_sdpa, real_ista_ref = attn_mod.attention_sdpa, ISTA.forward_ref

    def sdpa(*a, **kw):
        calls["sdpa"] += 1
        return real_sdpa(*a, **kw)

    def ista_ref(self, x):
        calls["ista_ref"] += 1
        return real_ista_ref(self, x)

    monkeypatch.setattr(attn_mod, "attention_sdpa", sdpa)
    monkeypatch.setattr(ISTA, "forward_ref", ista_ref)
    model = ratelab.create_model("test_crate")
    x = images(model)
    model(x)
    assert calls == {"sdpa": 2, "ista_ref": 0}
    set_path(model, fast=False)
    model(x)
    assert calls == {"sdpa": 2, "ista_ref": 2}


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
def test_ista_forms_match_the_equation(dtype):
    torch.manual_seed(0)
    ista = ISTA(6, step=0.3, lambd=0.2).to(dtype)
    b = torch.randn(2, 4, 6, dtype=dtype)
    D = ista.weight.detach()
    # Column form z = b^T: ReLU(z + eta D^T (z - D z) - eta lambda), written per token.
    expected = torch.stack(
        [torch.stack([torch.relu(z + 0.3 * D.T @ (z - D @ z) - 0.3 * 0.2) for z in row]) for row in b]
    )
    cot = torch.randn_like(b)
    grads = {}
    for form in (ista.forward_ref, ista.forward_two_matmul, ista.forward_folded):
        bi = b.clone().requires_grad_()
        out = form(bi)
        torch.testing.assert_close(out, expected, **TOL[dtype], msg=lambda m, f=form: f"{f.__name__}: {m}")
        grads[form.__name__] = torch.autograd.grad(out, [bi, ista.weight], cot)
    for name in ("forward_two_matmul", "forward_folded"):
        for a, r in zip(grads[name], grads["forward_ref"], strict=True):
            torch.testing.assert_close(a, r, **TOL[dtype], msg=lambda m, n=name: f"{n} grads: {m}")


def test_ista_dispatch(monkeypatch):
    used = []
    for form in ("forward_ref", "forward_two_matmul", "forward_folded"):
        real = getattr(ISTA, form)
        monkeypatch.setattr(ISTA, form, lambda self, x, f=form, r=real: used.append(f) or r(self, x))
    ista = ISTA(8)
    ista(torch.randn(1, 7, 8))  # 7 tokens < 8 channels: folding would cost more than it saves
    ista(torch.randn(2, 4, 8))  # 8 tokens: fold
    ista.fused = False
    ista(torch.randn(2, 4, 8))
    assert used == ["forward_two_matmul", "forward_folded", "forward_ref"]


# ---- forward API -------------------------------------------------------------------------------------------------
def test_forward_is_head_of_features():
    model = ratelab.create_model("test_crate").eval()
    x = images(model)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 1 + 4, 32)
        torch.testing.assert_close(model(x), model.forward_head(feats), atol=0, rtol=0)
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, 32)
        torch.testing.assert_close(model.head(pre), model(x), atol=0, rtol=0)


def test_forward_intermediates():
    model = ratelab.create_model("crate_pico_patch4_16").eval()  # 4 layers, 4 heads of 16, 16 patches
    x = images(model)
    B, N, K, p, d = 2, 17, 4, 16, 64
    with torch.no_grad():
        feats = model.forward_features(x)
        final, inter, attns = model.forward_intermediates(x, return_attn=True)
        res = model.forward_layer_quantities(x)  # U_k^T z, half steps and codes: the one way to reach them
        assert res["indices"] == [0, 1, 2, 3] and len(inter) == len(attns) == 4
        # With return_attn the blocks run the explicit-softmax path: equal up to rounding only.
        torch.testing.assert_close(final, feats, **TOL[torch.float32])
        torch.testing.assert_close(res["features"], feats, atol=0, rtol=0)
        torch.testing.assert_close(res["tokens"][-1], res["features"], atol=0, rtol=0)
        torch.testing.assert_close(inter[-1], final[:, 1:], atol=0, rtol=0)  # [CLS] split off (timm's rule)
        assert res["codes"] is res["tokens"]  # the sparse codes of CRATE are its ISTA outputs
        z = model.embed(x)
        for i, blk in enumerate(model.blocks):
            a = blk.norm1(z)
            proj = res["proj"][i]
            assert proj.shape == (B, K, N, p)
            torch.testing.assert_close(proj, blk.attn.project(a))
            attn = attns[i]
            assert attn.shape == (B, K, N, N) and (attn >= 0).all()
            torch.testing.assert_close(attn.sum(-1), torch.ones(B, K, N))
            torch.testing.assert_close(attn, torch.softmax(proj @ proj.transpose(-1, -2) * p**-0.5, dim=-1))
            assert res["half"][i].shape == (B, N, d)
            torch.testing.assert_close(res["half"][i], z + blk.attn(a), **TOL[torch.float32])
            z = blk(z)
            torch.testing.assert_close(res["tokens"][i], z, **TOL[torch.float32])
            torch.testing.assert_close(inter[i], z[:, 1:], **TOL[torch.float32])

        plain = model.forward_intermediates(x)
        assert len(plain) == 2 and len(plain[1]) == 4  # no attention without return_attn
        torch.testing.assert_close(plain[0], feats, atol=0, rtol=0)
        for idx, keep in [(2, [2, 3]), ([0, -1], [0, 3]), ([-2], [2]), ([3, 1, 1], [1, 3])]:
            sub = model.forward_layer_quantities(x, idx)
            assert sub["indices"] == keep, idx
            assert len(sub["tokens"]) == len(sub["half"]) == len(sub["proj"]) == len(keep)
            sub_final, sub_inter = model.forward_intermediates(x, idx)
            assert len(sub_inter) == len(keep)
            for j, layer in enumerate(keep):
                torch.testing.assert_close(sub["tokens"][j], res["tokens"][layer], atol=0, rtol=0)
                torch.testing.assert_close(sub_inter[j], plain[1][layer], atol=0, rtol=0)
            torch.testing.assert_close(sub["features"], feats, atol=0, rtol=0)
            torch.testing.assert_close(sub_final, feats, atol=0, rtol=0)
    for bad in ([4], [-5], 0, 5):
        with pytest.raises(ValueError, match="indices"):
            model.forward_intermediates(x, bad)
        with pytest.raises(ValueError, match="indices"):
            model.forward_layer_quantities(x, bad)


def test_forward_intermediates_formats_and_flags():
    model = ratelab.create_model("crate_pico_patch4_16").eval()
    x = torch.randn(2, 1, 16, 12)  # non-square: a 4 x 3 grid
    with torch.no_grad():
        final, nlc = model.forward_intermediates(x, indices=[1])
        _, nchw = model.forward_intermediates(x, indices=[1], output_fmt="NCHW")
        assert nlc[0].shape == (2, 12, 64) and nchw[0].shape == (2, 64, 4, 3)
        torch.testing.assert_close(nchw[0].flatten(2).transpose(1, 2), nlc[0], atol=0, rtol=0)  # row-major patches
        _, normed = model.forward_intermediates(x, indices=[1], norm=True)
        _, tokens = model.forward_intermediates(x, indices=[1], return_prefix_tokens=True)
        lq = model.forward_layer_quantities(x, indices=[1])
        torch.testing.assert_close(normed[0], model.fc_norm(lq["tokens"][0])[:, 1:], atol=0, rtol=0)
        spatial, cls = tokens[0]
        torch.testing.assert_close(cls, lq["tokens"][0][:, :1], atol=0, rtol=0)
        torch.testing.assert_close(spatial, nlc[0], atol=0, rtol=0)
        only = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert isinstance(only, list) and len(only) == 2
        only_attn = model.forward_intermediates(x, indices=2, intermediates_only=True, return_attn=True)
        assert len(only_attn) == 2 and only_attn[1][0].shape == (2, 4, 13, 13)
    with pytest.raises(ValueError, match="output_fmt='NHWC'.*'NLC', 'NCHW'"):
        model.forward_intermediates(x, output_fmt="NHWC")
    assert model.layer_measures == ("compression", "compression_half", "sparsity")


def test_pos_embed_other_input_size():
    model = ratelab.create_model("test_crate").eval()  # built for 8x8 (2x2 grid)
    assert model._pos_embed(model.grid_size) is model.pos_embed
    x16 = images(model, size=16)
    with torch.no_grad():
        out = model(x16)
        assert out.shape == (2, 10) and torch.isfinite(out).all()
        # Same as a model built for 16x16 whose table is the resampled one.
        big = ratelab.create_model("test_crate", img_size=16).eval()
        state = {**model.state_dict(), "pos_embed": resample_pos_embed(model.pos_embed, (4, 4))}
        big.load_state_dict(state)
        torch.testing.assert_close(out, big(x16), atol=0, rtol=0)
        # Non-square inputs resample to a non-square grid.
        assert model(torch.randn(1, 3, 8, 12)).shape == (1, 10)


def test_grad_checkpointing_changes_nothing():
    model = ratelab.create_model("test_crate").train()
    x = images(model)
    results = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad(set_to_none=True)
        out = model(x)
        out.square().sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], atol=0, rtol=0)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)


def test_backward_reaches_every_parameter():
    for pool in ("cls", "mean"):
        model = ratelab.create_model("test_crate", pool=pool)
        model(images(model, batch=4)).logsumexp(-1).sum().backward()
        for n, p in model.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{pool}: no gradient reaches {n}"


def test_meta_device_construction_needs_no_memory():
    with torch.device("meta"):
        model = ratelab.create_model("crate_large_patch8_224")
    assert model.pos_embed.is_meta and model.blocks[0].ista.weight.is_meta


# ---- errors and head handling ------------------------------------------------------------------------------------
def test_bad_inputs_are_clear_errors():
    model = ratelab.create_model("test_crate")
    with pytest.raises(ValueError, match=r"expected input \(B, 3, H, W\), got \(2, 1, 8, 8\)"):
        model(torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"expected input \(B, 3, H, W\)"):
        model(torch.randn(3, 8, 8))
    with pytest.raises(ValueError, match="not divisible by patch size 4"):
        model(torch.randn(2, 3, 10, 8))
    with pytest.raises(ValueError, match="img_size=10 is not divisible by patch_size=4"):
        ratelab.create_model("test_crate", img_size=10)
    with pytest.raises(KeyError, match="crate_tiny_patch16_224"):
        ratelab.create_model("crate_tiny_patch16")


def test_no_weight_decay_and_classifier():
    model = ratelab.create_model("test_crate")
    names = dict(model.named_parameters())
    assert model.no_weight_decay() == {"cls_token", "pos_embed"} and model.no_weight_decay() <= set(names)
    x = images(model)
    model.reset_classifier(5)
    assert model.get_classifier().out_features == 5 and model(x).shape == (2, 5)
    model.reset_classifier(0)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.forward_head(model.forward_features(x), pre_logits=True))
    headless = ratelab.create_model("test_crate", num_classes=0)
    assert headless(x).shape == (2, 32) and not any(n.startswith("head.") for n in headless.state_dict())


# ---- timm export -------------------------------------------------------------------------------------------------
def test_timm_registration_is_opt_in():
    code = (
        "import timm, ratelab, ratelab.models, ratelab.compat.timm; "
        "ratelab.create_model('test_crate'); "
        "assert not [n for n in timm.list_models() if n.startswith('ratelab_')], 'registered at import'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)


def test_timm_register():
    import timm

    from ratelab.compat.timm import register

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # timm warns when a name is overwritten; a second call must not do that
        names = register()
        assert register() == names
    assert set(names) == {f"ratelab_{n}" for n in ratelab.list_models()}  # every registered model, CRATE included
    assert {f"ratelab_{n}" for n in ALL_CRATE} <= set(names)
    assert set(names) <= set(timm.list_models("ratelab_*"))
    model = timm.create_model("ratelab_test_crate", num_classes=3, img_size=12)
    assert isinstance(model, Crate) and model(torch.randn(1, 3, 12, 12)).shape == (1, 3)
    with torch.device("meta"):
        tiny = timm.create_model("ratelab_crate_tiny_patch16_224")
    assert round(count(tiny) / 1e6, 2) == 6.09
    assert tiny.pretrained_cfg["input_size"] == (3, 224, 224)
    with pytest.raises(ValueError, match="no downloadable weights"):
        timm.create_model("ratelab_test_crate", pretrained=True)
    with pytest.raises(ValueError, match="prefix"):
        register(prefix="")
