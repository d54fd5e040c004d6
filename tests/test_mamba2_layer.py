"""Mamba-2 mixer layer: mamba_ssm parameter layout and init, causal conv, gated RMSNorm, causality, SSD backends
(outputs and gradients), the recurrent step and the implicit mixing matrix."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ratelab.kernels.ssd import ssd_ref
from ratelab.layers.mamba2 import Mamba2, RMSNormGated, causal_conv1d, causal_conv1d_step

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float64: dict(atol=1e-11, rtol=1e-9)}


def small_mixer(dtype=torch.float64, **kw) -> Mamba2:
    torch.manual_seed(0)
    kw = {"d_state": 8, "headdim": 8, "chunk_size": 4, **kw}
    m = Mamba2(16, **kw).to(dtype)
    with torch.no_grad():  # non-trivial norm gain and conv bias, so a swapped operand changes the output
        m.norm.weight.copy_(1 + 0.3 * torch.randn_like(m.norm.weight))
        m.conv1d.bias.copy_(0.3 * torch.randn_like(m.conv1d.bias))
    return m


def test_parameter_names_shapes_and_init():
    torch.manual_seed(0)
    m = Mamba2(256, d_state=64)  # Adventurer-T's mixer
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "in_proj.weight": (1160, 256),
        "conv1d.weight": (640, 1, 4),
        "conv1d.bias": (640,),
        "dt_bias": (8,),
        "A_log": (8,),
        "D": (8,),
        "norm.weight": (512,),
        "out_proj.weight": (256, 512),
    }
    assert sum(p.numel() for p in m.parameters()) == 431768  # 0.432M, design note §1.3
    dt = F.softplus(m.dt_bias)
    assert (dt >= 1e-3 - 1e-7).all() and (dt <= 0.1 + 1e-7).all()
    A = torch.exp(m.A_log)
    assert (A >= 1).all() and (A <= 16).all()
    assert torch.equal(m.D, torch.ones(8))
    assert all(p._no_weight_decay for p in (m.dt_bias, m.A_log, m.D))
    assert m.norm.group_size == 512
    m2 = Mamba2(32, d_state=4, headdim=8, ngroups=2, D_has_hdim=True)
    assert m2.norm.group_size == 32 and m2.D.shape == (64,) and m2.in_proj.weight.shape[0] == 2 * 64 + 2 * 8 + 8
    with pytest.raises(ValueError, match="headdim"):
        Mamba2(10, headdim=64)


def test_causal_conv_matches_shifted_sum_and_steps():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 5, dtype=torch.float64)
    w = torch.randn(5, 1, 4, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64)
    y = causal_conv1d(x, w, b)
    expected = torch.zeros_like(x) + b
    for t in range(7):
        for k in range(4):  # w[..., -1] multiplies the current position
            if t - 3 + k >= 0:
                expected[:, t] += w[:, 0, k] * x[:, t - 3 + k]
    torch.testing.assert_close(y, expected)
    state = torch.zeros(2, 5, 4, dtype=torch.float64)
    outs = []
    for t in range(7):
        o, state = causal_conv1d_step(x[:, t], state, w, b, activation="silu")
        outs.append(o)
    torch.testing.assert_close(torch.stack(outs, 1), F.silu(y))
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(x, w, b, activation="relu")


def test_rmsnorm_gated_formula():
    torch.manual_seed(0)
    n = RMSNormGated(8, group_size=4).double()
    with torch.no_grad():
        n.weight.copy_(torch.randn(8))
    x, z = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    g = x * F.silu(z)
    ref = torch.cat([h / torch.sqrt((h**2).mean(-1, keepdim=True) + 1e-5) for h in g.split(4, -1)], -1) * n.weight
    torch.testing.assert_close(n(x, z), ref)
    n.norm_before_gate = True
    xn = torch.cat([h / torch.sqrt((h**2).mean(-1, keepdim=True) + 1e-5) for h in x.split(4, -1)], -1)
    torch.testing.assert_close(n(x, z), xn * n.weight * F.silu(z))


def test_mixer_is_causal():
    m = small_mixer()
    u = torch.randn(2, 11, 16, dtype=torch.float64)
    y = m(u)
    u2 = u.clone()
    u2[:, 6] += 1.0
    y2 = m(u2)
    torch.testing.assert_close(y[:, :6], y2[:, :6], atol=0, rtol=0)
    assert (y[:, 6:] - y2[:, 6:]).abs().amax(-1).min() > 1e-6  # every later output sees the change


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("length", [8, 11])  # a multiple of the chunk (4) and not
@pytest.mark.parametrize("ngroups", [1, 2])
def test_chunked_matches_ref_outputs_and_grads(dtype, length, ngroups):
    m = small_mixer(dtype, ngroups=ngroups)
    u = torch.randn(2, length, 16, dtype=dtype)
    cot = torch.randn(2, length, 16, dtype=dtype)
    res = {}
    for backend in ("chunked", "recompute", "auto", "ref"):
        m.backend = backend
        ui = u.clone().requires_grad_()
        y = m(ui)
        res[backend] = (y, torch.autograd.grad(y, [ui, *m.parameters()], cot))
    names = ["input", *(n for n, _ in m.named_parameters())]
    for fast in ("chunked", "recompute", "auto"):
        torch.testing.assert_close(res[fast][0], res["ref"][0], **TOL[dtype])
        for n, a, b in zip(names, res[fast][1], res["ref"][1], strict=True):
            torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda s, n=n, f=fast: f"{f}: grad of {n}: {s}")


@pytest.mark.parametrize("ngroups", [1, 2])
def test_inference_path_matches_ref(ngroups):
    # under no_grad the conv, gate and scan run their in-place variants: same values as the reference scan
    m = small_mixer(torch.float64, ngroups=ngroups)
    u = torch.randn(2, 11, 16, dtype=torch.float64)
    m.backend = "ref"
    y_ref = m(u)
    m.backend = "chunked"
    with torch.no_grad():
        y = m(u)
    torch.testing.assert_close(y, y_ref.detach(), **TOL[torch.float64])


def test_step_matches_full_pass():
    m = small_mixer(D_has_hdim=True)
    u = torch.randn(2, 9, 16, dtype=torch.float64)
    full = m(u)
    conv_state, ssm_state = m.allocate_inference_cache(2)
    assert conv_state.shape == (2, m.conv_dim, 4) and ssm_state.shape == (2, m.nheads, 8, 8)
    outs = []
    for t in range(9):
        o, conv_state, ssm_state = m.step(u[:, t : t + 1], conv_state, ssm_state)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 1), full, **TOL[torch.float64])
    with pytest.raises(ValueError, match="one token"):
        m.step(u[:, :2], conv_state, ssm_state)


def test_mixing_matrix_reproduces_the_scan():
    m = small_mixer()
    u = torch.randn(2, 10, 16, dtype=torch.float64)
    M = m.mixing_matrix(u)
    assert M.shape == (2, m.nheads, 10, 10)
    assert torch.equal(M.triu(1), torch.zeros_like(M))  # causal
    s = m.ssm_inputs(u)
    y = ssd_ref(s["x"], s["dt"], m._A(), s["B"], s["C"], m.D, dt_bias=m.dt_bias, dt_softplus=True)
    y_M = torch.einsum("bhij,bjhp->bihp", M, s["x"]) + m.D[:, None] * s["x"]
    torch.testing.assert_close(y_M, y)
    assert math.isfinite(M.abs().max().item())


def test_plain_gate_without_rmsnorm():
    torch.manual_seed(0)
    m = Mamba2(16, d_state=4, headdim=8, rmsnorm=False).double()
    assert "norm.weight" not in m.state_dict()
    u = torch.randn(1, 5, 16, dtype=torch.float64)
    s = m.ssm_inputs(u)
    y = ssd_ref(s["x"], s["dt"], m._A(), s["B"], s["C"], m.D, dt_bias=m.dt_bias, dt_softplus=True).flatten(-2)
    torch.testing.assert_close(m(u), m.out_proj(y * F.silu(s["z"])))


def test_recompute_mixer_equals_kept_activations():
    m = small_mixer(torch.float64, ngroups=2)
    u = torch.randn(2, 11, 16, dtype=torch.float64)
    cot = torch.randn(2, 11, 16, dtype=torch.float64)
    res = {}
    for recompute in (False, True):
        m.recompute = recompute
        ui = u.clone().requires_grad_()
        y = m(ui)
        res[recompute] = (y, torch.autograd.grad(y, [ui, *m.parameters()], cot))
    torch.testing.assert_close(res[True][0], res[False][0], atol=0, rtol=0)
    for a, b in zip(res[True][1], res[False][1], strict=True):
        torch.testing.assert_close(a, b, **TOL[torch.float64])
    assert "recompute=True" in repr(m)


def test_chunk_continues_a_sequence_like_the_full_scan_and_steps():
    """Mamba2.chunk (M-VAR's state carry across scales): chunks of 1..5 tokens from carried states give the full
    scan's outputs and the token-by-token step's states."""
    torch.manual_seed(0)
    mix = Mamba2(16, d_state=8, headdim=8, chunk_size=4).eval()
    u = torch.randn(2, 11, 16)
    with torch.no_grad():
        full = mix(u)
        conv, ssm = mix.allocate_inference_cache(2)
        outs = []
        for lo, hi in ((0, 1), (1, 5), (5, 6), (6, 11)):  # chunks of 1, 4, 1, 5 tokens
            o, conv, ssm = mix.chunk(u[:, lo:hi], conv, ssm)
            outs.append(o)
        torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)
        conv2, ssm2 = mix.allocate_inference_cache(2)
        for t in range(11):  # the token-by-token step reaches the same states
            _, conv2, ssm2 = mix.step(u[:, t], conv2, ssm2)
        torch.testing.assert_close(conv, conv2)
        torch.testing.assert_close(ssm, ssm2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kw", [{}, {"ngroups": 2}, {"bias": True, "D_has_hdim": True}], ids=["one_group", "two_groups", "biases"]
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_fast_inference_path_equals_the_reference_path(kw, dtype):
    """Under no_grad Mamba2.forward runs forward_infer_parts (split in_proj, in-place gate, folded norm weight,
    scale after out_proj): the same function as the op-by-op path (fast_inference=False), also with an input
    scale folded into in_proj (a preceding RMSNorm's weight)."""
    m = small_mixer(dtype, **kw)
    if kw.get("bias"):
        with torch.no_grad():
            m.in_proj.bias.normal_(0, 0.3)
            m.out_proj.bias.normal_(0, 0.3)
    u = torch.randn(2, 11, 16, dtype=dtype)
    w = 1 + 0.3 * torch.randn(16, dtype=dtype)
    tol = TOL[dtype]
    with torch.no_grad():
        assert m.fast_inference_applies(u)
        fast = m(u)
        o, r = m.forward_infer_parts(u / 2, in_scale=2 * w)
        scaled = (o * r if r is not None else o) + (m.out_proj.bias if m.out_proj.bias is not None else 0)
        assert (r is None) == (m.ngroups > 1)
        m.fast_inference = False
        assert not m.fast_inference_applies(u)
        ref = m(u)
        ref_scaled = m(u * w)
    torch.testing.assert_close(fast, ref, **tol)
    torch.testing.assert_close(scaled, ref_scaled, **tol)
    m.fast_inference = True  # with autograd on, the reference path runs (the training path is untouched)
    assert not m.fast_inference_applies(u)
    ui = u.clone().requires_grad_()
    torch.testing.assert_close(m(ui), ref, **tol)
