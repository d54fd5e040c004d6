"""Attention kernels: the SDPA fast path against the written-out reference (outputs and gradients)."""

from __future__ import annotations

import pytest
import torch

import ratelab.kernels.attention as attn_mod
from ratelab.kernels.attention import BACKENDS, attention, attention_ref, attention_sdpa

# Per-dtype tolerances, defined once. SDPA on CPU uses a blocked online softmax (flash-style), so it sums in another
# order than softmax-then-matmul: differences are accumulated rounding, a few ulps times sqrt(N) at these sizes.
TOL = {
    torch.float32: dict(atol=2e-6, rtol=2e-5),
    torch.float64: dict(atol=1e-12, rtol=1e-12),
}

# (B, H, Nq, Nk, p): single token, odd lengths, Nq != Nk, a length over the CPU kernel's block size.
SHAPES = [(1, 1, 1, 1, 4), (2, 3, 5, 5, 8), (1, 2, 7, 3, 16), (2, 2, 33, 33, 8), (1, 1, 130, 130, 4)]


def _inputs(shape, dtype, shared: bool, seed: int = 0):
    B, H, Nq, Nk, p = shape
    g = torch.Generator().manual_seed(seed)
    if shared:  # MSSA: q = k = v = U_k^T z
        w = torch.randn(B, H, Nq, p, dtype=dtype, generator=g)
        return w, w, w
    q = torch.randn(B, H, Nq, p, dtype=dtype, generator=g)
    k = torch.randn(B, H, Nk, p, dtype=dtype, generator=g)
    v = torch.randn(B, H, Nk, p, dtype=dtype, generator=g)
    return q, k, v


def _run(fn, inputs, cot, shared: bool):
    if shared:
        w = inputs[0].clone().requires_grad_()
        out = fn(w, w, w)
        (gw,) = torch.autograd.grad(out, [w], cot)
        return out, [gw]
    leaves = [t.clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return out, list(torch.autograd.grad(out, leaves, cot))


# Separate q, k, v for every shape; the MSSA case q = k = v where Nq == Nk.
CASES = [(s, False) for s in SHAPES] + [(s, True) for s in SHAPES if s[2] == s[3]]


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize(
    ("shape", "shared"), CASES, ids=lambda c: "x".join(map(str, c)) if isinstance(c, tuple) else ("qkv", "w")[c]
)
def test_sdpa_matches_reference(dtype, shape, shared):
    inputs = _inputs(shape, dtype, shared)
    scale = shape[-1] ** -0.5
    cot = torch.randn(*shape[:3], shape[4], dtype=dtype, generator=torch.Generator().manual_seed(1))
    out_ref, g_ref = _run(lambda q, k, v: attention_ref(q, k, v, scale=scale), inputs, cot, shared)
    for backend in ("sdpa", "auto"):
        out, grads = _run(lambda q, k, v, b=backend: attention(q, k, v, scale=scale, backend=b), inputs, cot, shared)
        torch.testing.assert_close(out, out_ref, **TOL[dtype], msg=lambda m, b=backend: f"{b} output: {m}")
        for name, a, b in zip("w" if shared else "qkv", grads, g_ref, strict=True):
            torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m, n=name, b=backend: f"{b} grad {n}: {m}")


def test_reference_is_the_formula():
    q, k, v = _inputs((2, 2, 4, 6, 3), torch.float64, shared=False)
    out, w = attention_ref(q, k, v, scale=0.3, return_weights=True)
    logits = torch.einsum("bhip,bhjp->bhij", q, k) * 0.3
    expected_w = logits.exp() / logits.exp().sum(-1, keepdim=True)
    torch.testing.assert_close(w, expected_w)
    torch.testing.assert_close(out, torch.einsum("bhij,bhjp->bhip", expected_w, v))


@pytest.mark.parametrize("backend", BACKENDS)
def test_return_weights(backend):
    q, k, v = _inputs((2, 3, 5, 7, 4), torch.float32, shared=False)
    out, w = attention(q, k, v, scale=0.5, backend=backend, return_weights=True)
    assert w.shape == (2, 3, 5, 7)
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 5))
    torch.testing.assert_close(out, w @ v)
    torch.testing.assert_close(out, attention_sdpa(q, k, v, scale=0.5), **TOL[torch.float32])


def test_backend_dispatch(monkeypatch):
    calls = []
    monkeypatch.setattr(attn_mod, "attention_sdpa", lambda *a, **kw: calls.append("sdpa") or attention_sdpa(*a, **kw))
    q, k, v = _inputs((1, 1, 3, 3, 2), torch.float32, shared=False)
    attention(q, k, v, scale=1.0)
    attention(q, k, v, scale=1.0, backend="sdpa")
    attention(q, k, v, scale=1.0, backend="ref")
    attention(q, k, v, scale=1.0, backend="auto", return_weights=True)  # weights force the reference path
    assert calls == ["sdpa", "sdpa"]


def test_bad_backend_is_an_error():
    q, k, v = _inputs((1, 1, 2, 2, 2), torch.float32, shared=False)
    with pytest.raises(ValueError, match="'flash'"):
        attention(q, k, v, scale=1.0, backend="flash")
