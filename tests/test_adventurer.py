"""Adventurer model: registry and parameter counts, shapes, flip schedules, heading-average switch, backends,
intermediates, overrides, save/load and a Trainer smoke run."""

from __future__ import annotations

import pytest
import torch

import ratelab
import ratelab.models.adventurer  # noqa: F401  (registers the family until ratelab.models imports it)
from ratelab.core.checkpoint import load_model, save_model
from ratelab.models.adventurer import Adventurer, AdventurerBlock, AdventurerConfig, flip_flags
from ratelab.models.adventurer.adventurer import reverse_patches

# Design note §1.5 (official sizes, 224 px, 1000 classes), in millions.
PAPER_PARAMS_M = {
    "adventurer_tiny_patch16_224": 11.61,
    "adventurer_small_patch16_224": 44.49,
    "adventurer_base_patch16_224": 98.66,
    "adventurer_large_patch16_224": 346.20,
    "adventurer_base_patch8_224": 98.67,
}
ALL = sorted(PAPER_PARAMS_M) + ["adventurer_nano_patch4_16", "test_adventurer"]


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def closed_form_params(model: Adventurer) -> int:
    """Stem + tokens + L x (mixer + SwiGLU + 2 norms) + final norm + head, from the architecture alone."""
    c = model.cfg
    D, d_in, N_s, g, L = c.embed_dim, c.d_inner, c.d_state, c.ngroups, c.depth
    H = d_in // c.headdim
    conv_ch = d_in + 2 * g * N_s
    mixer = D * (2 * d_in + 2 * g * N_s + H) + conv_ch * (c.d_conv + 1) + 3 * H + d_in + d_in * D
    hid = int(c.mlp_ratio * D)
    mlp = 2 * (D * hid + hid) + hid * D + D
    n = (model.img_size // c.patch_size) ** 2
    stem = model.in_chans * c.patch_size**2 * D + D + D + (n + 1) * D
    head = D * model.num_classes + model.num_classes if model.num_classes else 0
    return stem + L * (mixer + mlp + 2 * D) + D + head


def images(model: Adventurer, batch: int = 2, size: int | None = None, dtype=torch.float32) -> torch.Tensor:
    s = size or model.img_size
    return torch.randn(batch, model.in_chans, s, s, generator=torch.Generator().manual_seed(1), dtype=dtype)


@pytest.mark.parametrize("name", ALL)
def test_registry_param_count(name):
    with torch.device("meta"):
        model = ratelab.create_model(name)
    assert isinstance(model, Adventurer) and model.model_name == name
    assert count(model) == closed_form_params(model)
    if name in PAPER_PARAMS_M:
        assert round(count(model) / 1e6, 2) == PAPER_PARAMS_M[name]
    if name == "adventurer_nano_patch4_16":  # comparable to crate_nano_patch4_16 (0.305M)
        with torch.device("meta"):
            crate = ratelab.create_model("crate_nano_patch4_16")
        assert abs(count(model) / count(crate) - 1) < 0.05


def test_tiny_real_build_and_forward():
    model = ratelab.create_model("adventurer_tiny_patch16_224").eval()
    assert count(model) == 11_608_840
    with torch.no_grad():
        feats = model.forward_features(images(model, batch=1))
        logits = model.forward_head(feats)
    assert feats.shape == (1, 197, 256) and logits.shape == (1, 1000) and torch.isfinite(logits).all()
    # init (§1.7): zero Linear biases, out_proj rescaled by 1/sqrt(depth), tokens trunc-normal(0.02)
    with torch.no_grad():
        biases = [m.bias for m in model.modules() if isinstance(m, torch.nn.Linear) and m.bias is not None]
        assert all(float(b.abs().max()) == 0 for b in biases)
        bound = (1 / 512) ** 0.5 / 12**0.5  # kaiming_uniform(a=sqrt 5) bound is 1/sqrt(fan_in)
        assert float(model.blocks[0].mixer.out_proj.weight.abs().max()) <= bound
        assert 0.018 < float(model.pos_embed.std()) < 0.022


def test_shapes_and_head_reads_the_last_token():
    model = ratelab.create_model("test_adventurer").eval()
    x = images(model)
    feats = model.forward_features(x)
    assert feats.shape == (2, 5, 32)
    pre = model.forward_head(feats, pre_logits=True)
    torch.testing.assert_close(pre, model.norm(feats[:, -1]))
    torch.testing.assert_close(model(x), model.head(pre))
    feats2 = feats.clone()
    feats2[:, :-1] = 0  # patch tokens do not reach the head directly
    torch.testing.assert_close(model.forward_head(feats2), model(x))
    with pytest.raises(ValueError, match="expected input"):
        model(torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(2, 3, 10, 10))


def test_flip_schedules_documented_orders():
    assert [i for i, f in enumerate(flip_flags("alternate", 8)) if f] == [1, 3, 5, 7]
    assert [i for i, f in enumerate(flip_flags("pairs", 8)) if f] == [2, 3, 6, 7]
    assert [i for i, f in enumerate(flip_flags("legacy_2_3", 12)) if f] == [2, 3]
    assert not any(flip_flags("none", 6))
    with pytest.raises(ValueError, match="flip must be one of"):
        flip_flags("every", 4)
    with pytest.raises(ValueError, match="flip must be one of"):
        ratelab.create_model("test_adventurer", flip="every")
    model = ratelab.create_model("test_adventurer", depth=4, flip="pairs")
    assert [b.flip for b in model.blocks] == [False, False, True, True]
    t = torch.arange(5.0).view(1, 5, 1)
    assert reverse_patches(t).flatten().tolist() == [3, 2, 1, 0, 4]  # class token (last) stays last


@pytest.mark.parametrize("heading", [True, False])
def test_flipped_block_is_the_plain_block_on_reversed_patches(heading):
    torch.manual_seed(0)
    cfg = AdventurerConfig(embed_dim=32, depth=1, patch_size=4, d_state=8, headdim=16, heading_avg=heading)
    plain = AdventurerBlock(cfg, flip=False).double()
    flipped = AdventurerBlock(cfg, flip=True).double()
    flipped.load_state_dict(plain.state_dict())
    h = torch.randn(2, 7, 32, dtype=torch.float64)
    torch.testing.assert_close(flipped(h), reverse_patches(plain(reverse_patches(h))))
    assert not torch.allclose(flipped(h), plain(h))


def test_heading_average_switch():
    seen = []
    on = ratelab.create_model("test_adventurer", flip="none")  # no flip: only the heading token looks ahead
    off = ratelab.create_model("test_adventurer", flip="none", heading_avg=False)
    off.load_state_dict(on.state_dict())  # no parameters of its own
    for m in (on, off):
        hook = m.blocks[0].mixer.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
        m(images(m))
        hook.remove()
    assert seen == [6, 5]  # N + 2 with the heading token, N + 1 without
    # With the heading token, the first patch's output depends on every token (the average is global).
    x = images(on)
    for m, depends in ((on, True), (off, False)):
        feats = m.forward_features(x)
        x2 = x.clone()
        x2[..., 4:, 4:] += 1.0  # last patch only
        d = (m.forward_features(x2)[:, 0] - feats[:, 0]).abs().max()
        assert (d > 1e-6) == depends
    with pytest.raises(ValueError, match="heading_avg"):
        AdventurerConfig(heading_avg="yes")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_ssd_backends_and_grad_checkpointing_agree(dtype):
    model = ratelab.create_model("test_adventurer", img_size=16, depth=3).to(dtype)
    x = images(model, dtype=dtype)
    cot = torch.randn(2, 10, dtype=dtype)
    tol = dict(atol=1e-10, rtol=1e-8) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)
    res = {}
    # memory_efficient (the default): mixers recomputed from their input, SwiGLU keeping its fc1 outputs only
    cases = (("chunked", "chunked", False, False), ("ref", "ref", False, False), ("lean", "auto", False, True),
             ("lean_chunked", "chunked", False, True), ("ckpt", "auto", True, True))
    assert all(blk.memory_efficient and blk.mixer.recompute for blk in model.blocks)
    for name, backend, ckpt, lean in cases:
        model.set_ssd_backend(backend)
        model.set_grad_checkpointing(ckpt)
        model.set_memory_efficient(lean)
        xi = x.clone().requires_grad_()
        out = model(xi)
        res[name] = (out, torch.autograd.grad(out, [xi, *model.parameters()], cot))
    names = ["input", *(n for n, _ in model.named_parameters())]
    for other in ("ref", "lean", "lean_chunked", "ckpt"):
        torch.testing.assert_close(res["chunked"][0], res[other][0], **tol)
        for n, a, b in zip(names, res["chunked"][1], res[other][1], strict=True):
            torch.testing.assert_close(a, b, **tol, msg=lambda s, n=n, o=other: f"{o}: grad of {n}: {s}")
    with pytest.raises(ValueError, match="ssd backend"):
        model.set_ssd_backend("fast")


def test_inference_path_matches_ref_backend():
    # no_grad runs the in-place SwiGLU / gate / conv / scan variants and the gathered un-flip: same logits as the
    # reference scan with autograd on
    model = ratelab.create_model("test_adventurer", img_size=16, depth=3).double().eval()
    x = images(model, dtype=torch.float64)
    model.set_ssd_backend("ref")
    ref = model(x)
    model.set_ssd_backend("chunked")
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, ref.detach(), atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("flip,heading", [("alternate", True), ("none", True), ("alternate", False)])
def test_fast_inference_blocks_equal_the_reference_blocks(dtype, flip, heading):
    """Without autograd every block runs AdventurerBlock._forward_fast (norm weights folded into in_proj and fc1,
    the gated norm's scale applied in the residual add, flip as gathers, fc2 accumulated into the residual): the
    same logits as the op-by-op blocks (Mamba2.fast_inference = False), with non-trivial norm weights and biases."""
    torch.manual_seed(0)
    model = ratelab.create_model("test_adventurer", img_size=16, depth=3, flip=flip, heading_avg=heading)
    model = model.to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight", "norm.weight", "bias")):
                p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    x = images(model, dtype=dtype)
    ran = []
    for blk in model.blocks:
        blk._forward_fast = lambda h, f=blk._forward_fast: ran.append(1) or f(h)
    with torch.no_grad():
        fast = model(x)
        assert len(ran) == len(model.blocks)
        model.set_fast_inference(False)
        assert not any(blk.mixer.fast_inference for blk in model.blocks)
        ref = model(x)
    assert len(ran) == len(model.blocks)  # the reference run took the op-by-op path
    tol = dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(fast, ref, **tol)
    h0 = torch.randn(2, 17, 32, dtype=dtype)
    with torch.no_grad():
        h1 = h0.clone()
        model.blocks[1](h1)
    assert torch.equal(h1, h0)  # the block's input is not written in place
    # it steps aside with autograd on, and for an active DropPath (random) in train mode
    h = torch.zeros(1, 2, 32)
    dp = ratelab.create_model("test_adventurer", img_size=16, depth=3, drop_path_rate=0.5).train()
    assert not dp.eval().blocks[-1]._fast_applies(h)
    with torch.no_grad():
        assert dp.blocks[-1]._fast_applies(h)
        assert not dp.train().blocks[-1]._fast_applies(h)


def test_forward_intermediates_and_mixing_matrix():
    model = ratelab.create_model("test_adventurer", depth=3).double().eval()
    x = images(model, dtype=torch.float64)
    final, inter, attn = model.forward_intermediates(x, indices=[0, -1], return_attn=True)
    res = model.forward_layer_quantities(x, indices=[0, -1])
    assert res["indices"] == [0, 2] and len(inter) == 2
    torch.testing.assert_close(final, model.forward_features(x))
    torch.testing.assert_close(res["features"], model.forward_features(x))
    torch.testing.assert_close(res["tokens"][-1], res["features"])
    torch.testing.assert_close(inter[-1], final[:, :-1])  # the class token (last) is split off, timm's rule
    assert [t.shape for t in res["half"]] == [(2, 5, 32)] * 2
    H = model.blocks[0].mixer.nheads
    assert [a.shape for a in attn] == [(2, H, 5, 5)] * 2
    # block 0 is not flipped: causal in token order; block 1 (flipped) is checked via indices=[1]
    assert torch.equal(attn[0].triu(1), torch.zeros_like(attn[0]))
    flipped = model.forward_intermediates(x, indices=[1], return_attn=True)[2][0]
    patch = flipped[..., :4, :4]
    assert torch.equal(patch.tril(-1), torch.zeros_like(patch)) and patch.triu(1).abs().max() > 0
    assert model.forward_layer_quantities(x, indices=2)["indices"] == [1, 2]
    assert len(model.forward_intermediates(x, indices=2)[1]) == 2
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(x, indices=[3])
    # NCHW maps, the class token through return_prefix_tokens, the final RMSNorm with norm=True
    _, maps = model.forward_intermediates(x, indices=[2], output_fmt="NCHW")
    assert maps[0].shape == (2, 32, 2, 2)
    torch.testing.assert_close(maps[0].flatten(2).transpose(1, 2), inter[-1])
    (spatial, cls), = model.forward_intermediates(x, indices=[2], return_prefix_tokens=True, intermediates_only=True)
    torch.testing.assert_close(cls, final[:, -1:])
    _, normed = model.forward_intermediates(x, indices=[2], norm=True)
    torch.testing.assert_close(normed[0], model.norm(final)[:, :-1])
    assert model.layer_measures == ()


def test_overrides_and_unknown_option():
    m = ratelab.create_model(
        "test_adventurer", num_classes=7, img_size=12, in_chans=1, patch_size=3, embed_dim=48, depth=3
    )
    assert m.cfg.embed_dim == 48 and m.cfg.depth == 3 and m.cfg.patch_size == 3 and m.grid_size == (4, 4)
    assert m(torch.randn(2, 1, 12, 12)).shape == (2, 7)
    assert m.pos_embed.shape == (1, 17, 48)
    assert ratelab.create_model("test_adventurer", num_classes=0)(torch.randn(1, 3, 8, 8)).shape == (1, 32)
    with pytest.raises(TypeError, match="unknown Adventurer option"):
        ratelab.create_model("test_adventurer", heads=3)
    with pytest.raises(ValueError, match="headdim"):
        ratelab.create_model("test_adventurer", embed_dim=36)


def test_other_input_size_resamples_with_class_token_last():
    model = ratelab.create_model("test_adventurer").eval()
    out = model(torch.randn(2, 3, 16, 16))
    assert out.shape == (2, 10)
    pe = model._pos_embed((4, 4))
    torch.testing.assert_close(pe[:, -1], model.pos_embed[:, -1])  # the class token keeps its row


def test_save_load_round_trip_keeps_ablation_switches(tmp_path):
    model = ratelab.create_model("test_adventurer", flip="legacy_2_3", heading_avg=False, depth=4).eval()
    save_model(model, tmp_path)
    again = load_model(tmp_path).eval()
    assert again.cfg == model.cfg
    x = images(model)
    torch.testing.assert_close(again(x), model(x))


def test_trainer_two_steps(tmp_path):
    from ratelab.train import ClassificationTask, Trainer

    try:
        from _train_helpers import tiny_config
    except ImportError:  # pragma: no cover - tests/ imported as a package
        from tests._train_helpers import tiny_config

    cfg = tiny_config(tmp_path, model="test_adventurer", max_steps=2, epochs=1, batch_size=16)
    result = Trainer(cfg, ClassificationTask()).fit()
    assert result["steps"] == 2 and result["train_loss"] == result["train_loss"]  # finite (not NaN)
    reloaded = load_model(tmp_path / "checkpoints" / "last.pt")
    assert isinstance(reloaded, Adventurer) and reloaded.in_chans == 1 and reloaded.img_size == 16
