"""Worker for tests/test_mcr2_ddp.py, launched by torchrun with 2 gloo processes.

Every rank builds the same float64 linear feature map and the same global batch, keeps its half of the rows, wraps
the map in DistributedDataParallel (which averages parameter gradients over ranks) and runs one backward of
``mcr2_loss(..., distributed=True)``. Results go to ``<out>/rank<r>.pt``.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from ratelab.core.dist import barrier, cleanup, init_distributed
from ratelab.objectives import mcr2_loss


def global_problem():
    """The shared problem: inputs X (16, 7), labels (classes 0..4; class 2 empty), a 7 -> 5 linear map."""
    g = torch.Generator().manual_seed(123)
    X = torch.randn(16, 7, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 3, 4, 0, 0, 1, 3, 4, 4, 1, 0, 3, 1, 0, 4])
    lin = torch.nn.Linear(7, 5, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(5, 7, generator=g, dtype=torch.float64))
        lin.bias.copy_(torch.randn(5, generator=g, dtype=torch.float64))
    return X, y, lin


def features(lin, X):
    return F.normalize(lin(X), dim=1)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    X, y, lin = global_problem()
    n = X.shape[0] // info.world_size
    rows = slice(info.rank * n, (info.rank + 1) * n)
    model = DistributedDataParallel(lin)
    Z = features(model, X[rows])
    Z.retain_grad()
    loss, stats = mcr2_loss(Z, y[rows], 0.6, num_classes=5, gamma1=1.3, gamma2=0.9, distributed=True)
    loss.backward()
    torch.save(
        {
            "world": info.world_size,
            "loss": loss.detach(),
            "stats": stats,
            "z_grad": Z.grad,
            "param_grads": {k: v.grad for k, v in lin.named_parameters()},
        },
        f"{args.out}/rank{info.rank}.pt",
    )
    barrier()  # every rank done before any tears the group down
    cleanup()
    return 0


if __name__ == "__main__":
    from ratelab.core.dist import exit_process

    exit_process(main())
