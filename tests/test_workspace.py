"""core.workspace: scoped scratch buffers, and the no-grad SSD / Adventurer paths that use them."""

from __future__ import annotations

import contextlib
import threading

import torch

import ratelab
from ratelab.core.workspace import in_workspace, scratch, workspace
from ratelab.kernels.ssd import ssd_recompute, ssd_ref


def test_scratch_outside_a_scope_is_fresh_and_inside_is_reused():
    a, b = scratch("t", (4, 3), torch.float32, "cpu"), scratch("t", (4, 3), torch.float32, "cpu")
    assert a.data_ptr() != b.data_ptr() and not in_workspace()
    with workspace():
        a = scratch("t", (4, 3), torch.float32, "cpu")
        assert scratch("t", (4, 3), torch.float32, "cpu") is a
        assert scratch("u", (4, 3), torch.float32, "cpu") is not a  # one buffer per name
        assert scratch("t", (2, 6), torch.float32, "cpu").shape == (2, 6)  # another shape: replaced
        assert scratch("t", (2, 6), torch.float64, "cpu").dtype == torch.float64
        with workspace():  # nested: held until the outermost scope exits
            held = scratch("t", (5,), torch.float32, "cpu")
        assert in_workspace() and scratch("t", (5,), torch.float32, "cpu") is held
    assert not in_workspace()
    assert scratch("t", (5,), torch.float32, "cpu") is not held


def test_scope_is_per_thread():
    seen = {}
    with workspace():
        mine = scratch("t", (3,), torch.float32, "cpu")
        t = threading.Thread(target=lambda: seen.update(inside=in_workspace(),
                                                        other=scratch("t", (3,), torch.float32, "cpu")))
        t.start()
        t.join()
    assert seen["inside"] is False and seen["other"] is not mine


def _ssd_inputs(seed, length=64, b=2, h=4, p=8, n=8):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return dict(x=r(b, length, h, p), dt=r(b, length, h), A=-torch.rand(h, generator=g, dtype=torch.float64) - 0.2,
                B=r(b, length, 1, n), C=r(b, length, 1, n), D=r(h), initial_state=r(b, h, p, n))


def test_ssd_results_do_not_alias_the_scratch_buffers():
    # the no-grad forward keeps its chunk tensors and states in scratch buffers inside a scope; what it returns (y
    # and the final state) must survive the next call of the same shapes (two equal segments: one T buffer)
    i1, i2 = _ssd_inputs(0), _ssd_inputs(1)
    y1_r, s1_r = ssd_ref(**i1, dt_softplus=True, return_final_state=True)
    with torch.no_grad(), workspace():
        y1, s1 = ssd_recompute(**i1, dt_softplus=True, chunk_size=16, segment_chunks=2, return_final_state=True)
        y2, s2 = ssd_recompute(**i2, dt_softplus=True, chunk_size=16, segment_chunks=2, return_final_state=True)
    torch.testing.assert_close(y1, y1_r)
    torch.testing.assert_close(s1, s1_r)
    y2_r, s2_r = ssd_ref(**i2, dt_softplus=True, return_final_state=True)
    torch.testing.assert_close(y2, y2_r)
    torch.testing.assert_close(s2, s2_r)


def test_adventurer_no_grad_forward_opens_a_scope_and_matches_the_plain_forward(monkeypatch):
    torch.manual_seed(0)
    model = ratelab.create_model("test_adventurer", img_size=16, in_chans=1, num_classes=3).eval()
    x = torch.randn(3, 1, 16, 16)
    seen = []
    orig = model.blocks[0].forward
    monkeypatch.setattr(model.blocks[0], "forward", lambda h, **kw: seen.append(in_workspace()) or orig(h, **kw))
    with torch.no_grad():
        out = model(x)
        feats = model.forward_intermediates(x, intermediates_only=True)
    assert seen == [True, True]
    monkeypatch.setattr(type(model), "_scope", lambda self: contextlib.nullcontext())  # the same, fresh buffers
    with torch.no_grad():
        torch.testing.assert_close(model(x), out, rtol=0, atol=0)
        for a, b in zip(model.forward_intermediates(x, intermediates_only=True), feats, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    seen.clear()
    model(x)  # with autograd: no scope
    assert seen == [False]
