"""VAR's multi-scale residual VQ-VAE: parameter counts, the phi schedule, the quantizer's algebra, the round trip, the
teacher-forcing input, and parity with an independent reference built to the official layout (strict loading of
official files, through checkpoint_path and the weights registry)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ratelab
from ratelab.core.errors import CheckpointError, ConfigError
from ratelab.models.var import VQVAE, phi_schedule
from ratelab.models.var.quant import phi_ticks

try:  # tests/ is on sys.path in pytest's default (rootdir) import mode
    from reference.var_vqvae_official_layout import RefVQVAE
except ImportError:  # pragma: no cover - tests/ imported as a package
    from tests.reference.var_vqvae_official_layout import RefVQVAE

NAME = "var_vae_ch160v4096z32"
SMALL = dict(ch=16, vocab_size=64, patch_nums=(1, 2, 4))


def small(**kw) -> VQVAE:
    return ratelab.create_model(NAME, **{**SMALL, **kw}).eval()


def imgs(b=2, side=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, side, side, generator=g) * 2 - 1


def test_release_parameter_count():
    with torch.device("meta"):
        m = ratelab.create_model(NAME)
    count = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    assert count(m) == 108_948_355  # 108.95M, as the research note computed by instantiating the official module
    assert round(count(m.encoder) / 1e6, 2) == 44.11 and round(count(m.decoder) / 1e6, 2) == 64.65
    assert count(m.quantize.embedding) == 4096 * 32 and len(m.quantize.quant_resi.qresi_ls) == 4
    assert m.patch_nums == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16) and m.num_tokens == 680 and m.img_size == 256


def test_overrides_and_bad_values():
    m = small()
    assert m.cfg.ch == 16 and m.cfg.groups == 16 and m.quantize.embedding.weight.shape == (64, 32)
    assert m.model_args["patch_nums"] == [1, 2, 4] and m.img_size == 64
    m2 = ratelab.create_model(NAME, ch=16, vocab_size=32, z_channels=8, patch_nums=(1, 2), ch_mult=(1, 2))
    assert m2.downsample == 2 and m2.img_size == 4 and m2.quant_conv.weight.shape == (8, 8, 3, 3)
    with pytest.raises(ConfigError, match="norm_groups"):
        ratelab.create_model(NAME, ch=24, norm_groups=16)
    with pytest.raises(ConfigError, match="coarse to fine"):
        ratelab.create_model(NAME, patch_nums=(2, 1))
    with pytest.raises(ValueError, match=r"\(B, 3, 64, 64\)"):
        m.img_to_idx(imgs(side=32))
    with pytest.raises(ValueError, match="3 scales"):
        m.idx_to_img(m.img_to_idx(imgs())[:2])


def test_phi_schedule_rule():
    assert phi_schedule(10) == (0, 0, 1, 1, 1, 2, 2, 3, 3, 3)  # the release's ten scales
    # the general rule is the official code's, in float64: nearest of K ticks linspace(m, 1 - m, K) (m = 1/3K
    # for K = 4, else 1/2K) to si / (n - 1). Exact ties in real arithmetic (n = 10, si = 2 lies halfway between
    # the first two ticks) are decided by float rounding, so the reference is numpy's own arithmetic.
    for n in (2, 3, 5, 7, 13, 14):
        for k in (2, 3, 4, 6):
            m = 1 / 3 / k if k == 4 else 1 / 2 / k
            ticks = np.linspace(m, 1 - m, k)
            want = tuple(int(np.argmin(np.abs(ticks - si / (n - 1)))) for si in range(n))
            assert phi_schedule(n, k) == want, (n, k)
    assert np.allclose(phi_ticks(4), [3 / 36, 13 / 36, 23 / 36, 33 / 36])
    assert phi_schedule(3, 2) == (0, 0, 1) and phi_schedule(4, 2) == (0, 0, 1, 1)  # no ties: by hand
    assert phi_schedule(5, 1) == (0,) * 5 and phi_schedule(6, 0) == tuple(range(6))
    assert phi_schedule(1) == (0,)
    # the model's scale -> conv map is that schedule
    m = small(patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), ch_mult=(1,))
    convs = list(m.quantize.quant_resi.qresi_ls)
    assert [convs.index(m.quantize.phi(si)) for si in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]


def test_quantizer_algebra():
    """forward: straight-through value f_hat, identity gradient to f, the VQ loss formula; f_to_idx agrees."""
    q = small().quantize
    f = torch.randn(2, 32, 4, 4, requires_grad=True)
    f_st, loss, hits = q(f)
    fhats = q.f_to_idx(f.detach(), to_fhat=True)
    assert torch.allclose(f_st, fhats[-1], atol=1e-5)
    want = sum(1.25 * F.mse_loss(fh, f.detach()) for fh in fhats) / 3
    assert torch.allclose(loss, want, rtol=1e-5)
    assert hits.shape == (3, 64) and hits.sum(1).tolist() == [2.0, 8.0, 32.0]
    g = torch.randn_like(f)
    (f_st * g).sum().backward()
    assert torch.allclose(f.grad, g)
    # the codebook and phi get gradients through the second loss term only
    q.zero_grad()
    _, loss, _ = q(f.detach())
    loss.backward()
    assert q.embedding.weight.grad.abs().sum() > 0 and q.quant_resi.qresi_ls[0].weight.grad is not None
    # every index is the nearest code of the (downsampled) residual, also under bf16 autocast (fp32 inside)
    idx = q.f_to_idx(f.detach())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert all(torch.equal(a, b) for a, b in zip(q.f_to_idx(f.detach()), idx, strict=True))
        assert q(f.detach())[0].dtype == torch.float32
    rest = f.detach() - 0
    for si, pn in enumerate(q.patch_nums):
        z = F.interpolate(rest, size=(pn, pn), mode="area") if si < 2 else rest
        z = z.permute(0, 2, 3, 1).reshape(-1, 32)
        assert torch.equal(torch.cdist(z, q.embedding.weight).argmin(1), idx[si].reshape(-1))
        h = q.embedding(idx[si]).transpose(1, 2).reshape(2, 32, pn, pn)
        h = F.interpolate(h, size=(4, 4), mode="bicubic") if si < 2 else h
        rest = rest - q.phi(si)(h)


def test_round_trip_and_var_input():
    m = small()
    x = imgs()
    idx = m.img_to_idx(x)
    assert [tuple(i.shape) for i in idx] == [(2, 1), (2, 4), (2, 16)] and all(i.dtype == torch.long for i in idx)
    assert all(int(i.min()) >= 0 and int(i.max()) < 64 for i in idx)
    fhats = m.img_to_fhat(x)
    rec = m.idx_to_img(idx)
    assert rec.shape == x.shape and rec.abs().max() <= 1.0
    assert torch.allclose(rec, m.fhat_to_img(fhats[-1]), atol=1e-4)
    assert torch.allclose(rec, m.img_to_reconstructed_img(x), atol=1e-4)
    steps = m.idx_to_img(idx, all_scales=True)
    assert len(steps) == 3 and torch.allclose(steps[-1], rec, atol=1e-4)
    # training forward decodes the same f_hat, unclamped
    out = m(x)
    assert torch.allclose(out.rec.clamp(-1, 1), rec, atol=1e-4)
    # teacher forcing: scale k+1's input is f_hat_k area-downsampled (B, L - 1, C)
    tf = m.idx_to_var_input(idx)
    assert tf.shape == (2, 4 + 16, 32)
    assert torch.allclose(tf[:, :4], F.interpolate(fhats[0], size=(2, 2), mode="area").flatten(2).transpose(1, 2),
                          atol=1e-5)
    assert torch.allclose(tf[:, 4:], fhats[1].flatten(2).transpose(1, 2), atol=1e-5)
    # step-by-step sampling helper reproduces both
    f_hat, nxt = None, []
    for si in range(len(m.patch_nums)):
        f_hat, n = m.quantize.next_var_input(si, f_hat, m.quantize.code_map(idx[si]))
        nxt.append(n.flatten(2).transpose(1, 2))
    assert torch.allclose(torch.cat(nxt[:-1], 1), tf, atol=1e-5) and torch.allclose(f_hat, fhats[-1], atol=1e-5)
    # official method names
    assert all(torch.equal(a, b) for a, b in zip(m.img_to_idxBl(x), idx, strict=True))
    assert torch.equal(m.quantize.idxBl_to_var_input(idx), tf)
    f0 = torch.zeros(2, 32, 4, 4)
    f1, n1 = m.quantize.get_next_autoregressive_input(0, 3, f0, m.quantize.code_map(idx[0]))
    assert torch.allclose(n1.flatten(2).transpose(1, 2), tf[:, :4], atol=1e-6)
    assert torch.allclose(m.idxBl_to_img(idx, same_shape=True, last_one=True), rec)


def _ref_and_ours(tmp_path, patch_nums=(1, 2, 3, 4)):
    torch.manual_seed(1)
    ref = RefVQVAE(ch=32, vocab=64, z=32, patch_nums=patch_nums).eval()
    with torch.no_grad():  # non-trivial phi convs and codebook
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    path = tmp_path / "vae_ch32v64z32.pth"
    torch.save(ref.state_dict(), path)
    ours = ratelab.create_model(NAME, ch=32, vocab_size=64, patch_nums=patch_nums, checkpoint_path=str(path)).eval()
    return ref, ours, path


def test_parity_with_the_official_layout(tmp_path):
    ref, ours, _ = _ref_and_ours(tmp_path)
    assert sorted(ref.state_dict()) == sorted(ours.state_dict())  # same keys: the strict load above used them all
    x = imgs(side=64, seed=3)
    with torch.no_grad():
        ri, oi = ref.img_to_idx(x), ours.img_to_idx(x)
        assert all(torch.equal(a, b) for a, b in zip(ri, oi, strict=True))
        assert len({int(v) for i in oi for v in i.flatten()}) > 4  # the check is not about one repeated code
        torch.testing.assert_close(ours.idx_to_img(oi), ref.idx_to_img(ri), atol=1e-4, rtol=0)
        torch.testing.assert_close(ours.idx_to_var_input(oi), ref.quantize.var_input(ri), atol=1e-5, rtol=0)


def test_registry_loads_the_release_layout(tmp_path, monkeypatch):
    ref, _, _ = _ref_and_ours(tmp_path)
    d = tmp_path / "weights" / "FoundationVision" / "var"
    d.mkdir(parents=True)
    sd = ref.state_dict()
    sd["quantize.ema_vocab_hit_SV"] = torch.ones(10, 64)  # a file of the 10-scale schedule: buffer replaced
    torch.save(sd, d / "vae_ch160v4096z32.pth")
    monkeypatch.setenv("RATELAB_WEIGHTS", str(tmp_path / "weights"))
    m = ratelab.create_model(NAME, pretrained=True, ch=32, vocab_size=64, patch_nums=(1, 2, 3, 4)).eval()
    assert torch.equal(m.quantize.embedding.weight, ref.quantize.embedding.weight)
    assert m.quantize.ema_vocab_hit_SV.shape == (4, 64)
    x = imgs(side=64, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(m.img_to_idx(x), ref.img_to_idx(x), strict=True))


def test_converter_names_what_does_not_fit(tmp_path):
    _, _, path = _ref_and_ours(tmp_path)
    with pytest.raises(CheckpointError, match=r"vocab_size=64 \(model 128\)"):
        ratelab.create_model(NAME, ch=32, vocab_size=128, patch_nums=(1, 2, 3, 4), checkpoint_path=str(path))
    with pytest.raises(CheckpointError, match=r"ch=32 \(model 16\)"):
        ratelab.create_model(NAME, ch=16, vocab_size=64, patch_nums=(1, 2, 3, 4), checkpoint_path=str(path))
    bad = tmp_path / "other.pth"
    torch.save({"foo.weight": torch.zeros(2)}, bad)
    with pytest.raises(CheckpointError, match="not a VAR tokenizer checkpoint"):
        ratelab.create_model(NAME, **SMALL, checkpoint_path=str(bad))


def test_convert_official_writes_ratelab_format(tmp_path):
    from ratelab.models.var.convert import convert_vqvae_official

    ref, ours, path = _ref_and_ours(tmp_path)
    out = convert_vqvae_official(path, tmp_path / "conv", ch=32, vocab_size=64, patch_nums=(1, 2, 3, 4))
    from ratelab.models._factory import load_model

    back = load_model(out.parent).eval()
    x = imgs(side=64, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(back.img_to_idx(x), ours.img_to_idx(x), strict=True))


def test_forward_features_and_intermediates():
    m = small()
    x = imgs()
    with torch.no_grad():
        f = m.forward_features(x)
        assert f.shape == (2, 32, 4, 4) and torch.equal(f, m.img_to_f(x))
        final, inter = m.forward_intermediates(x)
        torch.testing.assert_close(final, f, atol=0, rtol=0)
        assert [tuple(t.shape) for t in inter] == [(2, 16, 64, 64), (2, 16, 32, 32), (2, 32, 16, 16), (2, 32, 8, 8),
                                                  (2, 64, 4, 4)]
        last = m.forward_intermediates(x, indices=1, output_fmt="NLC", intermediates_only=True)
        assert len(last) == 1 and torch.equal(last[0], inter[-1].flatten(2).transpose(1, 2))
    with pytest.raises(ValueError, match="no norm"):
        m.forward_intermediates(x, norm=True)
    with pytest.raises(ValueError, match="out of range"):
        m.forward_intermediates(x, indices=[5])
