"""VAR transformer: sizes, official-layout parity, KV-cache generation vs teacher forcing, converter errors.

The reference below is written to the layout of FoundationVision/VAR ``models/var.py`` / ``basic_var.py`` (key
names, buffers, dense additive block-causal mask, explicit softmax attention), independently of ratelab's model.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ratelab.core.errors import CheckpointError, ConfigError
from ratelab.models.var.convert import convert_var_checkpoint
from ratelab.models.var.sampling import ResidualCodec
from ratelab.models.var.var import VAR, var_d12, var_d16, var_d20, var_d24, var_d30

PN = (1, 2, 3)
TINY = dict(depth=2, embed_dim=32, num_heads=2, patch_nums=PN, vocab_size=24, num_classes=5)


# ---- an independent reference with the official key names ------------------------------------------------------
class RefAttn(nn.Module):
    def __init__(self, C, H, l2):
        super().__init__()
        self.H, self.hd, self.l2 = H, C // H, l2
        self.mat_qkv = nn.Linear(C, 3 * C, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.randn(C) * 0.1), nn.Parameter(torch.randn(C) * 0.1)
        self.register_buffer("zero_k_bias", torch.zeros(C))
        if l2:
            self.scale_mul_1H11 = nn.Parameter(torch.randn(1, H, 1, 1) * 0.3 + math.log(4.0))
        self.proj = nn.Linear(C, C)

    def forward(self, x, bias):
        B, L, C = x.shape
        qkv = x @ self.mat_qkv.weight.T + torch.cat([self.q_bias, self.zero_k_bias, self.v_bias])
        q, k, v = qkv.view(B, L, 3, self.H, self.hd).permute(2, 0, 3, 1, 4)
        if self.l2:
            q = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            k = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            q = q * torch.exp(torch.minimum(self.scale_mul_1H11, torch.tensor(math.log(100.0))))
            scale = 1.0
        else:
            scale = 0.25 / math.sqrt(self.hd)
        w = torch.softmax(q @ k.transpose(-1, -2) * scale + bias, dim=-1)
        return self.proj((w @ v).transpose(1, 2).reshape(B, L, C))


class RefFFN(nn.Module):
    def __init__(self, C):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class RefBlock(nn.Module):
    def __init__(self, C, H, l2):
        super().__init__()
        self.C = C
        self.attn, self.ffn = RefAttn(C, H, l2), RefFFN(C)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))

    def forward(self, x, c, bias):
        g1, g2, s1, s2, b1, b2 = self.ada_lin(c).view(-1, 1, 6, self.C).unbind(2)
        ln = lambda t: F.layer_norm(t, (self.C,), eps=1e-6)  # noqa: E731
        x = x + self.attn(ln(x) * (1 + s1) + b1, bias) * g1
        return x + self.ffn(ln(x) * (1 + s2) + b2) * g2


class RefVAR(nn.Module):
    def __init__(self, depth, C, H, pn, V, ncls, cvae=32, l2=True):
        super().__init__()
        self.C, self.ncls = C, ncls
        L = sum(p * p for p in pn)
        self.word_embed = nn.Linear(cvae, C)
        self.class_emb = nn.Embedding(ncls + 1, C)
        self.pos_start = nn.Parameter(torch.randn(1, 1, C))
        self.pos_1LC = nn.Parameter(torch.randn(1, L, C))
        self.lvl_embed = nn.Embedding(len(pn), C)
        self.blocks = nn.ModuleList([RefBlock(C, H, l2) for _ in range(depth)])
        d = torch.cat([torch.full((p * p,), i) for i, p in enumerate(pn)]).view(1, L, 1)
        self.register_buffer("lvl_1L", d.transpose(1, 2)[:, 0].contiguous())
        self.register_buffer("attn_bias_for_masking",
                             torch.where(d >= d.transpose(1, 2), 0.0, -torch.inf).reshape(1, 1, L, L))
        self.head_nm = nn.Module()
        self.head_nm.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))
        self.head = nn.Linear(C, V)
        with torch.no_grad():  # non-trivial values everywhere (the official init makes gates ~0)
            for p in self.parameters():
                p.add_(torch.randn_like(p) * 0.2)

    def forward(self, labels, x_wo_first):
        B = labels.shape[0]
        c = self.class_emb(labels)
        x = torch.cat([c[:, None] + self.pos_start, self.word_embed(x_wo_first)], 1)
        x = x + self.lvl_embed(self.lvl_1L.expand(B, -1)) + self.pos_1LC
        for b in self.blocks:
            x = b(x, c, self.attn_bias_for_masking)
        s, sh = self.head_nm.ada_lin(c).view(-1, 1, 2, self.C).unbind(2)
        return self.head(F.layer_norm(x, (self.C,), eps=1e-6) * (1 + s) + sh)


def _tiny(**kw) -> VAR:
    return var_d16(**{**TINY, **kw}).eval()


# ---- sizes ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn, millions", [(var_d12, 133), (var_d16, 310), (var_d20, 601), (var_d24, 1030),
                                          (var_d30, 2010)])
def test_named_sizes(fn, millions):
    with torch.device("meta"):
        m = fn()
    n = sum(p.numel() for p in m.parameters())
    digits = 1 if millions < 1000 else 10  # 3 significant figures, as the README / the note give them
    assert round(n / 1e6 / digits) * digits == millions, n
    d = m.cfg.depth
    assert (m.cfg.embed_dim, m.cfg.num_heads, m.L, m.vocab_size) == (64 * d, d, 680, 4096)
    assert m.cfg.drop_path == pytest.approx(0.1 * d / 24)


def test_overrides_and_bad_options():
    m = var_d20(depth=3, patch_nums=(1, 2), vocab_size=10)
    assert (m.cfg.depth, m.cfg.embed_dim, m.cfg.num_heads, m.L, m.head.out_features) == (3, 192, 3, 5, 10)
    with pytest.raises(ConfigError, match="unknown VARConfig options"):
        var_d16(depht=2)
    with pytest.raises(ConfigError, match="embed_dim=30 is not divisible by num_heads=4"):
        var_d16(embed_dim=30, num_heads=4)
    with pytest.raises(ConfigError, match="no 'img_size'"):
        var_d16(img_size=32)
    with pytest.raises(ConfigError, match="state_carry is M-VAR's"):
        _tiny().generate(torch.tensor([0]), codec=_codec(_tiny()), state_carry=True)
    with pytest.raises(ValueError, match="x_BLCv_wo_first_l must have shape"):
        _tiny()(torch.tensor([0]), torch.zeros(1, 3, 32))


def test_init_rules():
    m = var_d16(depth=4, patch_nums=PN, vocab_size=64)
    C = m.cfg.embed_dim
    std = math.sqrt(1 / (3 * C))
    assert m.word_embed.weight.std().item() == pytest.approx(std, rel=0.1)
    assert m.head.weight.std().item() == pytest.approx(std * 0.02, rel=0.1)
    w = m.blocks[0].ada_lin.weight
    assert w[: 2 * C].std().item() == pytest.approx(std * m.cfg.init_adaln_gamma, rel=0.1)
    assert w[2 * C:].std().item() == pytest.approx(std * 0.5, rel=0.1)
    assert m.blocks[0].attn.proj.weight.std().item() == pytest.approx(std / math.sqrt(8), rel=0.1)
    assert float(m.blocks[0].ada_lin.bias.detach().abs().max()) == 0.0


# ---- official layout ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("l2", [True, False])
def test_official_layout_parity(l2):
    torch.manual_seed(0)
    ref = RefVAR(2, 32, 2, PN, 24, 5, l2=l2).eval()
    m = _tiny(attn_l2_norm=l2)
    sd = convert_var_checkpoint(ref.state_dict(), m)
    m.load_state_dict(sd, strict=True)
    labels, x = torch.tensor([0, 3, 5]), torch.randn(3, m.L - 1, 32)
    with torch.no_grad():
        torch.testing.assert_close(m(labels, x), ref(labels, x), rtol=1e-5, atol=1e-5)
    # ratelab's own layout passes through the same converter
    m2 = _tiny(attn_l2_norm=l2)
    m2.load_state_dict(convert_var_checkpoint(m.state_dict(), m2), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(m2(labels, x), m(labels, x))


def test_official_layout_errors():
    ref = RefVAR(2, 32, 2, PN, 24, 5)
    sd = ref.state_dict()
    with pytest.raises(CheckpointError, match="attn_l2_norm=True"):
        convert_var_checkpoint(sd, _tiny(attn_l2_norm=False))
    with pytest.raises(CheckpointError, match="depth 2 and width 32"):
        convert_var_checkpoint(sd, _tiny(depth=3))
    with pytest.raises(CheckpointError, match="another patch_nums"):
        convert_var_checkpoint(sd, _tiny(patch_nums=(1, 2, 4)))
    bad = dict(sd, attn_bias_for_masking=torch.zeros_like(sd["attn_bias_for_masking"]))
    with pytest.raises(CheckpointError, match="not the block-causal mask"):
        convert_var_checkpoint(bad, _tiny())
    with pytest.raises(CheckpointError, match="M-VAR checkpoint"):
        convert_var_checkpoint({**sd, "blocks.0.mamba.A_log": torch.zeros(2)}, _tiny())


# ---- generation -----------------------------------------------------------------------------------------------
def _codec(m: VAR, seed: int = 0) -> ResidualCodec:
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(32, 32, 3, padding=1)
    return ResidualCodec(torch.randn(m.vocab_size, 32, generator=g), m.patch_nums,
                         phi=lambda si, h: 0.5 * h + 0.5 * conv(h))


def _randomized(m: VAR) -> VAR:
    with torch.no_grad():  # the official init has ~0 gates: perturb so that every path matters
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m


@pytest.mark.parametrize("cfg", [0.0, 2.0])
def test_kv_cache_generation_equals_teacher_forcing(cfg):
    torch.manual_seed(1)
    m = _randomized(_tiny())
    codec = _codec(m)
    labels = torch.tensor([1, 4])
    g = m.generate(labels, cfg=cfg, top_k=5, top_p=0.9, seed=3, codec=codec, return_logits=True)
    assert [t.shape for t in g.idx_list] == [(2, p * p) for p in PN]
    x = torch.cat(g.inputs, 1)
    with torch.no_grad():
        cond = m(labels, x)
        uncond = m(torch.full_like(labels, m.num_classes), x)
    for si, (lo, hi) in enumerate(m.begin_ends):
        t = cfg * si / (len(PN) - 1)
        want = (1 + t) * cond[:, lo:hi] - t * uncond[:, lo:hi]
        torch.testing.assert_close(g.logits[si], want, rtol=1e-4, atol=1e-4)
    g2 = m.generate(labels, cfg=cfg, top_k=5, top_p=0.9, seed=3, codec=codec)
    assert all(torch.equal(a, b) for a, b in zip(g.idx_list, g2.idx_list))  # seeded
    assert all(not blk.attn.training for blk in m.blocks)


def test_generate_modes_and_errors():
    m = _tiny()
    codec = _codec(m)
    g = m.generate(None, batch_size=3, seed=0, codec=codec, more_smooth=True)  # random classes, soft codes
    assert g.f_hat.shape == (3, 32, 3, 3) and g.images is None
    g = m.generate(-1, batch_size=2, cfg=1.5, seed=0, codec=codec)  # unconditional
    assert g.idx_list[-1].shape == (2, 9)
    with pytest.raises(ConfigError, match="needs a tokenizer or a codec"):
        m.generate(torch.tensor([0]))
    with pytest.raises(ConfigError, match=r"labels must be class ids in \[0, 5\)"):
        m.generate(torch.tensor([0, 6]), codec=codec)
    with pytest.raises(ConfigError, match="patch_nums"):
        m.generate(torch.tensor([0]), codec=ResidualCodec(torch.randn(24, 32), (1, 2)))


def test_more_smooth_softens_only_the_filtered_logits():
    # The official sampler masks its logits in place before the Gumbel-softmax: with top_k=1 the soft code is the
    # argmax's codebook row exactly, so the smooth and the plain runs build the same f_hat.
    torch.manual_seed(2)
    m = _randomized(_tiny())
    codec = _codec(m)
    labels = torch.tensor([0, 3])
    plain = m.generate(labels, cfg=1.5, top_k=1, top_p=0.0, seed=4, codec=codec)
    smooth = m.generate(labels, cfg=1.5, top_k=1, top_p=0.0, seed=4, codec=codec, more_smooth=True)
    assert all(torch.equal(a, b) for a, b in zip(plain.idx_list, smooth.idx_list))
    torch.testing.assert_close(smooth.f_hat, plain.f_hat, rtol=0, atol=1e-6)


def test_generation_with_the_tokenizer():
    from ratelab.models.var.config import VQVAEConfig
    from ratelab.models.var.vqvae import VQVAE

    torch.manual_seed(0)
    tok = VQVAE(VQVAEConfig(vocab_size=24, z_channels=32, ch=16, ch_mult=(1, 2), num_res_blocks=1,
                            patch_nums=PN)).eval()
    m = _randomized(_tiny())
    g = m.generate(torch.tensor([2, 0]), cfg=1.0, seed=0, tokenizer=tok, return_logits=True)
    assert g.images.shape == (2, 3, 6, 6) and 0 <= float(g.images.min()) and float(g.images.max()) <= 1
    # the inputs fed step by step are the tokenizer's teacher-forcing input for the sampled tokens
    torch.testing.assert_close(torch.cat(g.inputs, 1), tok.idx_to_var_input(g.idx_list), rtol=1e-5, atol=1e-5)


def test_label_dropout_only_in_training():
    m = _tiny(cond_drop_rate=0.5)
    labels = torch.zeros(64, dtype=torch.long)
    assert torch.equal(m.drop_labels(labels), labels)
    m.train()
    dropped = m.drop_labels(labels)
    assert 10 < int((dropped == m.num_classes).sum()) < 54


def test_official_file_through_the_registry(tmp_path, monkeypatch):
    import ratelab

    torch.manual_seed(5)
    ref = RefVAR(2, 32, 2, PN, 24, 1000).eval()
    path = tmp_path / "FoundationVision" / "var" / "var_d16.pth"
    path.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), path)
    monkeypatch.setenv("RATELAB_WEIGHTS", str(tmp_path))
    m = ratelab.create_model("var_d16.in1k_256", pretrained=True, **{**TINY, "num_classes": None}).eval()
    labels, x = torch.tensor([999, 1000]), torch.randn(2, m.L - 1, 32)
    with torch.no_grad():
        torch.testing.assert_close(m(labels, x), ref(labels, x), rtol=1e-4, atol=1e-4)


def test_convert_var_official_writes_ratelab_format(tmp_path):
    from ratelab.models._factory import load_model
    from ratelab.models.var.convert import convert_var_official

    torch.manual_seed(6)
    ref = RefVAR(2, 32, 2, PN, 24, 5).eval()
    path = tmp_path / "var_d16.pth"
    torch.save(ref.state_dict(), path)
    out = convert_var_official(path, tmp_path / "conv", "var_d16", **TINY)
    back = load_model(out.parent).eval()
    labels, x = torch.tensor([0, 5]), torch.randn(2, back.L - 1, 32)
    with torch.no_grad():
        torch.testing.assert_close(back(labels, x), ref(labels, x), rtol=1e-4, atol=1e-4)
    torch.save(_tiny().state_dict(), tmp_path / "ours.pth")  # ratelab's own layout is not an official file
    with pytest.raises(CheckpointError, match="not an official FoundationVision/VAR checkpoint"):
        convert_var_official(tmp_path / "ours.pth", tmp_path / "conv2", "var_d16", **TINY)
