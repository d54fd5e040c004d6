"""M-VAR: sizes, official-layout parity, per-block state carry == re-scan == teacher forcing, masking everywhere.

The reference is written to the layout of OliverRensu/MVAR ``models/basic_mvar.py`` / ``mvar.py`` (9 AdaLN chunks
in the code's order, the dense block-diagonal mask buffer, ``attn.patch_nums``, a ``mamba_ssm`` Mamba2 under
``mamba``), with its own per-token Mamba-2 loop; it shares no code with ratelab's model.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_var_model import RefAttn, RefFFN, _codec, _randomized

from ratelab.core.errors import CheckpointError
from ratelab.models.var.convert import convert_mvar_checkpoint
from ratelab.models.var.mvar import MVAR, mvar_d12, mvar_d16, mvar_d20, mvar_d24, mvar_d32

PN = (1, 2, 3)
TINY = dict(depth=2, embed_dim=32, num_heads=2, patch_nums=PN, vocab_size=24, num_classes=5, d_state=8,
            headdim=16)


class RefMamba2(nn.Module):
    """mamba_ssm Mamba2's parameters (ngroups 1, d_conv 4, gated RMSNorm), a per-token recurrence."""

    def __init__(self, C, N, P):
        super().__init__()
        d_in = 2 * C
        self.d_in, self.N, self.P, self.H = d_in, N, P, d_in // P
        self.conv_dim = d_in + 2 * N
        self.in_proj = nn.Linear(C, 2 * d_in + 2 * N + self.H, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, 4, groups=self.conv_dim, padding=3)
        self.dt_bias = nn.Parameter(torch.rand(self.H) - 2)
        self.A_log = nn.Parameter(torch.rand(self.H))
        self.D = nn.Parameter(torch.rand(self.H))
        self.norm = nn.Module()
        self.norm.weight = nn.Parameter(1 + 0.1 * torch.randn(d_in))
        self.out_proj = nn.Linear(d_in, C, bias=False)

    def forward(self, u):
        Bn, L, _ = u.shape
        z, xbc, dt = torch.split(self.in_proj(u), [self.d_in, self.conv_dim, self.H], dim=-1)
        xbc = F.silu(self.conv1d(xbc.transpose(1, 2))[..., :L].transpose(1, 2))
        x, Bm, Cm = torch.split(xbc, [self.d_in, self.N, self.N], dim=-1)
        x = x.reshape(Bn, L, self.H, self.P)
        dt = F.softplus(dt + self.dt_bias)
        A = -torch.exp(self.A_log)
        h = u.new_zeros(Bn, self.H, self.P, self.N)
        ys = []
        for t in range(L):
            h = torch.exp(dt[:, t] * A)[..., None, None] * h + (dt[:, t, :, None] * x[:, t])[..., None] * Bm[:, t,
                                                                                                            None, None]
            ys.append((h * Cm[:, t, None, None]).sum(-1) + self.D[:, None] * x[:, t])
        y = torch.stack(ys, 1).reshape(Bn, L, self.d_in) * F.silu(z)
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-5) * self.norm.weight
        return self.out_proj(y)


class RefMBlock(nn.Module):
    def __init__(self, C, H, l2, pn, N, P):
        super().__init__()
        self.C = C
        self.attn, self.ffn, self.mamba = RefAttn(C, H, l2), RefFFN(C), RefMamba2(C, N, P)
        self.attn.register_buffer("patch_nums", torch.tensor([p * p for p in pn], dtype=torch.int32))
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 9 * C))

    def forward(self, x, c, bias):
        g1, g2, g3, s1, s2, s3, b1, b2, b3 = self.ada_lin(c).view(-1, 1, 9, self.C).unbind(2)
        ln = lambda t: F.layer_norm(t, (self.C,), eps=1e-6)  # noqa: E731
        x = x + self.attn(ln(x) * (1 + s1) + b1, bias) * g1
        x = x + self.mamba(ln(x) * (1 + s2) + b2) * g2
        return x + self.ffn(ln(x) * (1 + s3) + b3) * g3


class RefMVAR(nn.Module):
    def __init__(self, depth, C, H, pn, V, ncls, N, P, cvae=32, l2=True):
        super().__init__()
        self.C = C
        L = sum(p * p for p in pn)
        self.word_embed = nn.Linear(cvae, C)
        self.class_emb = nn.Embedding(ncls + 1, C)
        self.pos_start = nn.Parameter(torch.randn(1, 1, C))
        self.pos_1LC = nn.Parameter(torch.randn(1, L, C))
        self.lvl_embed = nn.Embedding(len(pn), C)
        self.blocks = nn.ModuleList([RefMBlock(C, H, l2, pn, N, P) for _ in range(depth)])
        d = torch.cat([torch.full((p * p,), i) for i, p in enumerate(pn)]).view(1, L, 1)
        self.register_buffer("lvl_1L", d.transpose(1, 2)[:, 0].contiguous())
        self.register_buffer("attn_bias_for_masking",
                             torch.where(d == d.transpose(1, 2), 0.0, -torch.inf).reshape(1, 1, L, L))
        self.head_nm = nn.Module()
        self.head_nm.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))
        self.head = nn.Linear(C, V)
        with torch.no_grad():
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


def _tiny(**kw) -> MVAR:
    return mvar_d16(**{**TINY, **kw}).eval()


@pytest.mark.parametrize("fn, millions", [(mvar_d12, 198), (mvar_d16, 464), (mvar_d20, 901), (mvar_d24, 1550),
                                          (mvar_d32, 3660)])
def test_named_sizes(fn, millions):
    with torch.device("meta"):
        m = fn()
    n = sum(p.numel() for p in m.parameters())
    digits = 1 if millions < 1000 else 10
    assert round(n / 1e6 / digits) * digits == millions, n
    blk = m.blocks[0]
    C = m.cfg.embed_dim
    assert blk.ada_lin.out_features == 9 * C and blk.mixer.nheads == 2 * C // 64 and blk.mixer.d_state == 64
    # the paper's "3.0B" for d32 is the size of a depth-30 model
    if fn is mvar_d32:
        with torch.device("meta"):
            d30 = mvar_d32(depth=30)
        assert round(sum(p.numel() for p in d30.parameters()) / 1e8) == 30


@pytest.mark.parametrize("l2", [True, False])
def test_official_layout_parity(l2):
    torch.manual_seed(0)
    ref = RefMVAR(2, 32, 2, PN, 24, 5, N=8, P=16, l2=l2).eval()
    m = _tiny(attn_l2_norm=l2)
    m.load_state_dict(convert_mvar_checkpoint(ref.state_dict(), m), strict=True)
    labels, x = torch.tensor([0, 3, 5]), torch.randn(3, m.L - 1, 32)
    with torch.no_grad():
        torch.testing.assert_close(m(labels, x), ref(labels, x), rtol=1e-4, atol=1e-4)
        # identical masking in train mode (label dropout and DropPath off)
        mt = _tiny(attn_l2_norm=l2, cond_drop_rate=0.0, drop_path=0.0).train()
        mt.load_state_dict(m.state_dict())
        torch.testing.assert_close(mt(labels, x), ref(labels, x), rtol=1e-4, atol=1e-4)


def test_official_layout_errors():
    sd = RefMVAR(2, 32, 2, PN, 24, 5, N=8, P=16).state_dict()
    with pytest.raises(CheckpointError, match="attn_l2_norm=True"):
        convert_mvar_checkpoint(sd, _tiny(attn_l2_norm=False))
    bad = dict(sd)
    bad["blocks.1.attn.patch_nums"] = torch.tensor([1, 4, 16], dtype=torch.int32)
    with pytest.raises(CheckpointError, match="scale sizes"):
        convert_mvar_checkpoint(bad, _tiny())
    causal = dict(sd, attn_bias_for_masking=torch.zeros_like(sd["attn_bias_for_masking"]))
    with pytest.raises(CheckpointError, match="block-diagonal"):
        convert_mvar_checkpoint(causal, _tiny())
    deeper = RefMVAR(3, 48, 3, PN, 24, 5, N=8, P=16).state_dict()  # e.g. a depth-30 file for mvar_d32
    with pytest.raises(CheckpointError, match="depth 3 and width 48"):
        convert_mvar_checkpoint(deeper, _tiny())


@pytest.mark.parametrize("cfg", [0.0, 2.5])
def test_state_carry_equals_rescan_equals_teacher_forcing(cfg):
    torch.manual_seed(2)
    m = _randomized(_tiny(patch_nums=(1, 2, 3, 4)))
    codec = _codec(m)
    labels = torch.tensor([1, 4, 5])  # 5: the null class (an unconditional row)
    kw = dict(cfg=cfg, top_k=6, top_p=0.9, seed=7, codec=codec, return_logits=True)
    carry = m.generate(labels, state_carry=True, **kw)
    rescan = m.generate(labels, state_carry=False, **kw)
    assert all(torch.equal(a, b) for a, b in zip(carry.idx_list, rescan.idx_list))
    for a, b in zip(carry.logits, rescan.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    x = torch.cat(carry.inputs, 1)
    with torch.no_grad():
        cond = m(labels, x)
        uncond = m(torch.full_like(labels, m.num_classes), x)
    K = len(m.patch_nums)
    for si, (lo, hi) in enumerate(m.begin_ends):
        t = cfg * si / (K - 1)
        torch.testing.assert_close(carry.logits[si], (1 + t) * cond[:, lo:hi] - t * uncond[:, lo:hi],
                                   rtol=1e-4, atol=1e-4)


def test_scales_only_see_coarser_scales():
    torch.manual_seed(3)
    m = _randomized(_tiny())
    labels, x = torch.tensor([2]), torch.randn(1, m.L - 1, 32)
    lo = m.begin_ends[2][0]
    y = x.clone()
    y[:, lo - 1:] += 1.0  # change the inputs of the last scale only
    with torch.no_grad():
        a, b = m(labels, x), m(labels, y)
    torch.testing.assert_close(a[:, :lo], b[:, :lo])
    assert not torch.allclose(a[:, lo:], b[:, lo:])
    assert math.isfinite(float(a.abs().max()))


def test_loading_through_the_registry(tmp_path, monkeypatch):
    import ratelab

    torch.manual_seed(4)
    ref = RefMVAR(2, 32, 2, PN, 24, 1000, N=8, P=16, l2=False).eval()  # the release's 1000 classes
    path = tmp_path / "OliverRen" / "M-VAR" / "d16.pth"
    path.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), path)
    monkeypatch.setenv("RATELAB_WEIGHTS", str(tmp_path))
    # the release's attn_l2_norm=False (README, d16/d20) comes from the registry entry
    m = ratelab.create_model("mvar_d16.in1k_256", pretrained=True, **{**TINY, "num_classes": None}).eval()
    assert m.cfg.attn_l2_norm is False and m.num_classes == 1000
    labels, x = torch.tensor([1]), torch.randn(1, m.L - 1, 32)
    with torch.no_grad():
        torch.testing.assert_close(m(labels, x), ref(labels, x), rtol=1e-4, atol=1e-4)
    m2 = ratelab.create_model("mvar_d16", checkpoint_path=path, **{**TINY, "num_classes": 1000},
                              attn_l2_norm=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(m2(labels, x), ref(labels, x), rtol=1e-4, atol=1e-4)


def test_attention_never_leaves_the_scale():
    m = _randomized(_tiny())
    labels, x = torch.tensor([0, 1]), torch.randn(2, m.L - 1, 32)
    with torch.no_grad():
        final, inter, attn = m.forward_intermediates(labels, x, return_attn=True)
        torch.testing.assert_close(final, m.forward_features(labels, x))
    ids = m.scale_ids
    across = ids[:, None] != ids[None, :]
    for a in attn:  # (B, H, L, L): zero weight on every pair of different scales, rows sum to one
        assert a.shape == (2, 2, m.L, m.L)
        assert float(a[..., across].abs().max()) == 0.0
        torch.testing.assert_close(a.sum(-1), torch.ones(2, 2, m.L))


def test_convert_mvar_official_writes_ratelab_format(tmp_path):
    from ratelab.models._factory import load_model
    from ratelab.models.var.convert import convert_mvar_official

    torch.manual_seed(6)
    ref = RefMVAR(2, 32, 2, PN, 24, 5, N=8, P=16).eval()
    path = tmp_path / "d16.pth"
    torch.save(ref.state_dict(), path)
    out = convert_mvar_official(path, tmp_path / "conv", "mvar_d16", **TINY)
    back = load_model(out.parent).eval()
    labels, x = torch.tensor([1, 5]), torch.randn(2, back.L - 1, 32)
    with torch.no_grad():
        torch.testing.assert_close(back(labels, x), ref(labels, x), rtol=1e-4, atol=1e-4)
