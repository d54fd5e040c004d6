"""Attention kernels: the SDPA fast path against the written-out reference (outputs and gradients), every mask form
against an explicit dense masked softmax, KV-cache decoding, grouped-query heads and the dispatch."""

from __future__ import annotations

import pytest
import torch

import ratelab.kernels.attention as attn_mod
from ratelab.kernels.attention import (
    BACKENDS,
    attention,
    attention_ref,
    attention_sdpa,
    block_ids_from_cu_seqlens,
    block_ids_from_seqlens,
)

# Per-dtype tolerances, defined once. SDPA on CPU uses a blocked online softmax (flash-style), so it sums in another
# order than softmax-then-matmul: differences are accumulated rounding, a few ulps times sqrt(N) at these sizes.
TOL = {
    torch.float32: dict(atol=2e-6, rtol=2e-5),
    torch.float64: dict(atol=1e-12, rtol=1e-12),
}

# (B, H, Nq, Nk, p): single token, odd lengths, Nq != Nk, a length over the CPU kernel's block size.
SHAPES = [(1, 1, 1, 1, 4), (2, 3, 5, 5, 8), (1, 2, 7, 3, 16), (2, 2, 33, 33, 8), (1, 1, 130, 130, 4)]


def _inputs(shape, dtype, shared: bool, seed: int = 0, kv_heads: int | None = None):
    B, H, Nq, Nk, p = shape
    g = torch.Generator().manual_seed(seed)
    if shared:  # MSSA: q = k = v = U_k^T z
        w = torch.randn(B, H, Nq, p, dtype=dtype, generator=g)
        return w, w, w
    Hk = kv_heads or H
    q = torch.randn(B, H, Nq, p, dtype=dtype, generator=g)
    k = torch.randn(B, Hk, Nk, p, dtype=dtype, generator=g)
    v = torch.randn(B, Hk, Nk, p, dtype=dtype, generator=g)
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


def _assert_paths_agree(inputs, dtype, shared=False, **kw):
    """ref vs sdpa vs auto on the same inputs and mask arguments: outputs and every input gradient."""
    q = inputs[0]
    cot = torch.randn(*q.shape[:3], inputs[2].shape[-1], dtype=dtype, generator=torch.Generator().manual_seed(1))
    out_ref, g_ref = _run(lambda q, k, v: attention_ref(q, k, v, **kw), inputs, cot, shared)
    for backend in ("sdpa", "auto"):
        out, grads = _run(lambda q, k, v, b=backend: attention(q, k, v, backend=b, **kw), inputs, cot, shared)
        torch.testing.assert_close(out, out_ref, **TOL[dtype], msg=lambda m, b=backend: f"{b} output: {m}")
        for name, a, b in zip("w" if shared else "qkv", grads, g_ref, strict=True):
            torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m, n=name, b=backend: f"{b} grad {n}: {m}")
    return out_ref


def _dense(q, k, v, allowed, scale, additive=None):
    """Explicit masked softmax from a dense (.., Lq, Lk) bool matrix: exp(logit) on allowed pairs, normalized."""
    logits = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    if additive is not None:
        logits = logits + additive
    e = (logits - logits.amax(-1, keepdim=True).clamp_min(-1e30)).exp() * allowed
    w = e / e.sum(-1, keepdim=True).clamp_min(1e-300)
    return torch.einsum("bhij,bhjd->bhid", w, v), w


# Separate q, k, v for every shape; the MSSA case q = k = v where Nq == Nk.
CASES = [(s, False) for s in SHAPES] + [(s, True) for s in SHAPES if s[2] == s[3]]


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize(
    ("shape", "shared"), CASES, ids=lambda c: "x".join(map(str, c)) if isinstance(c, tuple) else ("qkv", "w")[c]
)
def test_sdpa_matches_reference(dtype, shape, shared):
    inputs = _inputs(shape, dtype, shared)
    _assert_paths_agree(inputs, dtype, shared, scale=shape[-1] ** -0.5)


def test_reference_is_the_formula():
    q, k, v = _inputs((2, 2, 4, 6, 3), torch.float64, shared=False)
    out, w = attention_ref(q, k, v, scale=0.3, return_attn=True)
    logits = torch.einsum("bhip,bhjp->bhij", q, k) * 0.3
    expected_w = logits.exp() / logits.exp().sum(-1, keepdim=True)
    torch.testing.assert_close(w, expected_w)
    torch.testing.assert_close(out, torch.einsum("bhij,bhjp->bhip", expected_w, v))
    # default scale is 1/sqrt(D), as SDPA's
    torch.testing.assert_close(attention_ref(q, k, v), attention_ref(q, k, v, scale=3**-0.5))


# ---- mask forms -------------------------------------------------------------------------------------------------
def _allowed_causal(Lq, Lk):
    return torch.tensor([[j <= i + Lk - Lq for j in range(Lk)] for i in range(Lq)])


def _allowed_blocks(qb, kb, causal):
    return torch.tensor([[(b <= a) if causal else (b == a) for b in kb] for a in qb])


SEG = [2, 3, 1, 4]  # 10 tokens in four blocks (packed sequences / scales)
QB = [0, 0, 1, 1, 1, 2, 3, 3, 3, 3]


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize(
    "form",
    ["causal", "causal_cache", "bool_mask", "float_mask", "block_diag", "block_causal", "varlen_causal",
     "per_batch_blocks", "block_and_float", "block_cache"],
)  # fmt: skip
def test_mask_forms_match_dense_masked_softmax(dtype, form):
    B, H, L, D = 2, 3, 10, 8
    Lq = {"causal_cache": 4, "block_cache": 5}.get(form, L)
    q, k, v = _inputs((B, H, Lq, L, D), dtype, shared=False, seed=5)
    g = torch.Generator().manual_seed(7)
    scale = 0.37
    kw: dict = {"scale": scale}
    additive = None
    ids = block_ids_from_seqlens(SEG)
    assert ids.tolist() == QB
    if form in ("causal", "causal_cache"):
        kw["is_causal"] = True
        allowed = _allowed_causal(Lq, L)
    elif form == "bool_mask":
        m = torch.rand(B, 1, L, L, generator=g) > 0.4
        m[..., 0] = True  # every row keeps at least one key (fully masked rows: separate test)
        kw["attn_mask"] = m
        allowed = m
    elif form == "float_mask":
        additive = torch.randn(L, L, generator=g, dtype=dtype)
        kw["attn_mask"] = additive
        allowed = torch.ones(L, L, dtype=torch.bool)
    elif form in ("block_diag", "block_causal"):
        kw.update(block_ids=ids, block_causal=form == "block_causal")
        allowed = _allowed_blocks(QB, QB, causal=form == "block_causal")
    elif form == "varlen_causal":  # packed causal sequences: block-diagonal AND causal
        kw.update(block_ids=ids, is_causal=True)
        allowed = _allowed_blocks(QB, QB, causal=False) & _allowed_causal(L, L)
    elif form == "per_batch_blocks":
        ids2 = torch.stack([ids, block_ids_from_seqlens([5, 5])])
        kw.update(block_ids=ids2)
        allowed = torch.stack([_allowed_blocks(r.tolist(), r.tolist(), causal=False) for r in ids2])[:, None]
    elif form == "block_and_float":
        additive = torch.randn(1, H, L, L, generator=g, dtype=dtype)
        kw.update(block_ids=ids, block_causal=True, attn_mask=additive)
        allowed = _allowed_blocks(QB, QB, causal=True)
    else:  # block_cache: the last 5 tokens (blocks 2 and 3) attend block-causally to a cache of all 10
        kw.update(block_ids=ids[-Lq:], kv_block_ids=ids, block_causal=True)
        allowed = _allowed_blocks(QB[-Lq:], QB, causal=True)
    expected, w_expected = _dense(q, k, v, allowed, scale, additive)
    out, w = attention_ref(q, k, v, return_attn=True, **kw)
    torch.testing.assert_close(out, expected, **TOL[dtype])
    torch.testing.assert_close(w, w_expected, **TOL[dtype])
    assert torch.equal(w == 0, ~allowed.expand_as(w))  # masked pairs have weight exactly 0, allowed ones > 0
    _assert_paths_agree((q, k, v), dtype, **kw)


@pytest.mark.parametrize("backend", ["ref", "sdpa"])
def test_kv_cache_decode_equals_full_causal(backend):
    B, H, L, D = 2, 2, 9, 4
    q, k, v = _inputs((B, H, L, L, D), torch.float64, shared=False, seed=11)
    full = attention(q, k, v, is_causal=True, backend=backend)
    # One query at a time against a growing cache: query t sees keys 0..t.
    steps = [attention(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], is_causal=True, backend=backend)
             for t in range(L)]
    torch.testing.assert_close(torch.cat(steps, dim=2), full, **TOL[torch.float64])
    # A chunk of 3 queries against the cache of everything before it plus itself (prefill in pieces).
    chunk = attention(q[:, :, 4:7], k[:, :, :7], v[:, :, :7], is_causal=True, backend=backend)
    torch.testing.assert_close(chunk, full[:, :, 4:7], **TOL[torch.float64])
    # Block-causal (VAR): decoding scale by scale with a cache == the full block-causal pass.
    ids = block_ids_from_seqlens([1, 3, 5])
    full_b = attention(q, k, v, block_ids=ids, block_causal=True, backend=backend)
    ends = [1, 4, 9]
    pieces, start = [], 0
    for end in ends:
        pieces.append(attention(q[:, :, start:end], k[:, :, :end], v[:, :, :end], block_ids=ids[start:end],
                                kv_block_ids=ids[:end], block_causal=True, backend=backend))
        start = end
    torch.testing.assert_close(torch.cat(pieces, dim=2), full_b, **TOL[torch.float64])


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
def test_grouped_query_heads(dtype):
    q, k, v = _inputs((2, 6, 5, 7, 4), dtype, shared=False, kv_heads=2)
    out = _assert_paths_agree((q, k, v), dtype, is_causal=True)
    # query heads 0..2 use key head 0, 3..5 key head 1
    expect = attention_ref(q, k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1), is_causal=True)
    torch.testing.assert_close(out, expect, atol=0, rtol=0)


@pytest.mark.parametrize("backend", ["ref", "sdpa"])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_fully_masked_rows_are_zero_not_nan(backend, kind):
    q, k, v = (t.requires_grad_() for t in _inputs((1, 2, 4, 4, 3), torch.float64, shared=False))
    m = torch.ones(4, 4, dtype=torch.bool)
    m[2] = False  # query 2 may attend to nothing
    mask = m if kind == "bool" else torch.zeros(4, 4, dtype=torch.float64).masked_fill(~m, float("-inf"))
    out = attention(q, k, v, attn_mask=mask, backend=backend)
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    torch.testing.assert_close(out[:, :, [0, 1, 3]], attention_ref(q, k, v)[:, :, [0, 1, 3]])
    grads = torch.autograd.grad(out.sum(), [q, k, v])
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.equal(grads[0][:, :, 2], torch.zeros_like(grads[0][:, :, 2]))


def test_block_ids_helpers():
    assert block_ids_from_seqlens([2, 0, 3]).tolist() == [0, 0, 2, 2, 2]
    assert block_ids_from_cu_seqlens([0, 2, 2, 5]).tolist() == [0, 0, 2, 2, 2]
    with pytest.raises(ValueError, match=">= 0"):
        block_ids_from_seqlens([2, -1])
    with pytest.raises(ValueError, match="start at 0"):
        block_ids_from_cu_seqlens([1, 3])


def test_mask_argument_errors():
    q, k, v = _inputs((1, 2, 3, 5, 4), torch.float32, shared=False)
    with pytest.raises(ValueError, match="more queries"):
        attention(k, q, q, is_causal=True)  # 5 queries, 3 keys
    with pytest.raises(ValueError, match="kv_block_ids"):
        attention(q, k, v, block_ids=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"block_ids must have shape \(3,\)"):
        attention(q, k, v, block_ids=torch.zeros(4, dtype=torch.long), kv_block_ids=torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="needs block_ids"):
        attention(q, k, v, block_causal=True)
    with pytest.raises(ValueError, match="integer"):
        attention(q, k, v, block_ids=torch.zeros(3), kv_block_ids=torch.zeros(5))
    with pytest.raises(ValueError, match="bool .* or floating"):
        attention(q, k, v, attn_mask=torch.zeros(3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        attention(torch.randn(1, 3, 3, 4), k, v)
    with pytest.raises(ValueError, match=r"k must be a \(B, H, L, D\)"):
        attention(q, k[0], v)
    with pytest.raises(ValueError, match="head widths"):
        attention(q[..., :2], k, v)
    with pytest.raises(ValueError, match="cannot return attention weights"):
        attention_sdpa(q, k, v, return_attn=True)


# ---- dispatch -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_return_attn(backend):
    q, k, v = _inputs((2, 3, 5, 7, 4), torch.float32, shared=False)
    out, w = attention(q, k, v, scale=0.5, backend=backend, return_attn=True)
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
    attention(q, k, v, scale=1.0, backend="sdpa", is_causal=True)
    attention(q, k, v, scale=1.0, backend="ref")
    attention(q, k, v, scale=1.0, backend="auto", return_attn=True)  # weights force the reference path
    assert calls == ["sdpa", "sdpa"]


def test_bad_backend_is_an_error():
    q, k, v = _inputs((1, 1, 2, 2, 2), torch.float32, shared=False)
    with pytest.raises(ValueError, match="'flash'"):
        attention(q, k, v, scale=1.0, backend="flash")
