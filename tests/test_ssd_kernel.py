"""SSD (Mamba-2) kernel: the chunked path, its recomputing-backward twin and the one-token step against the
sequential reference."""

from __future__ import annotations

import functools
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from ratelab.kernels.ssd import BACKENDS, resolve_backend, ssd, ssd_chunked, ssd_recompute, ssd_ref, ssd_step

# Tolerances, defined once. fp64 differences are pure rounding (~1e-14); fp32 ones grow with the length of the sums
# (the chunked path sums in another order and factors the decays differently).
TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-9),
    torch.float32: dict(atol=2e-4, rtol=2e-4),
}

# (length, chunk_size, groups): a multiple of the chunk, not a multiple, shorter than a chunk, a single token.
CASES = [(16, 4, 1), (13, 4, 2), (3, 8, 1), (1, 4, 2), (21, 8, 4)]
BATCH, HEADS, HEADDIM, DSTATE = 2, 4, 3, 5


def _inputs(length, groups, dtype, *, d_per_channel=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, h, p, n = BATCH, HEADS, HEADDIM, DSTATE

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    return dict(
        x=r(b, length, h, p),
        dt=r(b, length, h),
        A=(-torch.rand(h, generator=g, dtype=torch.float64) * 3 - 0.2).to(dtype),
        B=r(b, length, groups, n),
        C=r(b, length, groups, n),
        D=r(h, p) if d_per_channel else r(h),
        dt_bias=r(h, scale=0.5),
        initial_state=r(b, h, p, n),
    )


def _value_and_grads(fn, inputs, cot_dtype=None, softplus=True, **kw):
    """Outputs and the gradients of a random projection of them; ``cot_dtype``: draw the projection in this dtype
    (then cast), so that an fp64 run can share an fp32 run's cotangents."""
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    y, final = fn(**leaves, dt_softplus=softplus, return_final_state=True, **kw)
    g = torch.Generator().manual_seed(1)
    cd = cot_dtype or y.dtype
    loss = (y * torch.randn(y.shape, generator=g, dtype=cd).to(y.dtype)).sum()
    loss = loss + (final * torch.randn(final.shape, generator=g, dtype=cd).to(final.dtype)).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return y.detach(), final.detach(), dict(zip(leaves, grads))


# the fast paths: op-by-op autograd, and the hand-written recomputing backward with one segment per chunk (every
# chunk boundary is a segment boundary: the entering-state gradient is handed across all of them) and with one
# segment for the whole sequence; the same kernel through its custom ops (what torch.compile captures), eager
FAST = {
    "chunked": ssd_chunked,
    "recompute_seg1": functools.partial(ssd_recompute, segment_chunks=1),
    "recompute": ssd_recompute,
    "scan_op_seg1": functools.partial(ssd_recompute, segment_chunks=1, custom_op=True),
    "scan_op": functools.partial(ssd_recompute, custom_op=True),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("length,chunk,groups", CASES)
@pytest.mark.parametrize("fast", list(FAST))
def test_chunked_matches_reference_values_and_grads(length, chunk, groups, dtype, fast):
    inputs = _inputs(length, groups, dtype, d_per_channel=(groups == 2))
    y_r, s_r, g_r = _value_and_grads(ssd_ref, inputs)
    y_c, s_c, g_c = _value_and_grads(FAST[fast], inputs, chunk_size=chunk)
    tol = TOL[dtype]
    assert y_c.dtype == dtype and y_c.shape == inputs["x"].shape
    torch.testing.assert_close(y_c, y_r, **tol)
    torch.testing.assert_close(s_c, s_r, **tol)
    assert set(g_c) == {"x", "dt", "A", "B", "C", "D", "dt_bias", "initial_state"}
    for k in g_r:
        assert g_r[k].abs().max() > 0, k  # every input must actually influence the loss
        torch.testing.assert_close(g_c[k], g_r[k], **tol, msg=lambda m, k=k: f"grad of {k}: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("length,chunk,groups", CASES)
def test_chunked_inference_path_matches_reference(length, chunk, groups, dtype):
    # without autograd the chunked kernel runs its in-place variant: it must give the same values and final state
    inputs = _inputs(length, groups, dtype, d_per_channel=(groups == 2))
    kw = dict(dt_softplus=True, return_final_state=True)
    y_r, s_r = ssd_ref(**inputs, **kw)
    with torch.no_grad():
        y_c, s_c = ssd_chunked(**inputs, chunk_size=chunk, **kw)
    torch.testing.assert_close(y_c, y_r, **TOL[dtype])
    torch.testing.assert_close(s_c, s_r, **TOL[dtype])


@pytest.mark.parametrize("fast", list(FAST))
def test_chunked_fp32_with_underflowing_decays(fast):
    # decays far below fp32's smallest normal inside and across chunks (the exponent floor is active)
    inputs = _inputs(40, 1, torch.float32)
    inputs["A"] = torch.tensor([-400.0, -60.0, -3.0, -1e-3])
    y_r, s_r, g_r = _value_and_grads(ssd_ref, inputs)
    y_c, s_c, g_c = _value_and_grads(FAST[fast], inputs, chunk_size=8)
    with torch.no_grad():
        y_n = ssd_chunked(**inputs, chunk_size=8, dt_softplus=True)
    for got in (y_c, y_n):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, y_r, **TOL[torch.float32])
    torch.testing.assert_close(s_c, s_r, **TOL[torch.float32])
    for k in g_r:
        torch.testing.assert_close(g_c[k], g_r[k], **TOL[torch.float32], msg=lambda m, k=k: f"grad of {k}: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("length,chunk,groups", CASES)
def test_recompute_inference_path_matches_reference(length, chunk, groups, dtype):
    # without autograd ssd_recompute (what auto runs) takes its own segment-by-segment forward, not ssd_chunked's
    inputs = _inputs(length, groups, dtype, d_per_channel=(groups == 2))
    kw = dict(dt_softplus=True, return_final_state=True)
    y_r, s_r = ssd_ref(**inputs, **kw)
    with torch.no_grad():
        for segments in (1, 8):
            y_c, s_c = ssd_recompute(**inputs, chunk_size=chunk, segment_chunks=segments, **kw)
            torch.testing.assert_close(y_c, y_r, **TOL[dtype])
            torch.testing.assert_close(s_c, s_r, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("length,chunk,groups,segments", [(97, 32, 2, 2), (130, 64, 1, 1)])
@pytest.mark.parametrize("init", [True, False])
def test_recompute_inference_path_mixes_outer_product_and_exact_blocks(length, chunk, groups, segments, init, dtype):
    # without autograd the forward reads narrow-span decay blocks out as r o (CB (k o x)) and the wide ones (A = -40
    # here) exactly, head by head within a chunk, and carries the states scaled per block (unscaled on wide ones);
    # padded last chunk, several segments, with and without the final state, an initial state entering wide and
    # narrow heads alike
    inputs = _inputs(length, groups, dtype)
    inputs["A"] = torch.tensor([-40.0, -8.0, -1.0, -1e-3], dtype=dtype)
    if not init:
        del inputs["initial_state"]
    y_r, s_r = ssd_ref(**{k: v.double() for k, v in inputs.items()}, dt_softplus=True, return_final_state=True)
    with torch.no_grad():
        y_c = ssd_recompute(**inputs, dt_softplus=True, chunk_size=chunk, segment_chunks=segments)
        y_f, s_f = ssd_recompute(**inputs, dt_softplus=True, chunk_size=chunk, segment_chunks=segments,
                                 return_final_state=True)
    torch.testing.assert_close(y_c.double(), y_r, **TOL[dtype])
    torch.testing.assert_close(y_f.double(), y_r, **TOL[dtype])
    torch.testing.assert_close(s_f.double(), s_r, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("length", [1, 16, 17, 53])
@pytest.mark.parametrize("groups", [1, 2])
def test_recompute_inference_path_without_initial_state(length, groups, dtype):
    # the no-grad forward's in-place chunk recurrence and shifted-C read-out: no entering state (chunk 0 reads
    # nothing), one chunk, exactly one chunk, one row past it, a padded last chunk; final state at 1 and 3 segments
    inputs = _inputs(length, groups, dtype)
    del inputs["initial_state"]
    kw = dict(dt_softplus=True, return_final_state=True)
    y_r, s_r = ssd_ref(**inputs, **kw)
    with torch.no_grad():
        for segments in (1, 3):
            y_c, s_c = ssd_recompute(**inputs, chunk_size=16, segment_chunks=segments, **kw)
            torch.testing.assert_close(y_c, y_r, **TOL[dtype])
            torch.testing.assert_close(s_c, s_r, **TOL[dtype])


# longer sequences: several segments of several chunks, a padded last chunk, per-channel D, groups, chunk sizes of
# the CPU default; decay rates from ones whose chunk blocks span far beyond the outer-product limit to ones that do not
LONG = [(130, 64, 1, 1), (300, 16, 2, 3), (97, 32, 4, 2)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("length,chunk,groups,segments", LONG)
def test_recompute_long_sequences_match_reference(length, chunk, groups, segments, dtype):
    # fp32 is held against the fp64 reference on the same (fp32-rounded) inputs and cotangents: over hundreds of
    # tokens with A = -40 two fp32 computations differ from each other by more than either does from the truth
    inputs = _inputs(length, groups, dtype, d_per_channel=True)
    inputs["A"] = torch.tensor([-40.0, -8.0, -1.0, -1e-3], dtype=dtype)
    fn = functools.partial(ssd_recompute, segment_chunks=segments)
    y_r, s_r, g_r = _value_and_grads(ssd_ref, {k: v.double() for k, v in inputs.items()}, cot_dtype=dtype)
    y_c, s_c, g_c = _value_and_grads(fn, inputs, chunk_size=chunk)
    tol = TOL[dtype]
    assert y_c.dtype == dtype
    torch.testing.assert_close(y_c.double(), y_r, **tol)
    torch.testing.assert_close(s_c.double(), s_r, **tol)
    for k in g_r:
        torch.testing.assert_close(g_c[k].double(), g_r[k], **tol, msg=lambda m, k=k: f"grad of {k}: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("groups,d_per_channel,segments", [(1, False, 1), (2, True, 8), (1, False, 8)])
def test_recompute_with_zero_and_tiny_steps(groups, d_per_channel, segments, dtype):
    # the backward divides two of its sums by dt; steps of exactly 0 and below sqrt(tiny), and negative ones (no
    # softplus: the default dt_limit does not clamp), take its direct path
    inputs = _inputs(29, groups, dtype, d_per_channel=d_per_channel)
    dt = (F.softplus(inputs["dt"]) * 0.3).to(dtype)
    dt[0, 3, 1] = 0.0
    dt[1, 10, :] = 0.0
    dt[0, 17, 2] = 1e-30
    dt[1, 20, 0] = -0.05
    inputs["dt"] = dt
    del inputs["dt_bias"]
    fn = functools.partial(ssd_recompute, segment_chunks=segments)
    y_r, s_r, g_r = _value_and_grads(ssd_ref, inputs, softplus=False)
    y_c, s_c, g_c = _value_and_grads(fn, inputs, softplus=False, chunk_size=4)
    tol = TOL[dtype]
    torch.testing.assert_close(y_c, y_r, **tol)
    torch.testing.assert_close(s_c, s_r, **tol)
    assert g_r["dt"][1, 10].abs().max() > 0  # a zero step still has a gradient
    for k in g_r:
        torch.testing.assert_close(g_c[k], g_r[k], **tol, msg=lambda m, k=k: f"grad of {k}: {m}")


def test_decay_blocks_outer_product_equals_difference_form():
    from ratelab.kernels.ssd import recompute as rc

    g = torch.Generator().manual_seed(3)
    q = 16
    tril = torch.ones(q, q, dtype=torch.float64).tril_()
    floor = float(math.ceil(math.log(torch.finfo(torch.float64).tiny)))
    rate = torch.tensor([0.01, 0.5, 3.0, 10.0, 400.0], dtype=torch.float64)[:, None]  # spans ~0.1 to ~4000
    s = -(torch.rand(5, q, generator=g, dtype=torch.float64) * rate).cumsum(-1)
    s[0, 3] = s[0, 2] + 0.5  # a non-monotone block (negative dt without softplus)
    exact = rc._exact_decay(s, tril, floor)
    blocks = rc._decay_blocks(s, tril, floor)
    span = s.amax(-1) - s.amin(-1)
    assert (span <= rc.FACTOR_SPAN).any() and (span > rc.FACTOR_SPAN).any()  # both forms are exercised
    torch.testing.assert_close(blocks, exact, rtol=1e-12, atol=0)
    assert (blocks.triu(1) == 0).all() and (exact[-1] == 0).any()  # zero above the diagonal; deep decays are 0
    s[1, 5] = float("nan")
    assert rc._decay_blocks(s, tril, floor)[1].isnan().any()  # a NaN reaches the result, it is not masked


def test_dispatch_backends_agree():
    inputs = _inputs(11, 2, torch.float64)
    ref = ssd(**inputs, backend="ref", dt_softplus=True)
    for backend in ("auto", "chunked", "recompute"):
        torch.testing.assert_close(ssd(**inputs, backend=backend, dt_softplus=True, chunk_size=4), ref,
                                   **TOL[torch.float64])
    assert resolve_backend("auto", inputs["x"]) == "recompute"  # CPU (and under torch.compile: test_compile.py)
    with pytest.raises(ValueError, match="backend"):
        ssd(**inputs, backend="triton")
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    with pytest.raises(ValueError, match="segment_chunks"):
        ssd_recompute(**leaves, segment_chunks=0)
    assert set(BACKENDS) == {"auto", "chunked", "recompute", "compiled", "ref", "cuda"}


def _saved_bytes(fn, inputs, **kw) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of one call."""
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(**leaves, dt_softplus=True, **kw)
    return sum(seen.values())


def test_recompute_keeps_only_the_inputs_and_segment_states():
    inputs = _inputs(256, 1, torch.float32)
    inputs["x"] = inputs["x"].repeat(1, 1, 1, 8)  # headdim 24, d_state 5: chunk tensors outweigh the inputs
    inputs["initial_state"] = inputs["initial_state"].repeat(1, 1, 8, 1)
    in_bytes = sum(v.nbytes for v in inputs.values())
    chunked = _saved_bytes(ssd_chunked, inputs, chunk_size=16)
    rec = _saved_bytes(ssd_recompute, inputs, chunk_size=16, segment_chunks=4)
    n_seg, state = 4, inputs["initial_state"].nbytes
    # the clones of the inputs, the prepared dt (one more dt) and the states entering segments 2..4
    assert rec <= in_bytes + inputs["dt"].nbytes + (n_seg - 1) * state
    assert chunked > 3 * rec


def test_chunked_is_exact_with_long_decays():
    # strongly decaying heads over many chunks: a naive exp(cumsum) factorization would over/underflow here
    inputs = _inputs(200, 1, torch.float64)
    inputs["A"] = torch.tensor([-50.0, -8.0, -1.0, -1e-3], dtype=torch.float64)
    kw = dict(dt_softplus=True, return_final_state=True)
    y_r, s_r = ssd_ref(**inputs, **kw)
    for q in (16, 64):
        y_c, s_c = ssd_chunked(**inputs, chunk_size=q, **kw)
        assert torch.isfinite(y_c).all()
        torch.testing.assert_close(y_c, y_r, **TOL[torch.float64])
        torch.testing.assert_close(s_c, s_r, **TOL[torch.float64])


@pytest.mark.parametrize("groups", [1, 2])
def test_step_over_sequence_equals_full_pass(groups):
    inputs = _inputs(9, groups, torch.float64, d_per_channel=(groups == 1))
    kw = dict(dt_bias=inputs["dt_bias"], dt_softplus=True, dt_limit=(0.05, 2.0))
    y_full, s_full = ssd_chunked(**inputs | kw, chunk_size=4, return_final_state=True)
    state, ys = inputs["initial_state"], []
    for t in range(inputs["x"].shape[1]):
        y_t, state = ssd_step(state, inputs["x"][:, t], inputs["dt"][:, t], inputs["A"], inputs["B"][:, t],
                              inputs["C"][:, t], inputs["D"], **kw)
        ys.append(y_t)
    torch.testing.assert_close(torch.stack(ys, 1), y_full, **TOL[torch.float64])
    torch.testing.assert_close(state, s_full, **TOL[torch.float64])


@pytest.mark.parametrize("backend,chunk", [("chunked", 4), ("chunked", 64), ("recompute", 4), ("ref", 64)])
def test_state_carry_across_halves_equals_one_pass(backend, chunk):
    inputs = _inputs(15, 2, torch.float64)
    kw = dict(dt_softplus=True, return_final_state=True, backend=backend, chunk_size=chunk)
    y_one, s_one = ssd(**inputs, **kw)
    first = {k: (v[:, :7] if k in ("x", "dt", "B", "C") else v) for k, v in inputs.items()}
    second = {k: (v[:, 7:] if k in ("x", "dt", "B", "C") else v) for k, v in inputs.items()}
    y1, s1 = ssd(**first, **kw)
    y2, s2 = ssd(**second | {"initial_state": s1}, **kw)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_one, **TOL[torch.float64])
    torch.testing.assert_close(s2, s_one, **TOL[torch.float64])


@pytest.mark.parametrize("backend", ["chunked", "ref"])
def test_dt_preprocessing_semantics(backend):
    inputs = _inputs(10, 1, torch.float64)
    raw, bias = inputs.pop("dt"), inputs.pop("dt_bias")
    plain = dict(backend=backend, chunk_size=4)

    def run(dt, **kw):
        return ssd(dt=dt, **inputs, **plain, **kw)

    # bias added before softplus, then clamp
    torch.testing.assert_close(run(raw, dt_bias=bias, dt_softplus=True), run(F.softplus(raw + bias)))
    lim = (0.3, 0.9)
    torch.testing.assert_close(run(raw, dt_bias=bias, dt_softplus=True, dt_limit=lim),
                               run(F.softplus(raw + bias).clamp(*lim)))
    # the default limit (0, inf) does not clamp (mamba_ssm behaviour): a negative raw dt passes through
    y_neg = run(raw.clamp(max=-0.01) * 0.1)
    y_zero = run(torch.zeros_like(raw))
    assert not torch.allclose(y_neg, y_zero)
    torch.testing.assert_close(run(raw, dt_limit=(0.0, 0.5)), run(raw.clamp(0.0, 0.5)))
    with pytest.raises(ValueError, match="dt_limit"):
        run(raw, dt_limit=(1.0, 0.5))


def test_half_inputs_are_computed_in_fp32():
    inputs = _inputs(20, 1, torch.float64)
    ref = ssd_ref(**inputs, dt_softplus=True)
    half = {k: v.to(torch.bfloat16) for k, v in inputs.items()}
    y, s = ssd_chunked(**half, dt_softplus=True, chunk_size=8, return_final_state=True)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    back = ssd_ref(**{k: v.double() for k, v in half.items()}, dt_softplus=True)  # same rounded inputs in fp64
    torch.testing.assert_close(y.double(), back, atol=0.05, rtol=0.02)
    assert (y.double() - ref).abs().max() < 0.5  # and still near the unrounded result


def test_empty_sequence():
    inputs = _inputs(0, 1, torch.float64)
    y, s = ssd_chunked(**inputs, return_final_state=True)
    assert y.shape == inputs["x"].shape
    torch.testing.assert_close(s, inputs["initial_state"])
    y_r, s_r = ssd_ref(**inputs, return_final_state=True)
    torch.testing.assert_close(s_r, inputs["initial_state"])


def test_cuda_backend_without_cuda_raises_clearly():
    inputs = _inputs(5, 1, torch.float32)
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        ssd(**inputs, backend="cuda")


def test_cuda_backend_without_mamba_ssm_raises_clearly(monkeypatch):
    import ratelab.kernels.ssd.cuda as cuda_mod

    monkeypatch.setattr(cuda_mod, "mamba_ssm_installed", lambda: False)
    x = torch.zeros(1, 2, 2, 2)

    class _FakeCuda(torch.Tensor):  # pretend the tensor lives on CUDA so the package check is reached
        @property
        def is_cuda(self):
            return True

    with pytest.raises(RuntimeError, match="mamba-ssm"):
        cuda_mod.ssd_cuda(x.as_subclass(_FakeCuda), torch.zeros(1, 2, 2), -torch.ones(2), torch.zeros(1, 2, 1, 3),
                          torch.zeros(1, 2, 1, 3))


BAD = [
    ("x", lambda i: i["x"][..., 0], "x"),
    ("dt", lambda i: i["dt"][:, :-1], "dt"),
    ("A", lambda i: i["A"][:-1], "A"),
    ("A", lambda i: i["A"][:, None], "A"),
    ("B", lambda i: i["B"][:, :-1], "B"),
    ("B", lambda i: torch.zeros(BATCH, 4, 3, DSTATE), "multiple"),  # 4 heads, 3 groups
    ("C", lambda i: i["C"][..., :-1], "C"),
    ("D", lambda i: torch.zeros(HEADS + 1), "D"),
    ("dt_bias", lambda i: torch.zeros(HEADS, 1), "dt_bias"),
    ("initial_state", lambda i: i["initial_state"][..., :-1], "initial_state"),
]


@pytest.mark.parametrize("backend", ["chunked", "recompute", "ref"])
@pytest.mark.parametrize("arg,make,match", BAD)
def test_bad_shapes_name_the_argument(arg, make, match, backend):
    inputs = _inputs(4, 1, torch.float32)
    inputs[arg] = make(inputs)
    if arg == "B":
        inputs["C"] = inputs["B"].clone()
    if backend == "recompute":  # its autograd path checks the shapes itself (without grad it is ssd_chunked)
        inputs = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    with pytest.raises(ValueError, match=match):
        ssd(**inputs, backend=backend)


def test_step_bad_shapes_and_chunk_size():
    i = _inputs(1, 1, torch.float32)
    with pytest.raises(ValueError, match="state"):
        ssd_step(i["initial_state"][:, :, :1], i["x"][:, 0], i["dt"][:, 0], i["A"], i["B"][:, 0], i["C"][:, 0])
    with pytest.raises(ValueError, match="x"):
        ssd_step(i["initial_state"], i["x"], i["dt"][:, 0], i["A"], i["B"][:, 0], i["C"][:, 0])
    with pytest.raises(ValueError, match="chunk_size"):
        ssd_chunked(i["x"], i["dt"], i["A"], i["B"], i["C"], chunk_size=0)


def test_import_is_quiet_and_lazy():
    code = (
        "import sys, warnings; warnings.simplefilter('error'); import ratelab.kernels.ssd; "
        "assert 'mamba_ssm' not in sys.modules and 'triton' not in sys.modules, 'heavy import at package import'"
    )
    subprocess.run([sys.executable, "-W", "error", "-c", code], check=True)


def test_reference_matches_mambapy_pscan():
    """An independent scan (mambapy's Blelloch pscan) on the per-(head, channel) recurrence."""
    pscan = pytest.importorskip("mambapy.pscan", reason="optional cross-check: pip install mambapy").pscan
    inputs = _inputs(12, 2, torch.float64)
    inputs["initial_state"] = None
    y_r = ssd_ref(**inputs, dt_softplus=True)
    dt = F.softplus(inputs["dt"] + inputs["dt_bias"])  # (b, l, h)
    b, length, h, p = inputs["x"].shape
    Bh = inputs["B"].repeat_interleave(h // 2, dim=2)
    Ch = inputs["C"].repeat_interleave(h // 2, dim=2)
    decay = torch.exp(dt * inputs["A"])[..., None, None].expand(b, length, h, p, DSTATE)
    drive = (dt[..., None] * inputs["x"])[..., None] * Bh[:, :, :, None, :]
    states = pscan(decay.reshape(b, length, h * p, DSTATE), drive.reshape(b, length, h * p, DSTATE))
    y = (states.view(b, length, h, p, DSTATE) * Ch[:, :, :, None, :]).sum(-1) + inputs["x"] * inputs["D"][:, None]
    torch.testing.assert_close(y_r, y, **TOL[torch.float64])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (GPU tier)")
class TestCuda:
    def test_chunked_on_cuda_matches_reference(self):
        inputs = {k: v.cuda() for k, v in _inputs(37, 2, torch.float64).items()}
        y_r, s_r, g_r = _value_and_grads(ssd_ref, inputs)
        y_c, s_c, g_c = _value_and_grads(ssd_chunked, inputs, chunk_size=16)
        torch.testing.assert_close(y_c, y_r, **TOL[torch.float64])
        torch.testing.assert_close(s_c, s_r, **TOL[torch.float64])
        for k in g_r:
            torch.testing.assert_close(g_c[k], g_r[k], **TOL[torch.float64])

    def test_fused_kernel_matches_chunked(self):
        pytest.importorskip("mamba_ssm", reason="optional fused kernel: pip install mamba-ssm")
        torch.backends.cuda.matmul.allow_tf32 = False
        inputs = {k: v.cuda() for k, v in _inputs(300, 2, torch.float32).items()}
        inputs["x"] = inputs["x"].repeat(1, 1, 1, 8)  # headdim 24
        inputs["initial_state"] = inputs["initial_state"].repeat(1, 1, 8, 1)
        assert resolve_backend("auto", inputs["x"]) == "cuda"
        y_c, s_c, g_c = _value_and_grads(ssd_chunked, inputs, chunk_size=64)
        y_k, s_k, g_k = _value_and_grads(ssd, inputs, chunk_size=64, backend="cuda")
        torch.testing.assert_close(y_k, y_c, atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(s_k, s_c, atol=2e-3, rtol=2e-3)
        for k in g_c:
            torch.testing.assert_close(g_k[k], g_c[k], atol=5e-3, rtol=5e-3)


BENCH = __import__("pathlib").Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture()
def ssd_bench(monkeypatch):
    import importlib

    monkeypatch.syspath_prepend(str(BENCH))  # the script imports its sibling _machine
    mod = importlib.import_module("ssd_speed")
    yield mod
    sys.modules.pop("ssd_speed", None)


def test_speed_benchmark_smoke(ssd_bench, tmp_path, capsys):
    import json

    rc = ssd_bench.main(["--smoke", "--threads", "1", "--no-memory", "--no-pscan", "--json", str(tmp_path / "s.json")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| L | pass | recompute ms, 1 thr | chunked / recompute, 1 thr | ref / recompute, 1 thr |" in out
    rec = json.loads((tmp_path / "s.json").read_text())
    assert set(rec["runs"]["1"]) == {"40", "100"}
    assert set(rec["runs"]["1"]["100"]["fwd+bwd"]["summary_s"]) == {"recompute", "chunked", "ref"}
    assert all(err < 1e-4 for c in rec["checks"].values() for err in c.values())


@pytest.mark.slow  # two fresh interpreters
def test_speed_benchmark_memory_probe_sees_the_saved_chunk_tensors(ssd_bench):
    """The peak-memory probe of one forward + backward (fresh subprocess): at Adventurer-T's head shapes and L=1024
    the op-by-op chunked path holds its chunk tensors (about 20 MiB), the recomputing one does not."""
    ns = ssd_bench.argparse.Namespace(threads=[1], batch_size=1, heads=8, headdim=64, d_state=64, groups=1, chunk=64,
                                      seed=0, memory_timeout=120.0)
    chunked = ssd_bench.measure_memory("chunked", 1024, ns)
    rec = ssd_bench.measure_memory("recompute", 1024, ns)
    assert chunked > rec + 8 and rec > 1  # the input gradients (about 2.6 MiB) at least
