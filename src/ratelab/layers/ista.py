"""One non-negative ISTA step against a square dictionary: the sparsification step of CRATE (and of the CRATE-MAE
encoder, with another lambda). timm has no such layer; this is ratelab's own.

Papers: Yu et al., NeurIPS 2023 (arXiv 2306.01129) and arXiv 2311.13110. The fast forms compute the same step with
fewer products than the paper's equation (other rounding); :meth:`ISTA.forward_ref` keeps the equation.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ISTA"]


class ISTA(nn.Module):
    """One non-negative ISTA step against a square dictionary D (d x d). (B, N, d) -> (B, N, d).

    ``weight`` holds D in ``F.linear`` orientation, so ``F.linear(x, D)`` is D x for each token row x (this is also
    the official layout, no transpose on conversion).

    Args:
        dim: token width d.
        step: step size eta.
        lambd: sparsity penalty lambda.

    Attributes:
        fused: fast forms (default) or the three-product reference.
    """

    def __init__(self, dim: int, *, step: float = 0.1, lambd: float = 0.1) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, dim))
        self.step = step
        self.lambd = lambd
        self.fused = True
        nn.init.kaiming_uniform_(self.weight)  # official init: PyTorch defaults (a=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fused:
            return self.forward_ref(x)
        d = self.weight.shape[0]
        # Folding costs O(d^3) once per call and saves one (tokens x d x d) product, forward and backward: it pays
        # once there are more tokens than channels (any training batch); tiny batches keep the two-product form.
        if x.numel() >= d * d:
            return self.forward_folded(x)
        return self.forward_two_matmul(x)

    def forward_two_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """b + eta D^T (b - D b): residual b - Db first, then one product with D^T (row form: r @ D)."""
        r = x - F.linear(x, self.weight)
        return F.relu(x + self.step * torch.matmul(r, self.weight) - self.step * self.lambd)

    def forward_folded(self, x: torch.Tensor) -> torch.Tensor:
        """ReLU(b + eta (D^T - D^T D) b - eta lambda) with the d x d operator formed first: one product per token.

        Row form: x + x M with M = eta (D - D^T D) (the transpose of eta (D^T - D^T D), since D^T D is symmetric).
        ``addmm`` adds the identity term inside the GEMM, so it is not rounded into M.
        """
        W = self.weight
        M = torch.addmm(W, W.t(), W, beta=self.step, alpha=-self.step)  # eta W - eta W^T W
        x2 = x.reshape(-1, x.shape[-1])
        y = torch.addmm(x2, x2, M).sub_(self.step * self.lambd)
        # ReLU after the reshape: the output is a fresh tensor, not a view (FSDP2 warns on blocks returning views).
        return F.relu(y.view(x.shape))

    def forward_ref(self, x: torch.Tensor) -> torch.Tensor:
        """Three-matmul form, as in the paper's equation: b + eta (D^T b - D^T D b) - eta lambda."""
        Db = F.linear(x, self.weight)
        DtDb = F.linear(Db, self.weight.t())
        Dtb = F.linear(x, self.weight.t())
        return F.relu(x + self.step * (Dtb - DtDb) - self.step * self.lambd)
