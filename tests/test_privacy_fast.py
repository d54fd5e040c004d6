"""The fast paths of the DP step against their reference twins, and the fp16 overflow rule.

* :func:`ratelab.privacy.noise.add_gaussian_` (noise added in place, chunk by chunk) == opacus' arithmetic
  (:func:`add_gaussian_ref`: one ``torch.normal`` draw, ``(S + N) / B``), bit for bit, leaving the generator in the same
  state; the optimizer built on it steps exactly as opacus' ``DPOptimizerFastGradientClipping``.
* fp16 loss scaling: an example whose per-sample norm is non-finite contributes zero, the clipped sum stays finite
  (so a GradScaler cannot skip a step because of the data) and equals the oracle's sum over the other examples.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ratelab.core.errors import TrainingDiverged
from ratelab.privacy import clipped_backward, clipped_gradient_sum_ref, make_per_sample_module
from ratelab.privacy.noise import add_gaussian_, add_gaussian_ref, make_dp_optimizer


@pytest.mark.parametrize("n", [16, 17, 31, 1000, 4096 + 5, 4096 + 16, 3 * 4096 + 15, 30522 * 3])
@pytest.mark.parametrize("chunk", [16, 48, 4096])
def test_in_place_noise_equals_one_torch_normal_draw(n, chunk):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    g_ref, g_fast = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    ref = add_gaussian_ref(x, 0.728, g_ref, 8)
    out = x.clone()
    assert add_gaussian_(out, 0.728, g_fast, 8, chunk=chunk) is out
    assert torch.equal(out, ref)
    assert torch.equal(g_ref.get_state(), g_fast.get_state())  # the same number of draws: one per entry
    with pytest.raises(ValueError, match="chunk: must be a positive multiple of 16"):
        add_gaussian_(out, 1.0, g_fast, 1, chunk=40)


def _two_optimizers(shapes, sigma=0.9, c=0.7, batch=12):
    from opacus.optimizers import DPOptimizerFastGradientClipping

    out = []
    for build in (DPOptimizerFastGradientClipping, make_dp_optimizer):
        params = [nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i))) for i, s in
                  enumerate(shapes)]
        gen = torch.Generator().manual_seed(3)
        opt = build(torch.optim.SGD(params, lr=0.5), noise_multiplier=sigma, max_grad_norm=c,
                    expected_batch_size=batch, loss_reduction="mean", generator=gen)
        out.append((params, opt, gen))
    return out


def test_in_place_noise_optimizer_steps_as_opacus():
    # A 2-D weight larger than one noise chunk, a vector, a scalar-sized and a non-contiguous gradient.
    shapes = [(700, 400), (30,), (1,), (5, 3)]
    runs = _two_optimizers(shapes)
    for step in range(3):
        for params, opt, _ in runs:
            opt.zero_grad(set_to_none=True)
            for i, p in enumerate(params):
                g = torch.randn(p.shape[::-1] if len(shapes[i]) == 2 and i == 3 else p.shape,
                                generator=torch.Generator().manual_seed(100 * step + i))
                p.grad = g.t() if i == 3 else g
            opt.step()
        (pa, _, ga), (pb, ob, gb) = runs
        for a, b in zip(pa, pb):
            assert torch.equal(a, b)
        assert torch.equal(ga.get_state(), gb.get_state())
    # the same gradient may not be noised twice (opacus' rule)
    with pytest.raises(ValueError, match="zero_grad"):
        ob.step()
    ob.zero_grad(set_to_none=False)  # zeroed in place: a fresh gradient again
    ob.step()


def test_skip_signals_take_opacus_path():
    # opacus' skip signals (accumulation over physical batches) go through opacus' own code: the same result.
    runs = _two_optimizers([(40, 30), (30,)])
    for params, opt, _ in runs:
        for micro in range(3):
            for i, p in enumerate(params):
                p.grad = torch.full(p.shape, float(micro + 1 + i))
            opt.signal_skip_step(do_skip=micro < 2)
            opt.step()
            opt.zero_grad(set_to_none=True)
    (pa, _, ga), (pb, _, gb) = runs
    for a, b in zip(pa, pb):
        assert torch.equal(a, b)
    assert torch.equal(ga.get_state(), gb.get_state())


class _Scaler:
    """Stand-in for torch.amp.GradScaler (no GPU here): clipped_backward only reads the scale."""

    def __init__(self, s: float) -> None:
        self.s = s

    def get_scale(self) -> float:
        return self.s


@pytest.mark.parametrize(("mode", "bad"), [("ghost", 1e20), ("ghost", float("inf")), ("hooks", float("inf"))])
def test_fp16_overflowing_example_contributes_zero(mode, bad):
    # Example 0's input is huge (ghost's Gram norm overflows float32; hooks' norm of the formed gradient does not)
    # or infinite (its gradient is inf / NaN: 0 * inf must not reach the sum). With a loss scaler the example is
    # dropped: the scaled clipped sum is finite and equals the oracle's over examples
    # 1..5, so the scaler's inf check (skip / back-off) cannot depend on it.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 16, generator=g), torch.randint(0, 3, (6,), generator=g)

    def loss_one(call, xi, yi):
        return F.cross_entropy(call(xi), yi)

    _, norms = clipped_gradient_sum_ref(model, loss_one, x, y, max_grad_norm=1.0)
    c = float(norms.median())
    ref, _ = clipped_gradient_sum_ref(model, loss_one, x[1:], y[1:], max_grad_norm=c)
    xo = x.clone()
    xo[0] = bad
    m = copy.deepcopy(model)
    private = make_per_sample_module(m, mode)
    clipped_backward(private, F.cross_entropy(private(xo), y, reduction="none"), max_grad_norm=c,
                     scaler=_Scaler(4.0))
    for name, p in m.named_parameters():
        assert torch.isfinite(p.grad).all(), name
        assert torch.allclose(p.grad / 4.0, ref[name], atol=1e-6, rtol=1e-4), name
    # without a scaler a non-finite norm is a diverged run, not a silently dropped example
    m = copy.deepcopy(model)
    private = make_per_sample_module(m, mode)
    with pytest.raises(TrainingDiverged, match="not finite"):
        clipped_backward(private, F.cross_entropy(private(xo), y, reduction="none"), max_grad_norm=c)
