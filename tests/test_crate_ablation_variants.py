"""The segmentation paper's Table 2 ablation as CRATE switches: CRATE-MLP (MSSA + MLP), CRATE-MHSA (MHSA + ISTA)."""

from __future__ import annotations

import pytest
import torch

import ratelab
from ratelab.analysis.layer_rates import measure_layers, supported_measures
from ratelab.core.errors import ConfigError
from ratelab.models.crate import CRATE_VARIANTS, Crate, CrateConfig
from ratelab.models.crate.crate import Mlp

torch.set_num_threads(1)
PICO = {"mlp": "crate_mlp_pico_patch4_16", "mhsa": "crate_mhsa_pico_patch4_16"}


def _x(model, b: int = 2) -> torch.Tensor:
    return torch.randn(b, model.in_chans, model.img_size, model.img_size, generator=torch.Generator().manual_seed(0))


def test_defaults_are_crate_with_unchanged_keys():
    cfg = CrateConfig()
    assert (cfg.attn, cfg.mlp, cfg.variant_name) == ("mssa", "ista", "crate")
    keys = set(ratelab.create_model("crate_pico_patch4_16").state_dict())
    # the layout every CRATE checkpoint was written with (no MLP, no qkv bias)
    per_layer = {"norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.proj.weight", "attn.proj.bias",
                 "norm2.weight", "norm2.bias", "ista.weight"}
    stem = {"patch_norm.weight", "patch_norm.bias", "patch_proj.weight", "patch_proj.bias", "patch_post_norm.weight",
            "patch_post_norm.bias", "cls_token", "pos_embed", "fc_norm.weight", "fc_norm.bias", "head.weight",
            "head.bias"}
    assert keys == stem | {f"blocks.{i}.{k}" for i in range(4) for k in per_layer}


@pytest.mark.parametrize("kind", ["mlp", "mhsa"])
def test_variant_parameters_by_formula(kind):
    model = ratelab.create_model(PICO[kind])
    d, K, h = 64, 4, 256
    blk = model.blocks[0]
    if kind == "mlp":
        assert isinstance(blk.mlp, Mlp) and not hasattr(blk, "ista")
        want = 4 * d + (d * d + d * d + d) + (d * h + h + h * d + d)  # 2 LNs, U + W_out, fc1 + fc2
    else:
        assert blk.attn.qkv.weight.shape == (3 * d, d) and blk.attn.qkv.bias is not None and K == blk.attn.num_heads
        want = 4 * d + (3 * d * d + 3 * d + d * d + d) + d * d  # 2 LNs, QKV + out, ISTA dictionary
    assert sum(p.numel() for p in blk.parameters()) == want
    # everything outside the blocks is CRATE's own
    base = ratelab.create_model("crate_pico_patch4_16")
    outside = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("blocks."))
    assert outside == sum(p.numel() for n, p in base.named_parameters() if not n.startswith("blocks."))


@pytest.mark.parametrize("kind", ["mlp", "mhsa"])
def test_forward_shapes_and_attention_maps(kind):
    model = ratelab.create_model(PICO[kind], in_chans=3, num_classes=6, img_size=32).eval()
    x = _x(model)
    assert model(x).shape == (2, 6)
    with torch.no_grad():
        final, inter, attn = model.forward_intermediates(x, indices=[-2], return_attn=True)
        torch.testing.assert_close(final, model.forward_features(x), atol=1e-5, rtol=1e-5)
    assert len(inter) == len(attn) == 1 and inter[0].shape == (2, 64, 64)
    a = attn[0]
    assert a.shape == (2, 4, 65, 65)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 4, 65))
    # the map equals a direct computation from the block's own projections
    blk = model.blocks[-2]
    with torch.no_grad():
        z = model.embed(x)
        for b in model.blocks[:-2]:
            z = b(z)
        t = blk.norm1(z)
        if kind == "mlp":
            q = k = blk.attn.project(t)
        else:
            q, k, _ = blk.attn.qkv(t).reshape(2, 65, 3, 4, 16).permute(2, 0, 3, 1, 4)
        ref = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1)
    torch.testing.assert_close(a, ref, atol=1e-5, rtol=1e-5)


def test_mlp_block_is_residual_and_mhsa_keeps_ista():
    torch.manual_seed(0)
    mlp_blk = ratelab.create_model(PICO["mlp"]).blocks[0]
    z = torch.randn(2, 5, 64)
    half = z + mlp_blk.attn(mlp_blk.norm1(z))
    torch.testing.assert_close(mlp_blk(z), half + mlp_blk.mlp(mlp_blk.norm2(half)))
    mhsa_blk = ratelab.create_model(PICO["mhsa"]).blocks[0]
    half = z + mhsa_blk.attn(mhsa_blk.norm1(z))
    out = mhsa_blk(z)
    torch.testing.assert_close(out, mhsa_blk.ista(mhsa_blk.norm2(half)))
    assert (out >= 0).all()  # the ISTA ReLU


def test_layer_measures_are_honest():
    mlp, mhsa = (ratelab.create_model(PICO[k]) for k in ("mlp", "mhsa"))
    assert supported_measures(mlp) == ("compression", "compression_half")
    assert supported_measures(mhsa) == ("sparsity",)
    assert Crate.layer_measures == ("compression", "compression_half", "sparsity")  # the class default: CRATE's
    x = _x(mlp, 3)
    q = mlp.forward_layer_quantities(x)
    assert "codes" not in q and q["proj"][0].shape == (3, 4, 17, 16)
    q = mhsa.forward_layer_quantities(x)
    assert "proj" not in q and q["keys"][0].shape == (3, 4, 17, 16) and q["codes"] is q["tokens"]
    r = measure_layers(mhsa, x)
    assert all(row["compression"] is None and row["sparsity"] is not None for row in r["layers"])
    r = measure_layers(mlp, x)
    assert all(row["sparsity"] is None and row["compression"] is not None for row in r["layers"])


def test_config_switches_validate_and_round_trip():
    with pytest.raises(ConfigError, match="attn"):
        ratelab.create_model("test_crate", attn="linear")
    with pytest.raises(ConfigError, match="mlp"):
        ratelab.create_model("test_crate", mlp="moe")
    with pytest.raises(ValueError, match="head_dim"):
        CrateConfig(embed_dim=64, num_heads=4, head_dim=8, attn="mhsa")
    m = ratelab.create_model("test_crate", mlp="mlp", mlp_ratio=2)
    assert m.model_args["mlp_ratio"] == 2.0 and m.blocks[0].mlp.fc1.out_features == 64
    assert CRATE_VARIANTS["pico"].override(attn="mhsa").variant_name == "crate_mhsa"
    # set_fused_ista skips MLP blocks, set_attn_backend reaches both attentions
    for name in PICO.values():
        model = ratelab.create_model(name).eval()
        x = _x(model)
        with torch.no_grad():
            fast = model(x)
            model.set_attn_backend("ref")
            model.set_fused_ista(False)
            torch.testing.assert_close(model(x), fast, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["crate_mlp_tiny_patch8_224", "crate_mhsa_tiny_patch8_224"])
def test_paper_s8_widths(name):
    with torch.device("meta"):
        model = ratelab.create_model(name)
    assert (model.cfg.embed_dim, model.cfg.num_heads, model.cfg.patch_size) == (384, 6, 8)
