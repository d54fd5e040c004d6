"""mcr2_loss under DDP: 2 gloo processes, each holding half of the batch, give the single-process loss value and,
after DDP's gradient averaging, the single-process parameter gradients."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _dist import run_torchrun
from _mcr2_ddp_worker import features, global_problem

from ratelab.objectives import mcr2_loss, rate_reduction_ref

WORKER = Path(__file__).with_name("_mcr2_ddp_worker.py")


@pytest.mark.distributed
def test_mcr2_loss_ddp_matches_single_process(tmp_path):
    run_torchrun(WORKER, "--out", tmp_path, timeout=120)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert all(r["world"] == 2 for r in ranks)

    # One process holding the whole batch.
    X, y, lin = global_problem()
    Z = features(lin, X)
    Z.retain_grad()
    loss, stats = mcr2_loss(Z, y, 0.6, num_classes=5, gamma1=1.3, gamma2=0.9)
    loss.backward()
    dr_ref = rate_reduction_ref(Z.detach(), y, 0.6)[0]
    assert stats["delta_R"].item() == pytest.approx(dr_ref.item(), rel=1e-12)

    n = X.shape[0] // 2
    for r, out in enumerate(ranks):
        assert out["loss"].item() == pytest.approx(loss.item(), rel=1e-12)
        for k in ("R", "Rc", "delta_R"):
            assert out["stats"][k].item() == pytest.approx(stats[k].item(), rel=1e-12)
        # The gather's backward sums the two ranks' identical losses onto the local rows: 2 x the single rows ...
        assert torch.allclose(out["z_grad"], 2 * Z.grad[r * n : (r + 1) * n], rtol=1e-10, atol=1e-12)
        # ... and DDP's average over the 2 ranks turns that back into the single-process parameter gradient.
        for k, p in lin.named_parameters():
            assert torch.allclose(out["param_grads"][k], p.grad, rtol=1e-10, atol=1e-12), (r, k)
    assert lin.weight.grad.abs().max() > 1e-3  # a non-trivial gradient is being compared
