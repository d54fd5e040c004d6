"""CRATE-alpha model: parameter counts, the ODL fast path vs its four-product reference, weight decay, and the model
API (intermediates, white-box quantities, ``ratelab measure``)."""

from __future__ import annotations

import json
import math

import pytest
import torch

import ratelab
from ratelab.analysis.layer_rates import measure_layers
from ratelab.models.crate_alpha import CrateAlpha, odl_fast, odl_ref
from ratelab.models.crate_alpha import crate_alpha as ca_mod
from ratelab.models.crate_alpha.crate_alpha import resample_pos_embed_bilinear
from ratelab.train.optim import weight_decay_groups

# Fast vs reference: the same products in another rounding order (scalars folded into the GEMMs).
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float64: dict(atol=1e-12, rtol=1e-10),
}

# Counted at 224 px, 1000 classes; the first six are the figures (from the official PyTorch port), the
# last three were counted here (design note §5.3: 255.98M, 253.79M, 526.82M). test_crate_alpha_convert.py counts
# an independent module with the port's layout and gets the same nine numbers.
PARAMS = {
    "crate_alpha_tiny_patch16_224": 4_811_944,
    "crate_alpha_small_patch16_224": 40_975_912,
    "crate_alpha_base_patch32_224": 73_985_512,
    "crate_alpha_base_patch16_224": 72_328_936,
    "crate_alpha_base_patch8_224": 72_338_152,
    "crate_alpha_large_patch14_224": 253_650_920,
    "crate_alpha_large_patch32_224": 255_982_568,
    "crate_alpha_large_patch8_224": 253_786_088,
    "crate_alpha_huge_patch14_224": 526_819_560,
}
ALL = ratelab.list_models("*crate_alpha*")
SMALL = ["test_crate_alpha", "crate_alpha_pico_patch4_16", "crate_alpha_nano_patch4_16"]
KERNELS = r"patch_embed.proj.weight|blocks.\d+.attn.(qkv|proj).weight|head.weight"


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def closed_form(model: CrateAlpha) -> int:
    """Stem conv + bias, [CLS] + positions, L x (LN1, U, W_out, LN2, D, D_hat), final LN, head."""
    cfg = model.cfg
    d, inner, C = cfg.embed_dim, cfg.inner_dim, cfg.expansion
    n = (model.img_size // cfg.patch_size) ** 2
    stem = model.in_chans * cfg.patch_size**2 * d + d
    layer = 2 * d + 2 * d * inner + 2 * d + (2 if cfg.decoupled else 1) * C * d * d
    head = 2 * d + (d * model.num_classes + model.num_classes if model.num_classes else 0)
    return stem + (n + 2) * d + cfg.depth * layer + head


def images(model: CrateAlpha, batch: int = 2, size: int | None = None, seed: int = 0, dtype=torch.float32):
    s = size or model.img_size
    return torch.randn(batch, model.in_chans, s, s, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def set_path(model: CrateAlpha, fast: bool) -> None:
    model.set_attn_backend("auto" if fast else "ref")
    model.set_fused_odl(fast)


# ---- registry and parameter counts -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_param_counts(name):
    with torch.device("meta"):  # no memory: CRATE-alpha-H (527M) is built in milliseconds
        model = ratelab.create_model(name)
    assert isinstance(model, CrateAlpha) and model.model_name == name
    assert all(p.device.type == "meta" for p in model.parameters())
    assert count(model) == closed_form(model)
    d = model.cfg.embed_dim
    assert sum(p.numel() for p in model.blocks[0].parameters()) == 10 * d * d + 4 * d  # 8d^2 ODL + 2d^2 MSSA
    if name in PARAMS:
        assert count(model) == PARAMS[name]


def test_variants_are_the_official_sizes():
    shapes = {n: (m.cfg.embed_dim, m.cfg.depth, m.cfg.num_heads, m.cfg.patch_size)
              for n in PARAMS for m in [_meta(n)]}
    assert shapes["crate_alpha_tiny_patch16_224"] == (192, 12, 3, 16)
    assert shapes["crate_alpha_small_patch16_224"] == (576, 12, 12, 16)
    assert shapes["crate_alpha_base_patch8_224"] == (768, 12, 12, 8)
    assert shapes["crate_alpha_large_patch14_224"] == (1024, 24, 16, 14)
    assert shapes["crate_alpha_huge_patch14_224"] == (1280, 32, 16, 14)
    cfg = _meta("crate_alpha_base_patch16_224").cfg
    assert (cfg.expansion, cfg.odl_step, cfg.odl_lambda, cfg.decoupled, cfg.residual) == (4, 0.1, 0.1, True, True)


def _meta(name: str, **kw) -> CrateAlpha:
    with torch.device("meta"):
        return ratelab.create_model(name, **kw)


def test_layout_details():
    model = ratelab.create_model("test_crate_alpha")
    blk = model.blocks[0]
    assert blk.attn.qkv.bias is None and blk.attn.proj.bias is None  # MSSA without biases
    assert all(m.eps == 1e-6 for m in model.modules() if isinstance(m, torch.nn.LayerNorm))
    assert model.patch_embed.proj.bias is not None and model.patch_embed.proj.kernel_size == (4, 4)
    assert blk.odl.D.shape == blk.odl.D_hat.shape == (32, 128)
    assert model.pos_embed.shape == (1, 4 + 1, 32)
    wide = _meta("test_crate_alpha", expansion=2, decoupled=False)
    assert wide.blocks[0].odl.D.shape == (32, 64) and wide.blocks[0].odl.D_hat is None
    assert count(wide) == closed_form(wide)


def test_initialization_follows_the_jax_code():
    torch.manual_seed(0)
    model = ratelab.create_model("crate_alpha_base_patch16_224", depth=2, num_classes=100)
    d = 768
    D = model.blocks[0].odl.D
    bound = math.sqrt(6 / d)  # Flax kaiming_uniform, fan_in = d of a (d, 4d) kernel
    assert D.abs().max() <= bound and D.abs().max() > 0.99 * bound
    assert abs(D.std().item() - bound / math.sqrt(3)) < 0.01 * bound
    assert abs(model.pos_embed.std().item() - 0.02) < 1e-3
    assert model.cls_token.abs().max() < 1e-5
    assert abs(model.blocks[1].attn.qkv.weight.std().item() - 0.02) < 1e-3
    assert abs(model.head.weight.std().item() - 0.02) < 2e-3 and not model.head.bias.any()
    w = model.patch_embed.proj.weight  # kaiming-uniform over fan_in = 3 * 16 * 16
    assert w.abs().max() <= math.sqrt(6 / 768) and not model.patch_embed.proj.bias.any()


@pytest.mark.parametrize("name", SMALL)
def test_small_models_run(name):
    model = ratelab.create_model(name).eval()
    with torch.no_grad():
        out = model(images(model))
    assert out.shape == (2, model.num_classes) and torch.isfinite(out).all()


# ---- ODL: fast path vs the four products as written ------------------------------------------------------------
def _odl_inputs(dtype, decoupled=True, d=24, C=4, tokens=(3, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*tokens, d, generator=g, dtype=dtype)
    D = (torch.rand(d, C * d, generator=g, dtype=dtype) * 2 - 1) * math.sqrt(6 / d)
    D_hat = (torch.rand(d, C * d, generator=g, dtype=dtype) * 2 - 1) * math.sqrt(6 / d) if decoupled else D
    return x, D, D_hat


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("decoupled", [True, False], ids=["decoupled", "tied"])
@pytest.mark.parametrize(("step", "lambd"), [(0.1, 0.1), (0.5, 0.02)])
def test_odl_fast_matches_reference(dtype, decoupled, step, lambd):
    x, D, D_hat = _odl_inputs(dtype, decoupled)
    cot = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    results = []
    for fn in (odl_fast, odl_ref):
        leaves = [t.clone().requires_grad_() for t in ((x, D, D_hat) if decoupled else (x, D))]
        xi, Di = leaves[0], leaves[1]
        Dh = leaves[2] if decoupled else Di
        out, codes = fn(xi, Di, Dh, step, lambd, return_codes=True)
        grads = torch.autograd.grad(out, leaves, cot)
        results.append((out, codes, grads))
    (o_f, c_f, g_f), (o_r, c_r, g_r) = results
    torch.testing.assert_close(o_f, o_r, **TOL[dtype])
    torch.testing.assert_close(c_f, c_r, **TOL[dtype])
    assert c_f.shape == (*x.shape[:-1], D.shape[1]) and (c_f >= 0).all() and (c_f == 0).any()
    for name, a, b in zip(("x", "D", "D_hat")[: len(g_f)], g_f, g_r, strict=True):
        torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m, n=name: f"grad of {n}: {m}")


def test_odl_reference_is_the_column_equation():
    """odl_ref on token rows equals the paper's column-vector form, written out once more."""
    x, D, D_hat = _odl_inputs(torch.float64)
    b = x.reshape(-1, x.shape[-1]).t()  # (d, T): tokens as columns
    eta = lam = 0.1
    a1 = torch.relu(eta * D.t() @ b - eta * lam)
    a2 = torch.relu(a1 - eta * D.t() @ (D @ a1 - b) - eta * lam)
    want = (D_hat @ a2).t().reshape(x.shape)
    torch.testing.assert_close(odl_ref(x, D, D_hat, eta, lam), want, atol=1e-13, rtol=0)
    torch.testing.assert_close(odl_fast(x, D, D_hat, eta, lam), want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("frozen", ["x", "D", "D_hat", "dictionaries"])
def test_odl_fast_partial_gradients(frozen):
    x, D, D_hat = _odl_inputs(torch.float64)
    req = {"x": frozen != "x", "D": frozen not in ("D", "dictionaries"),
           "D_hat": frozen not in ("D_hat", "dictionaries")}
    grads = {}
    for fn in (odl_fast, odl_ref):
        ts = {k: v.clone().requires_grad_(req[k]) for k, v in zip(req, (x, D, D_hat))}
        fn(ts["x"], ts["D"], ts["D_hat"], 0.1, 0.1).square().sum().backward()
        grads[fn] = {k: ts[k].grad for k in ts}
    for k in req:
        if req[k]:
            torch.testing.assert_close(grads[odl_fast][k], grads[odl_ref][k], **TOL[torch.float64])
        else:
            assert grads[odl_fast][k] is None


def test_odl_fast_under_autocast():
    x, D, D_hat = _odl_inputs(torch.float32)
    D = D.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_fast = odl_fast(x, D, D_hat, 0.1, 0.1)
        y_ref = odl_ref(x, D, D_hat, 0.1, 0.1)
    assert y_fast.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y_fast.float(), y_ref.float(), atol=0.05, rtol=0.05)
    y_fast.float().sum().backward()
    assert D.grad is not None and D.grad.dtype == torch.float32


@pytest.mark.parametrize("decoupled", [True, False], ids=["decoupled", "tied"])
def test_odl_fast_second_derivative(decoupled):
    """create_graph=True goes through the reference's graph: Hessian-vector products agree with the reference's."""
    x, D, D_hat = _odl_inputs(torch.float64, decoupled, d=8, tokens=(2, 3))
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    results = []
    for fn in (odl_fast, odl_ref):
        xi, Di = x.clone().requires_grad_(), D.clone().requires_grad_()
        Dh = D_hat.clone().requires_grad_() if decoupled else Di
        loss = fn(xi, Di, Dh, 0.1, 0.1).pow(3).sum()
        leaves = [xi, Di, Dh] if decoupled else [xi, Di]
        grads = torch.autograd.grad(loss, leaves, create_graph=True)
        results.append(torch.autograd.grad((grads[0] * v).sum(), leaves))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize(
    ("name", "overrides"),
    [("test_crate_alpha", {}), ("crate_alpha_pico_patch4_16", {}),
     ("test_crate_alpha", dict(decoupled=False, residual=False, expansion=2, num_heads=4, head_dim=4))],
    ids=["test", "pico", "tied_noresidual"],
)
def test_model_fast_matches_reference(dtype, name, overrides):
    model = ratelab.create_model(name, **overrides).to(dtype)
    x = images(model, batch=3, dtype=dtype)
    cot = torch.randn(3, model.num_classes, dtype=dtype)
    results = {}
    for fast in (True, False):
        set_path(model, fast)
        xi = x.clone().requires_grad_()
        out = model(xi)
        results[fast] = (out, torch.autograd.grad(out, [xi, *model.parameters()], cot))
    (out_f, g_f), (out_r, g_r) = results[True], results[False]
    torch.testing.assert_close(out_f, out_r, **TOL[dtype])
    names = ["input", *(n for n, _ in model.named_parameters())]
    for n, a, b in zip(names, g_f, g_r, strict=True):
        torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m, n=n: f"grad of {n}: {m}")


def test_fast_path_is_taken(monkeypatch):
    calls = {"fast": 0, "ref": 0}
    real_fast, real_ref = ca_mod.odl_fast, ca_mod.odl_ref

    def fast(*a, **kw):
        calls["fast"] += 1
        return real_fast(*a, **kw)

    def ref(*a, **kw):
        calls["ref"] += 1
        return real_ref(*a, **kw)

    monkeypatch.setattr(ca_mod, "odl_fast", fast)
    monkeypatch.setattr(ca_mod, "odl_ref", ref)
    model = ratelab.create_model("test_crate_alpha")
    model(images(model))
    assert calls == {"fast": 2, "ref": 0}
    model.set_fused_odl(False)
    model(images(model))
    assert calls == {"fast": 2, "ref": 2}


# ---- weight decay -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [{}, {"decoupled": False}, {"num_classes": 0}])
def test_only_kernels_are_decayed(overrides):
    import re

    model = ratelab.create_model("test_crate_alpha", **overrides)
    groups = weight_decay_groups(model, 0.1)
    decayed = next(g["param_names"] for g in groups if g["weight_decay"] == 0.1)
    kept = next(g["param_names"] for g in groups if g["weight_decay"] == 0.0)
    expected = [n for n, _ in model.named_parameters() if re.fullmatch(KERNELS, n)]
    assert sorted(decayed) == sorted(expected)
    assert {"cls_token", "pos_embed", "blocks.0.odl.D", "norm.weight", "patch_embed.proj.bias"} <= set(kept)
    assert ("blocks.1.odl.D_hat" in kept) == ("decoupled" not in overrides)
    # the set itself holds the 2-D exemptions too, so an optimizer that only reads no_weight_decay() agrees
    assert model.no_weight_decay() == set(kept)


# ---- model API -------------------------------------------------------------------------------------------------
def test_forward_is_head_of_features_and_pre_logits():
    model = ratelab.create_model("crate_alpha_pico_patch4_16").eval()
    x = images(model)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 17, 64)
        torch.testing.assert_close(model.forward_head(feats), model(x), atol=0, rtol=0)
        pre = model.forward_head(feats, pre_logits=True)
        torch.testing.assert_close(pre, model.norm(feats)[:, 0], atol=0, rtol=0)  # final LN, then [CLS]
        torch.testing.assert_close(model.head(pre), model(x), atol=0, rtol=0)


def test_forward_layer_quantities():
    model = ratelab.create_model("crate_alpha_pico_patch4_16").eval()  # 4 layers, 4 heads of 16, 16 patches
    x = images(model)
    B, N, K, p, d = 2, 17, 4, 16, 64
    with torch.no_grad():
        feats = model.forward_features(x)
        res = model.forward_layer_quantities(x)
        assert res["indices"] == [0, 1, 2, 3]
        torch.testing.assert_close(res["features"], feats, atol=0, rtol=0)
        torch.testing.assert_close(res["tokens"][-1], feats, atol=0, rtol=0)
        z = model.embed(x)
        for i, blk in enumerate(model.blocks):
            assert res["proj"][i].shape == (B, K, N, p)
            torch.testing.assert_close(res["proj"][i], blk.attn.project(blk.norm1(z)), atol=0, rtol=0)
            half = z + blk.attn(blk.norm1(z))
            torch.testing.assert_close(res["half"][i], half, atol=0, rtol=0)
            _, codes = odl_ref(blk.norm2(half), blk.odl.D, blk.odl.D_hat, 0.1, 0.1, return_codes=True)
            assert res["codes"][i].shape == (B, N, 4 * d)
            torch.testing.assert_close(res["codes"][i], codes, **TOL[torch.float32])
            z = blk(z)
            torch.testing.assert_close(res["tokens"][i], z, atol=0, rtol=0)
        sub = model.forward_layer_quantities(x, indices=[-1, 1])
        assert sub["indices"] == [1, 3] and len(sub["codes"]) == 2
        torch.testing.assert_close(sub["codes"][1], res["codes"][3], atol=0, rtol=0)
    with pytest.raises(ValueError, match="indices"):
        model.forward_layer_quantities(x, [4])


def test_forward_intermediates():
    model = ratelab.create_model("crate_alpha_pico_patch4_16").eval()
    x = torch.randn(2, 1, 16, 12)  # non-square: a 4 x 3 grid
    with torch.no_grad():
        final, inter, attn = model.forward_intermediates(x, return_attn=True)
        torch.testing.assert_close(final, model.forward_features(x), **TOL[torch.float32])
        assert len(inter) == len(attn) == 4 and inter[0].shape == (2, 12, 64) and attn[0].shape == (2, 4, 13, 13)
        torch.testing.assert_close(attn[0].sum(-1), torch.ones(2, 4, 13))
        _, nchw = model.forward_intermediates(x, indices=[1], output_fmt="NCHW")
        _, nlc = model.forward_intermediates(x, indices=[1])
        assert nchw[0].shape == (2, 64, 4, 3)
        torch.testing.assert_close(nchw[0].flatten(2).transpose(1, 2), nlc[0], atol=0, rtol=0)
        lq = model.forward_layer_quantities(x, indices=[1])
        normed = model.forward_intermediates(x, indices=[1], norm=True, intermediates_only=True)
        torch.testing.assert_close(normed[0], model.norm(lq["tokens"][0])[:, 1:], atol=0, rtol=0)
        (spatial, cls), = model.forward_intermediates(x, indices=[1], return_prefix_tokens=True)[1]
        torch.testing.assert_close(cls, lq["tokens"][0][:, :1], atol=0, rtol=0)
        torch.testing.assert_close(spatial, nlc[0], atol=0, rtol=0)
    with pytest.raises(ValueError, match="output_fmt='NHWC'"):
        model.forward_intermediates(x, output_fmt="NHWC")


def test_layer_measures_work():
    torch.manual_seed(0)
    model = ratelab.create_model("crate_alpha_pico_patch4_16")
    assert model.layer_measures == ("compression", "compression_half", "sparsity")
    res = measure_layers(model, torch.randn(6, 1, 16, 16), batch_size=4)
    assert [r["layer"] for r in res["layers"]] == [0, 1, 2, 3] and res["num_heads"] == 4 and res["head_dim"] == 16
    for r in res["layers"]:
        assert r["compression"] > 0 and r["compression_half"] > 0
        assert 0.2 < r["sparsity"] < 1  # zeros of the codes A2 (the layer output has none)


def test_ratelab_measure_cli(tmp_path, capsys):
    from ratelab.cli.main import main

    out = tmp_path / "m"
    assert main(["measure", "--model", "crate_alpha_pico_patch4_16", "--dataset", "digits", "--num-images", "16",
                 "--batch-size", "8", "--device", "cpu", "--out", str(out)]) == 0
    rates = json.loads((out / "rates.json").read_text())
    assert rates["model"] == "crate_alpha_pico_patch4_16" and len(rates["layers"]) == 4
    assert all(r["sparsity"] is not None and r["compression_half"] is not None for r in rates["layers"])
    assert "crate_alpha_pico_patch4_16" in capsys.readouterr().out


def test_pos_embed_other_input_size():
    model = ratelab.create_model("crate_alpha_pico_patch4_16").eval()  # built for a 4 x 4 grid
    x = torch.randn(1, 1, 24, 20)  # 6 x 5
    with torch.no_grad():
        out = model(x)
        want = resample_pos_embed_bilinear(model.pos_embed, (6, 5), old_grid=(4, 4))
        assert want.shape == (1, 31, 64)
        torch.testing.assert_close(model.embed(x)[:, 0], model.cls_token[:, 0] + model.pos_embed[:, 0])
        # corner-aligned: the four corner rows of the table are kept exactly
        grid = want[0, 1:].reshape(6, 5, 64)
        src = model.pos_embed[0, 1:].reshape(4, 4, 64)
        for (i, j), (a, b) in {(0, 0): (0, 0), (5, 4): (3, 3), (0, 4): (0, 3), (5, 0): (3, 0)}.items():
            torch.testing.assert_close(grid[i, j], src[a, b])
    assert out.shape == (1, 10) and torch.isfinite(out).all()


def test_grad_checkpointing_changes_nothing():
    torch.manual_seed(0)
    model = ratelab.create_model("test_crate_alpha", drop_path_rate=0.0)
    x = images(model)
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        model(x).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_backward_reaches_every_parameter():
    model = ratelab.create_model("test_crate_alpha")
    model(images(model)).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_drop_path_and_classifier():
    model = ratelab.create_model("test_crate_alpha", drop_path_rate=0.2, depth=3)
    assert [getattr(b.drop_path, "drop_prob", 0.0) for b in model.blocks] == pytest.approx([0.0, 0.1, 0.2])
    assert model.model_args["drop_path_rate"] == 0.2
    model.eval()
    x = images(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x), atol=0, rtol=0)  # no stochasticity in eval
    model.reset_classifier(3)
    assert model.head.out_features == 3 and not model.head.bias.any()
    model.reset_classifier(0)
    assert model(x).shape == (2, 32)
    assert model.get_classifier() is model.head


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="divisible"):
        ratelab.create_model("test_crate_alpha", img_size=10)
    with pytest.raises(ValueError, match="num_heads"):
        ratelab.create_model("test_crate_alpha", num_heads=3)
    with pytest.raises(ValueError, match="expansion"):
        ratelab.create_model("test_crate_alpha", expansion=0)
    with pytest.raises(TypeError, match="unknown CrateAlpha option"):
        ratelab.create_model("test_crate_alpha", mlp_ratio=4)
    model = ratelab.create_model("test_crate_alpha")
    with pytest.raises(ValueError, match="expected input"):
        model(torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(2, 3, 8, 10))
