"""Layer-wise compression / sparsity measurement and the `ratelab measure` command."""

import argparse
import json
import math

import matplotlib
import numpy as np
import pytest
import torch

import ratelab
from ratelab.analysis import compression, measure_layers, plot_layer_rates, rates_to_arrays, sparsity
from ratelab.objectives import coding_rate_ref

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ratelab.create_model("test_crate").eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def _slow_compression(proj: torch.Tensor, eps: float) -> torch.Tensor:
    """Loop over images and heads; normalize each token; float64 reference rate on the p x p side."""
    B, K = proj.shape[:2]
    out = torch.zeros(B, dtype=torch.float64)
    for b in range(B):
        for k in range(K):
            W = proj[b, k].double()
            W = W / W.norm(dim=-1, keepdim=True)
            out[b] += coding_rate_ref(W, eps)
    return out


def _official_formula(proj: torch.Tensor) -> torch.Tensor:
    """Literal official measurement: 1/2 logdet(I_N + p/(N * 0.01) W W^T) on normalized tokens, summed over heads."""
    W = proj.double()
    W = W / W.norm(dim=-1, keepdim=True)
    N, p = W.shape[-2:]
    G = W @ W.transpose(-1, -2)
    return (0.5 * torch.logdet(torch.eye(N, dtype=torch.float64) + p / (N * 0.01) * G)).sum(dim=1)


def test_compression_matches_slow_loop_and_official_formula(model, images):
    with torch.no_grad():
        fi = model.forward_layer_quantities(images)
    assert len(fi["proj"]) == len(model.blocks) == 2
    for proj in fi["proj"]:
        assert proj.shape == (6, 2, 5, 16)  # (B, K, N = 4 patches + CLS, p)
        slow = _slow_compression(proj, 0.1)
        assert torch.allclose(compression(proj, 0.1, dtype=torch.float64), slow, rtol=1e-10)
        assert torch.allclose(compression(proj, 0.1).double(), slow, rtol=1e-5)
        assert torch.allclose(compression(proj, 0.1, dtype=torch.float64), _official_formula(proj), rtol=1e-10)


def test_compression_sides_equal(model, images):
    with torch.no_grad():
        proj = model.forward_layer_quantities(images)["proj"][1]
    feat = compression(proj, 0.1, dtype=torch.float64, side="feature")  # p x p
    samp = compression(proj, 0.1, dtype=torch.float64, side="sample")  # N x N
    assert torch.allclose(feat, samp, rtol=1e-10)


def test_compression_known_values():
    B, K, N, p, eps = 2, 3, 7, 4, 0.1
    one = torch.randn(B, K, 1, p)
    proj = one.expand(B, K, N, p) * torch.rand(B, K, N, 1).add(0.5)  # one direction per head, any positive scale
    expect = K * 0.5 * math.log(1 + p / eps**2)  # rank 1, unit rows: 1/2 log(1 + p/(N eps^2) * N)
    assert torch.allclose(compression(proj, eps, dtype=torch.float64), torch.full((B,), expect, dtype=torch.float64))
    # Per-token positive rescaling never changes the measure (tokens are normalized).
    x = torch.randn(B, K, N, p)
    scaled = x * torch.rand(B, K, N, 1).add(0.1) * 10
    assert torch.allclose(compression(scaled, eps, dtype=torch.float64), compression(x, eps, dtype=torch.float64))
    # Zero tokens stay zero (no NaN), so an all-zero layer has rate 0.
    assert torch.equal(compression(torch.zeros(B, K, N, p), eps), torch.zeros(B))


def test_sparsity_known():
    t = torch.ones(3, 4, 5)
    t[0] = 0.0
    t[1, :2, :] = 0.0  # 10 of 20 entries
    t[1, 3, 0] = -0.0  # negative zero is a zero
    assert torch.allclose(sparsity(t), torch.tensor([1.0, 11 / 20, 0.0]))
    with pytest.raises(ValueError, match="tokens"):
        sparsity(torch.ones(5))


def test_measure_layers_consistent_with_direct_computation(model, images):
    model.train()
    res = measure_layers(model, images, eps=0.1, batch_size=4)  # batches of 4 + 2
    assert model.training  # training flag restored
    model.eval()
    json.dumps(res)  # JSON-able
    assert res["num_images"] == 6 and res["eps"] == 0.1
    assert (res["num_tokens"], res["num_heads"], res["head_dim"]) == (5, 2, 16)
    assert [r["layer"] for r in res["layers"]] == [0, 1]
    with torch.no_grad():
        fi = model.forward_layer_quantities(images)
        for i, r in enumerate(res["layers"]):
            blk = model.blocks[i]
            c = _slow_compression(fi["proj"][i], 0.1)
            h = _slow_compression(blk.attn.project(blk.norm1(fi["half"][i])), 0.1)
            s = torch.tensor([float((t == 0).sum()) / t.numel() for t in fi["tokens"][i]], dtype=torch.float64)
            for key, v in (("compression", c), ("compression_half", h), ("sparsity", s)):
                assert r[key] == pytest.approx(float(v.mean()), rel=1e-5), key
                assert r[key + "_std"] == pytest.approx(float(v.std(correction=0)), rel=1e-3, abs=1e-6), key
            assert math.isfinite(r["compression"]) and math.isfinite(r["compression_half"])
            assert 0.0 <= r["sparsity"] <= 1.0
            assert r["compression_half"] != r["compression"]  # a different quantity, not a copy


def test_measure_layers_batch_size_invariant(model, images):
    a = measure_layers(model, images, batch_size=1)
    b = measure_layers(model, images, batch_size=64)
    for ra, rb in zip(a["layers"], b["layers"]):
        for k in ("compression", "compression_half", "sparsity", "compression_std"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-7)


def test_sparsity_extremes_by_ista_lambda(images):
    torch.manual_seed(0)
    m = ratelab.create_model("test_crate")
    for blk in m.blocks:
        blk.ista.lambd = 1e6  # threshold far above any activation: every ISTA output is exactly 0
    res = measure_layers(m, images)
    assert [r["sparsity"] for r in res["layers"]] == [1.0, 1.0]
    assert [r["sparsity_std"] for r in res["layers"]] == [0.0, 0.0]
    assert res["layers"][1]["compression"] == 0.0  # layer 2 reads all-zero tokens: LN(0) = 0, U^T 0 = 0
    for blk in m.blocks:
        blk.ista.lambd = -1e6  # negative threshold shifts every entry far above 0: no zeros
    res = measure_layers(m, images)
    assert [r["sparsity"] for r in res["layers"]] == [0.0, 0.0]


def test_rates_to_arrays_and_projector_none(model, images):
    res = measure_layers(model, images, projector=None)
    assert all(r["compression_half"] is None for r in res["layers"])
    arr = rates_to_arrays(res)
    assert arr["layer"].tolist() == [0, 1]
    assert np.isnan(arr["compression_half"]).all()
    assert arr["compression"].tolist() == [r["compression"] for r in res["layers"]]
    with pytest.raises(KeyError, match="layers"):
        rates_to_arrays({})


class _NoBlocks(torch.nn.Module):
    """A CRATE-like model without `blocks`: only forward_layer_quantities (generic interface)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 6)

    def forward_layer_quantities(self, x):
        t = self.lin(x.flatten(2).transpose(1, 2))  # (B, N=H*W, 6)
        proj = t.reshape(t.shape[0], t.shape[1], 2, 3).transpose(1, 2)  # (B, 2, N, 3)
        return {"indices": [0], "proj": [proj], "half": [t], "tokens": [torch.relu(t)]}


def test_generic_model_interface():
    m = _NoBlocks()
    x = torch.randn(3, 4, 2, 2)
    res = measure_layers(m, x, projector=None)
    with torch.no_grad():
        fi = m.forward_layer_quantities(x)
    assert res["layers"][0]["compression"] == pytest.approx(
        float(_slow_compression(fi["proj"][0], 0.1).mean()), rel=1e-5
    )
    with pytest.raises(AttributeError, match="projector"):
        measure_layers(m, x)
    res = measure_layers(m, x, projector=lambda mod, i, z: z.reshape(z.shape[0], z.shape[1], 2, 3).transpose(1, 2))
    assert res["layers"][0]["compression_half"] == pytest.approx(res["layers"][0]["compression"], rel=1e-6)


def test_measure_layers_errors(model, images):
    with pytest.raises(ValueError, match="images"):
        measure_layers(model, images[0])
    with pytest.raises(ValueError, match="empty"):
        measure_layers(model, images[:0])
    with pytest.raises(ValueError, match="batch_size"):
        measure_layers(model, images, batch_size=0)
    with pytest.raises(ValueError, match="eps"):
        measure_layers(model, images, eps=0.0)
    with pytest.raises(AttributeError, match="forward_intermediates"):
        measure_layers(torch.nn.Linear(2, 2), images)
    with pytest.raises(ValueError, match=r"\(B, K, N, p\)"):
        compression(torch.randn(2, 5, 4), 0.1)


def test_plot_layer_rates(model, images, tmp_path):
    backend = matplotlib.rcParams["backend"]
    r1 = measure_layers(model, images)
    r2 = measure_layers(model, images * 3)
    fig = plot_layer_rates({"a": r1, "b": r2}, tmp_path / "rates.png")
    assert (tmp_path / "rates.png").stat().st_size > 1000
    ax_c, ax_s = fig.axes
    assert len(ax_c.get_legend().get_texts()) == 4  # two labels x (Z^l, Z^{l+1/2})
    assert len(ax_s.get_legend().get_texts()) == 2
    y = ax_s.lines[0].get_ydata()
    assert np.allclose(y, rates_to_arrays(r1)["sparsity"])
    assert matplotlib.rcParams["backend"] == backend
    with pytest.raises(ValueError, match="empty"):
        plot_layer_rates({})


# ---- CLI ------------------------------------------------------------------------------------------------------


def _parse(argv):
    from ratelab.cli.measure import add_parser

    p = argparse.ArgumentParser()
    add_parser(p.add_subparsers())
    return p.parse_args(["measure", *argv])


def test_cli_random_model_on_digits(tmp_path, capsys):
    from ratelab.cli.measure import run

    args = _parse(["--model", "test_crate", "--num-images", "24", "--batch-size", "10", "--out", str(tmp_path)])
    assert run(args) == 0
    res = json.loads((tmp_path / "rates.json").read_text())
    assert res["model"] == "test_crate" and res["checkpoint"] is None
    assert res["dataset"] == "digits" and res["split"] == "val" and res["img_size"] == 16
    assert res["num_images"] == 24 and res["num_tokens"] == 17  # 16x16 digits, 4 px patches, + CLS
    assert len(res["layers"]) == 2
    assert all(0 <= r["sparsity"] <= 1 and math.isfinite(r["compression"]) for r in res["layers"])
    assert (tmp_path / "rates.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "zero fraction" in out and len([ln for ln in out.splitlines() if ln.strip().startswith(("1 ", "2 "))]) == 2


def test_cli_checkpoint_loads_weights(tmp_path):
    from ratelab.cli.measure import _load_images, run
    from ratelab.core.checkpoint import load_model, save_model

    torch.manual_seed(3)
    save_model(ratelab.create_model("test_crate", in_chans=1, img_size=16), tmp_path / "ckpt")
    args = _parse(["--checkpoint", str(tmp_path / "ckpt"), "--num-images", "16", "--out", str(tmp_path / "m")])
    assert run(args) == 0
    res = json.loads((tmp_path / "m" / "rates.json").read_text())
    assert res["checkpoint"].endswith("ckpt") and res["model"] == "test_crate"
    images, _ = _load_images(args, 16)
    direct = measure_layers(load_model(tmp_path / "ckpt"), images)
    for a, b in zip(res["layers"], direct["layers"]):
        assert a["compression"] == pytest.approx(b["compression"], rel=1e-6)
        assert a["sparsity"] == pytest.approx(b["sparsity"], rel=1e-6)
    # A different random model gives different numbers, so the weights did come from the file.
    torch.manual_seed(4)
    other = measure_layers(ratelab.create_model("test_crate", in_chans=1, img_size=16), images)
    assert other["layers"][0]["compression"] != pytest.approx(res["layers"][0]["compression"], rel=1e-6)


def test_cli_errors(tmp_path):
    from ratelab.cli.errors import UsageError
    from ratelab.cli.measure import run
    from ratelab.core.checkpoint import save_model

    with pytest.raises(SystemExit):  # --model and --checkpoint are exclusive
        _parse(["--model", "test_crate", "--checkpoint", "x", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):  # --out is required
        _parse(["--model", "test_crate"])
    with pytest.raises(UsageError, match="--checkpoint"):
        run(_parse(["--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path)]))
    with pytest.raises(UsageError, match="--num-images"):
        run(_parse(["--model", "test_crate", "--num-images", "0", "--out", str(tmp_path)]))
    with pytest.raises(UsageError, match="--eps"):
        run(_parse(["--model", "test_crate", "--eps", "-1", "--out", str(tmp_path)]))
    save_model(ratelab.create_model("test_crate", img_size=16), tmp_path / "rgb")  # 3 channels vs 1-channel digits
    with pytest.raises(UsageError, match="channel"):
        run(_parse(["--checkpoint", str(tmp_path / "rgb"), "--num-images", "4", "--out", str(tmp_path)]))


def test_only_supported_measures_are_computed(model, images):
    from ratelab.analysis.layer_rates import supported_measures, unsupported_message

    full = measure_layers(model, images)
    torch.manual_seed(0)
    m = ratelab.create_model("test_crate")
    m.load_state_dict(model.state_dict())
    m.layer_measures = ("compression",)  # a family that has subspace projections but no sparse codes
    part = measure_layers(m, images)
    for a, b in zip(part["layers"], full["layers"], strict=True):
        assert a["compression"] == b["compression"]
        assert a["sparsity"] is None and a["compression_half"] is None
    assert supported_measures(m) == ("compression",) and supported_measures(torch.nn.Linear(2, 2)) == ()
    adv = ratelab.create_model("test_adventurer")
    assert supported_measures(adv) == ()
    with pytest.raises(ValueError, match="supports none"):
        measure_layers(adv, images)
    assert "sparsity needs sparse codes" in unsupported_message(m)


def test_cli_family_without_measures_says_what_is_needed(tmp_path):
    from ratelab.cli.errors import UsageError
    from ratelab.cli.measure import run

    with pytest.raises(UsageError, match=r"test_adventurer \(family adventurer\) supports none.*compression needs "
                                         r"per-head subspace projections.*sparsity needs sparse codes"):
        run(_parse(["--model", "test_adventurer", "--num-images", "4", "--out", str(tmp_path)]))


def test_cli_adventurer_run_says_which_families_have_measures(tmp_path):
    # The case: `ratelab measure` on an Adventurer run printed only "error: proj".
    from ratelab.cli.errors import UsageError
    from ratelab.cli.measure import family_measures, run
    from ratelab.core.checkpoint import save_model

    fams = family_measures()  # CRATE and its descendants (crate_alpha, crate_mae), never Adventurer or ICL-GPT
    assert fams["crate"] == ("compression", "compression_half", "sparsity")
    assert not {"adventurer", "icl_gpt", "mae_vit"} & set(fams)
    save_model(ratelab.create_model("adventurer_nano_patch4_16", in_chans=1, num_classes=10), tmp_path / "adv")
    needle = (r"adventurer_nano_patch4_16 \(family adventurer\) supports none of the layer measures.*Families with "
              r"layer measures: crate_\* \(compression, compression_half, sparsity\)")
    with pytest.raises(UsageError, match=needle):
        run(_parse(["--checkpoint", str(tmp_path / "adv"), "--num-images", "4", "--out", str(tmp_path / "m")]))
    with pytest.raises(UsageError, match=needle):
        run(_parse(["--model", "adventurer_nano_patch4_16", "--num-images", "4", "--out", str(tmp_path / "m")]))
    # A family whose builder takes no image size is refused for what it lacks, not for that argument.
    with pytest.raises(UsageError, match=r"icl_gpt_tiny \(family icl_gpt\) supports none"):
        run(_parse(["--model", "icl_gpt_tiny", "--num-images", "4", "--out", str(tmp_path / "m")]))
    assert not (tmp_path / "m").exists()
    # CRATE measures everything.
    assert run(_parse(["--model", "crate_nano_patch4_16", "--num-images", "4", "--out", str(tmp_path / "c")])) == 0
    res = json.loads((tmp_path / "c" / "rates.json").read_text())
    assert all(r[k] is not None for r in res["layers"] for k in ("compression", "compression_half", "sparsity"))


def test_vit_and_a_model_that_breaks_its_declaration(images):
    from timm.models.vision_transformer import VisionTransformer

    from ratelab.analysis.layer_rates import supported_measures

    vit = VisionTransformer(img_size=8, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    assert supported_measures(vit) == ()
    with pytest.raises(AttributeError, match="VisionTransformer has no forward_layer_quantities"):
        measure_layers(vit, images)

    class Liar(_NoBlocks):
        layer_measures = ("compression", "sparsity")  # declares sparsity but returns no codes

    with pytest.raises(ValueError, match=r"declares layer_measures.*returned no \['codes'\]"):
        measure_layers(Liar(), torch.randn(3, 4, 2, 2), projector=None)
