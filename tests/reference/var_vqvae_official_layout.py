"""An independent reference of FoundationVision/VAR's tokenizer (models/vqvae.py, basic_vae.py, quant.py), written
for the parity test from reading that code: plain loops, explicit bmm attention, numpy phi ticks; the official
module tree, hence the official state-dict keys. Not ratelab's implementation (nothing is imported from it)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def gn(c, groups=32):
    return nn.GroupNorm(groups, c, eps=1e-6)


class RefRes(nn.Module):
    def __init__(self, cin, cout, groups):
        super().__init__()
        self.norm1, self.conv1 = gn(cin, groups), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = gn(cout, groups), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class RefAttn(nn.Module):
    def __init__(self, c, groups):
        super().__init__()
        self.c = c
        self.norm = gn(c, groups)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x):
        b, _, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.c, h * w)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]                      # (B, C, N)
        att = torch.softmax(torch.bmm(q.transpose(1, 2), k) * self.c ** -0.5, dim=2)  # (B, Nq, Nk)
        out = torch.bmm(v, att.transpose(1, 2))                         # (B, C, Nq)
        return x + self.proj_out(out.reshape(b, self.c, h, w))


class RefEncoder(nn.Module):
    def __init__(self, ch, ch_mult, nres, z, groups):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = ch
        for i, m in enumerate(ch_mult):
            lvl = nn.Module()
            lvl.block, lvl.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(nres):
                lvl.block.append(RefRes(cin, ch * m, groups))
                cin = ch * m
                if i == len(ch_mult) - 1:
                    lvl.attn.append(RefAttn(cin, groups))
            if i != len(ch_mult) - 1:
                lvl.downsample = nn.Module()
                lvl.downsample.conv = nn.Conv2d(cin, cin, 3, stride=2)
            self.down.append(lvl)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1, self.mid.block_2 = (RefRes(cin, cin, groups), RefAttn(cin, groups),
                                                                RefRes(cin, cin, groups))
        self.norm_out, self.conv_out = gn(cin, groups), nn.Conv2d(cin, z, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for lvl in self.down:
            for j in range(len(lvl.block)):
                h = lvl.block[j](h)
                if len(lvl.attn) > 0:
                    h = lvl.attn[j](h)
            if hasattr(lvl, "downsample"):
                h = lvl.downsample.conv(F.pad(h, (0, 1, 0, 1)))
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class RefDecoder(nn.Module):
    def __init__(self, ch, ch_mult, nres, z, groups):
        super().__init__()
        cin = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z, cin, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1, self.mid.block_2 = (RefRes(cin, cin, groups), RefAttn(cin, groups),
                                                                RefRes(cin, cin, groups))
        ups = {}
        for i in reversed(range(len(ch_mult))):
            lvl = nn.Module()
            lvl.block, lvl.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(nres + 1):
                lvl.block.append(RefRes(cin, ch * ch_mult[i], groups))
                cin = ch * ch_mult[i]
                if i == len(ch_mult) - 1:
                    lvl.attn.append(RefAttn(cin, groups))
            if i != 0:
                lvl.upsample = nn.Module()
                lvl.upsample.conv = nn.Conv2d(cin, cin, 3, padding=1)
            ups[i] = lvl
        self.up = nn.ModuleList([ups[i] for i in range(len(ch_mult))])
        self.norm_out, self.conv_out = gn(cin, groups), nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for i in reversed(range(len(self.up))):
            lvl = self.up[i]
            for j in range(len(lvl.block)):
                h = lvl.block[j](h)
                if len(lvl.attn) > 0:
                    h = lvl.attn[j](h)
            if hasattr(lvl, "upsample"):
                h = lvl.upsample.conv(F.interpolate(h, scale_factor=2, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))


class RefQuant(nn.Module):
    def __init__(self, vocab, z, patch_nums, n_phi=4):
        super().__init__()
        self.patch_nums = patch_nums
        self.embedding = nn.Embedding(vocab, z)
        self.quant_resi = nn.Module()
        self.quant_resi.qresi_ls = nn.ModuleList([nn.Conv2d(z, z, 3, padding=1) for _ in range(n_phi)])
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(patch_nums), vocab))
        k = n_phi
        self.ticks = np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k) if k == 4 else np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k)

    def phi(self, si, h):
        n = len(self.patch_nums)
        conv = self.quant_resi.qresi_ls[int(np.argmin(np.abs(self.ticks - si / (n - 1))))]
        return 0.5 * h + 0.5 * conv(h)

    def tokens(self, f):
        b, c, hh, ww = f.shape
        rest, fhat, idxs = f.clone(), torch.zeros_like(f), []
        e = self.embedding.weight
        for si, pn in enumerate(self.patch_nums):
            last = si == len(self.patch_nums) - 1
            z = rest if last else F.interpolate(rest, size=(pn, pn), mode="area")
            z = z.permute(0, 2, 3, 1).reshape(-1, c)
            d = z.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1)
            d = d.addmm(z, e.t(), alpha=-2)
            idx = d.argmin(1)
            h = self.embedding(idx).view(b, pn, pn, c).permute(0, 3, 1, 2)
            if not last:
                h = F.interpolate(h, size=(hh, ww), mode="bicubic")
            h = self.phi(si, h)
            fhat, rest = fhat + h, rest - h
            idxs.append(idx.view(b, pn * pn))
        return idxs, fhat

    def decode_idx(self, idxs):
        b = idxs[0].shape[0]
        side = self.patch_nums[-1]
        fhat = 0
        for si, idx in enumerate(idxs):
            pn = self.patch_nums[si]
            h = self.embedding(idx).view(b, pn, pn, -1).permute(0, 3, 1, 2)
            if si < len(idxs) - 1:
                h = F.interpolate(h, size=(side, side), mode="bicubic")
            fhat = fhat + self.phi(si, h)
        return fhat

    def var_input(self, idxs):
        b = idxs[0].shape[0]
        side = self.patch_nums[-1]
        fhat, outs = 0, []
        for si in range(len(self.patch_nums) - 1):
            pn = self.patch_nums[si]
            h = self.embedding(idxs[si]).view(b, pn, pn, -1).permute(0, 3, 1, 2)
            fhat = fhat + self.phi(si, F.interpolate(h, size=(side, side), mode="bicubic"))
            nxt = self.patch_nums[si + 1]
            outs.append(F.interpolate(fhat, size=(nxt, nxt), mode="area").flatten(2).transpose(1, 2))
        return torch.cat(outs, 1)


class RefVQVAE(nn.Module):
    def __init__(self, ch=32, vocab=64, z=32, patch_nums=(1, 2, 4), ch_mult=(1, 1, 2, 2, 4), nres=2, groups=32):
        super().__init__()
        self.encoder = RefEncoder(ch, ch_mult, nres, z, groups)
        self.decoder = RefDecoder(ch, ch_mult, nres, z, groups)
        self.quantize = RefQuant(vocab, z, patch_nums)
        self.quant_conv = nn.Conv2d(z, z, 3, padding=1)
        self.post_quant_conv = nn.Conv2d(z, z, 3, padding=1)

    def img_to_idx(self, x):
        return self.quantize.tokens(self.quant_conv(self.encoder(x)))[0]

    def idx_to_img(self, idxs):
        return self.decoder(self.post_quant_conv(self.quantize.decode_idx(idxs))).clamp(-1, 1)
