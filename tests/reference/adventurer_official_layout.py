"""Independent Adventurer written from the equations, with the module tree of the official state dict.

Used only by the converter tests: its ``state_dict()`` has exactly the keys of wangf3014/Adventurer
``models_mamba.py`` (``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``layers.{i}.norm``,
``layers.{i}.mixer.{in_proj,conv1d,dt_bias,A_log,D,norm,out_proj}``, ``layers.{i}.norm_mlp``,
``layers.{i}.mlp.{w1,w2,w3}``, ``norm_f``, ``head``), while the computation is written out plainly and on purpose in
a different style from ratelab's model: the depthwise conv as a sum of shifted copies, the SSD as a per-token loop
over an explicit (P x N) state per head, RMSNorm written by hand, the flip as an index list.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


class _Norm(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _rms(x, self.weight)


class _Mixer(nn.Module):
    """Mamba-2 with mamba_ssm's names; ngroups = 1, per-head D."""

    def __init__(self, d: int, d_state: int, headdim: int, d_conv: int = 4) -> None:
        super().__init__()
        self.d_in = 2 * d
        self.n = d_state
        self.P = headdim
        self.H = self.d_in // headdim
        ch = self.d_in + 2 * d_state
        self.in_proj = nn.Linear(d, 2 * self.d_in + 2 * d_state + self.H, bias=False)
        self.conv1d = nn.Conv1d(ch, ch, d_conv, groups=ch, bias=True)
        self.dt_bias = nn.Parameter(torch.rand(self.H) - 2.0)
        self.A_log = nn.Parameter(torch.log(torch.rand(self.H) * 15 + 1))
        self.D = nn.Parameter(torch.ones(self.H))
        self.norm = _Norm(self.d_in)
        self.out_proj = nn.Linear(self.d_in, d, bias=False)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        Bsz, L, _ = s.shape
        proj = self.in_proj(s)
        z = proj[..., : self.d_in]
        xbc = proj[..., self.d_in : 2 * self.d_in + 2 * self.n]
        dt_raw = proj[..., 2 * self.d_in + 2 * self.n :]
        # causal depthwise conv: out_t = bias + sum_k w[k] * in_{t - (K-1) + k}
        K = self.conv1d.weight.shape[-1]
        w = self.conv1d.weight[:, 0, :]  # (ch, K)
        conv = self.conv1d.bias.expand(Bsz, L, -1).clone()
        for k in range(K):
            shift = K - 1 - k
            shifted = torch.zeros_like(xbc)
            shifted[:, shift:] = xbc[:, : L - shift]
            conv = conv + shifted * w[:, k]
        xbc = conv * torch.sigmoid(conv)
        x = xbc[..., : self.d_in].reshape(Bsz, L, self.H, self.P)
        Bm = xbc[..., self.d_in : self.d_in + self.n]
        Cm = xbc[..., self.d_in + self.n :]
        dt = torch.log1p(torch.exp(dt_raw + self.dt_bias))  # softplus
        A = -torch.exp(self.A_log)
        state = torch.zeros(Bsz, self.H, self.P, self.n, dtype=s.dtype)
        ys = []
        for t in range(L):
            a = torch.exp(dt[:, t] * A)  # (B, H)
            upd = torch.einsum("bh,bhp,bn->bhpn", dt[:, t], x[:, t], Bm[:, t])
            state = a[:, :, None, None] * state + upd
            ys.append(torch.einsum("bhpn,bn->bhp", state, Cm[:, t]) + self.D[None, :, None] * x[:, t])
        y = torch.stack(ys, 1).reshape(Bsz, L, self.d_in)
        g = y * (z * torch.sigmoid(z))
        return self.out_proj(self.norm(g))


class _Mlp(nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d, hidden)
        self.w2 = nn.Linear(d, hidden)
        self.w3 = nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.w1(x)
        return self.w3(a * torch.sigmoid(a) * self.w2(x))


class _Layer(nn.Module):
    def __init__(self, d: int, d_state: int, headdim: int, flip: bool, heading: bool) -> None:
        super().__init__()
        self.flip, self.heading = flip, heading
        self.norm = _Norm(d)
        self.mixer = _Mixer(d, d_state, headdim)
        self.norm_mlp = _Norm(d)
        self.mlp = _Mlp(d, int(2.5 * d))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        n_tok = h.shape[1]
        order = list(range(n_tok - 2, -1, -1)) + [n_tok - 1] if self.flip else list(range(n_tok))
        u = self.norm(h)[:, order]
        if self.heading:
            u = torch.cat([u.sum(1, keepdim=True) / n_tok, u], 1)
        m = self.mixer(u)
        if self.heading:
            m = m[:, 1:]
        back = torch.empty_like(m)
        back[:, order] = m
        h = h + back
        return h + self.mlp(self.norm_mlp(h))


class OfficialLayoutAdventurer(nn.Module):
    """Adventurer in the official key layout. ``flips``: list of per-layer flags; class token last."""

    def __init__(
        self,
        *,
        img_size: int,
        patch_size: int,
        in_chans: int,
        num_classes: int,
        dim: int,
        depth: int,
        d_state: int,
        headdim: int,
        flips: list[bool],
        heading: bool = True,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)
        n = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.layers = nn.ModuleList(_Layer(dim, d_state, headdim, flips[i], heading) for i in range(depth))
        self.norm_f = _Norm(dim)
        self.head = nn.Linear(dim, num_classes)
        for lay in self.layers:
            nn.init.normal_(lay.mixer.out_proj.weight, std=1 / math.sqrt(2 * dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        Bsz, _, H, W = x.shape
        p = self.patch_size
        # the conv stem as an explicit per-patch product (no Conv2d call)
        patches = x.unfold(2, p, p).unfold(3, p, p)  # (B, C, h, w, p, p)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(Bsz, (H // p) * (W // p), -1)
        w = self.patch_embed.proj.weight.reshape(self.patch_embed.proj.weight.shape[0], -1)
        t = patches @ w.T + self.patch_embed.proj.bias
        h = torch.cat([t, self.cls_token.expand(Bsz, 1, -1)], 1) + self.pos_embed
        for lay in self.layers:
            h = lay(h)
        return self.head(self.norm_f(h)[:, -1])
