"""Independent CRATE written from the equations, with the module tree of the official code's state dict.

Used only by the converter tests: its ``state_dict()`` has exactly the keys of a checkpoint saved by
Ma-Lab-Berkeley/CRATE ``model/crate.py`` (``to_patch_embedding.{1,2,3}``, ``transformer.layers.{i}.{0,1}.norm``,
``...0.fn.qkv``, ``...0.fn.to_out.0``, ``...1.fn.weight``, ``mlp_head.{0,1}``, ``cls_token``, ``pos_embedding``), while
the computation is written out here from the design note's equations, on purpose in a different style from
ratelab's model (einsum attention with an explicit softmax, the three-product ISTA step, ``unfold`` patchify), so a
shared mistake is unlikely.

Layer on row tokens z (B, N, d):
    a = LN1(z);  w_k = a U_k^T;  A_k = softmax(w_k w_k^T / sqrt(p));  z_half = z + [A_k w_k]_k W_out^T + b_out
    b = LN2(z_half);  z_next = ReLU(b + eta (D^T b - D^T D b) - eta lambda)
"""

from __future__ import annotations

import torch
import torch.nn as nn


class _Patches(nn.Module):
    """(B, C, H, W) -> (B, h*w, p*p*C); within a patch the order is (row, column, channel)."""

    def __init__(self, p: int) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        t = x.unfold(2, self.p, self.p).unfold(3, self.p, self.p)  # (B, C, h, w, p_row, p_col)
        t = t.permute(0, 2, 3, 4, 5, 1)  # (B, h, w, p_row, p_col, C)
        return t.reshape(B, (H // self.p) * (W // self.p), self.p * self.p * C)


class _Normed(nn.Module):
    """``norm`` then ``fn``: the official PreNorm naming."""

    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


class _SubspaceAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.qkv = nn.Linear(dim, heads * dim_head, bias=False)
        identity = heads == 1 and dim_head == dim  # the official code drops the output map in this one case
        self.to_out = nn.Identity() if identity else nn.Sequential(nn.Linear(heads * dim_head, dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        w = self.qkv(x).view(B, N, self.heads, self.dim_head)  # (B, N, K, p)
        gram = torch.einsum("bikp,bjkp->bkij", w, w) / self.dim_head**0.5
        gram = gram - gram.amax(dim=-1, keepdim=True)
        e = gram.exp()
        attn = e / e.sum(dim=-1, keepdim=True)  # rows over keys sum to one
        out = torch.einsum("bkij,bjkp->bikp", attn, w).reshape(B, N, self.heads * self.dim_head)
        return self.to_out(out)


class _IstaStep(nn.Module):
    def __init__(self, dim: int, eta: float, lambd: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, dim))  # D; a row token b maps to b D^T = (D b)^T
        nn.init.kaiming_uniform_(self.weight)
        self.eta, self.lambd = eta, lambd

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        D = self.weight
        Db = b @ D.T
        DtDb = Db @ D
        Dtb = b @ D
        return torch.relu(b + self.eta * (Dtb - DtDb) - self.eta * self.lambd)


class _Stack(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, eta: float, lambd: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [_Normed(dim, _SubspaceAttention(dim, heads, dim_head)), _Normed(dim, _IstaStep(dim, eta, lambd))]
            )
            for _ in range(depth)
        )

    def forward(self, z: torch.Tensor, keep: list[torch.Tensor] | None = None) -> torch.Tensor:
        for attn, ista in self.layers:
            z = ista(z + attn(z))
            if keep is not None:
                keep.append(z)
        return z


class OfficialLayoutCrate(nn.Module):
    """CRATE classifier whose state dict uses the official key names. (B, C, H, W) -> (B, num_classes)."""

    def __init__(
        self,
        *,
        image_size: int,
        patch_size: int,
        num_classes: int,
        dim: int,
        depth: int,
        heads: int,
        dim_head: int,
        channels: int = 3,
        eta: float = 0.1,
        lambd: float = 0.1,
    ) -> None:
        super().__init__()
        n = (image_size // patch_size) ** 2
        patch_dim = channels * patch_size * patch_size
        self.to_patch_embedding = nn.Sequential(
            _Patches(patch_size), nn.LayerNorm(patch_dim), nn.Linear(patch_dim, dim), nn.LayerNorm(dim)
        )
        self.pos_embedding = nn.Parameter(torch.randn(1, n + 1, dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.transformer = _Stack(dim, depth, heads, dim_head, eta, lambd)
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def tokens(self, img: torch.Tensor, keep: list[torch.Tensor] | None = None) -> torch.Tensor:
        """(B, C, H, W) -> (B, N + 1, d) last-layer tokens ([CLS] first)."""
        t = self.to_patch_embedding(img)
        t = torch.cat([self.cls_token.expand(t.shape[0], 1, -1), t], dim=1) + self.pos_embedding
        return self.transformer(t, keep)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.mlp_head(self.tokens(img)[:, 0])
