"""Adventurer: a causal image model with a Mamba-2 token mixer, as the official code computes it.

Papers: Wang et al., "Causal Image Modeling for Efficient Visual Understanding" (arXiv 2410.07599 v1) and its v2
"Adventurer: Optimizing Vision Mamba Architecture Designs for Efficiency" (CVPR 2025). Official code:
wangf3014/Adventurer ``models_mamba.py`` / ``mamba_custom.py`` (this file is an independent re-implementation; the
official key names are mapped in ``convert.py``).

Tokens h (B, N+1, D) in row-major patch order with the class token LAST. One block with flip flag f:

    u = RMSNorm(h)
    u = R u                           if f: reverse the N patch rows, the class token stays last
    s = [mean(u) ; u]                 heading average of all N+1 normalized tokens, prepended (N+2 tokens)
    m = Mamba2(s)[1:]                 causal mixer; the heading position's output is dropped
    h = h + DropPath(R m if f else m)
    h = h + DropPath(SwiGLU(RMSNorm(h)))      SwiGLU(v) = W3(SiLU(W1 v + b1) * (W2 v + b2)) + b3, hidden 2.5 D

Stem: Conv2d(kernel = stride = patch) with bias, no norm; class token appended; learned position embedding over
the N+1 tokens (its last row belongs to the class token). Head: RMSNorm, then Linear on the last token. All
RMSNorms have weight only, eps 1e-5. The mixer is :class:`ratelab.layers.mamba2.Mamba2` with d_state 64, expand 2,
headdim 64, ngroups 1, d_conv 4.

Deviations from the official code:
  * Flip schedule: the paper's figure alternates every block, the released code flips only blocks 2 and 3
    (``n // 2 == 1``, a bug by the maintainer's account, wangf3014/Adventurer issue #6). ``flip="alternate"``
    (``n % 2 == 1``) is the default; ``"legacy_2_3"`` reproduces the released code and ``"pairs"``
    (``(n // 2) % 2 == 1``) the maintainer's other suggestion. Which one the released checkpoints were trained
    with is unverified: pick it by ImageNet-val accuracy before trusting a port.
  * Position-embedding resize keeps the class token's (last) row and resamples the N grid rows bicubically; the
    official fine-tuning code treats the FIRST row as the extra token (so it folds the class token into the grid).
    Inputs of another size than the construction size are resampled on the fly.
  * The Mamba-2 scan runs through :func:`ratelab.kernels.ssd.ssd` (chunked SSD on CPU, chunk 64 by default instead
    of 256: the result does not depend on it); no fused residual-add-norm (the same math, op by op; without
    autograd :meth:`AdventurerBlock._forward_fast` regroups it: norm weights folded into the next GEMM, the flip
    as gathers, fc2 accumulated into the residual); no
    ``residual_in_fp32`` (there is no half-precision residual to protect under fp32 or autocast weights).
  * ``forward_features`` returns the last block's tokens before the final RMSNorm (the CRATE convention of this
    library: ``forward_head`` applies the norm), and ``heading_avg``/``flip="none"`` switch the two ingredients off
    for the ablation of the paper (official ablation runs are not released).
Drop-path rates follow the official list ``[0] + linspace(0, rate, depth)`` indexed by block (block 1 gets 0 too).

Layers from timm, with the key names and numerics of the official layout: ``timm.layers.PatchEmbed`` (``proj``
conv, no norm), ``SwiGLU`` (``fc1_g`` gate, ``fc1_x`` value, ``fc2``; biases on all three) and ``DropPath``.
Model API (docs/models.md, "Model API"): ``forward_features`` / ``forward_head`` / ``forward_intermediates`` as timm
(``return_attn`` gives the SSD mixing matrices); :meth:`Adventurer.forward_layer_quantities` keeps each block's
half step; ``layer_measures`` is empty (no subspace projections, no sparse codes).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ratelab.core.builder import build_model_with_cfg
from ratelab.core.registry import register_model
from ratelab.core.workspace import workspace
from ratelab.layers.intermediates import (
    check_output_fmt,
    collect_intermediates,
    pack_intermediates,
    resolve_indices,
)
from ratelab.layers.mamba2 import Mamba2, rsqrt_mean_square
from ratelab.layers.patch import resample_pos_embed
from ratelab.models.adventurer.config import ADVENTURER_VARIANTS, AdventurerConfig, flip_flags

SSD_BACKENDS = ("auto", "chunked", "recompute", "compiled", "ref", "cuda")  # ratelab.kernels.ssd.BACKENDS
# _timm_note: timm's layers are imported inside the constructors, not here. `import timm` pulls in torchvision, torch
# dynamo and huggingface_hub (about 3 s on a 2-core CPU); importing ratelab.models registers every family, so a
# module-level import would make every create_model call pay for it, CRATE included.


def _gate_fc2(g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(F.silu(g) * x, weight, bias)


def swiglu_lean(mlp: nn.Module, v: torch.Tensor) -> torch.Tensor:
    """timm ``SwiGLU`` (no dropout, no hidden norm) keeping only its two fc1 outputs for the backward: the gate
    ``SiLU(g) * x`` and fc2's input are recomputed (two elementwise passes) instead of kept (3 hidden-width tensors).
    Same values and gradients as ``mlp(v)``."""
    g, x = mlp.fc1_g(v), mlp.fc1_x(v)
    if not torch.is_grad_enabled():  # inference: the gate in place in g's fresh buffer (two fewer allocations)
        return F.linear(F.silu(g, inplace=True).mul_(x), mlp.fc2.weight, mlp.fc2.bias)
    if torch.compiler.is_compiling():
        return _gate_fc2(g, x, mlp.fc2.weight, mlp.fc2.bias)
    return checkpoint(_gate_fc2, g, x, mlp.fc2.weight, mlp.fc2.bias, use_reentrant=False, preserve_rng_state=False)


def reverse_patches(t: torch.Tensor) -> torch.Tensor:
    """R: reverse the first N rows of (B, N+1, ...) and keep the last (class token) row in place. R = R^-1."""
    return torch.cat([t[:, :-1].flip(1), t[:, -1:]], dim=1)


class AdventurerBlock(nn.Module):
    """Pre-norm Mamba-2 block with heading average and optional flip. (B, N+1, D) -> (B, N+1, D)."""

    def __init__(
        self,
        cfg: AdventurerConfig,
        *,
        flip: bool,
        drop_path: float = 0.0,
        chunk_size: int = 64,
        backend: str = "auto",
        memory_efficient: bool = False,
    ) -> None:
        super().__init__()
        from timm.layers import DropPath, SwiGLU  # deferred: see _timm_note

        d = cfg.embed_dim
        self.flip = flip
        self.heading_avg = cfg.heading_avg
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()  # stateless: no state-dict keys
        self.norm1 = nn.RMSNorm(d, eps=1e-5)
        self.mixer = Mamba2(
            d, d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand, headdim=cfg.headdim, ngroups=cfg.ngroups,
            chunk_size=chunk_size, backend=backend, recompute=memory_efficient,
        )  # fmt: skip
        self.norm2 = nn.RMSNorm(d, eps=1e-5)
        self.mlp = SwiGLU(d, cfg.mlp_hidden)  # timm's: keys fc1_g, fc1_x, fc2 (biases on all three)
        self.memory_efficient = memory_efficient

    def _mlp(self, v: torch.Tensor) -> torch.Tensor:
        lean = self.memory_efficient or not torch.is_grad_enabled()  # (swiglu_lean's no-grad path works in place)
        return swiglu_lean(self.mlp, v) if lean else self.mlp(v)

    def _mixer_input(self, h: torch.Tensor) -> torch.Tensor:
        """RMSNorm, flip, heading token: (B, N+1, D) -> (B, N+2, D) (or N+1 without the heading average)."""
        u = self.norm1(h)
        if self.flip:
            u = reverse_patches(u)
        if self.heading_avg:
            u = torch.cat([u.mean(dim=1, keepdim=True), u], dim=1)
        return u

    def _mixer_output(self, m: torch.Tensor) -> torch.Tensor:
        """Drop the heading output, undo the flip: back to canonical (B, N+1, D)."""
        if not self.flip:
            return m[:, 1:] if self.heading_avg else m
        # drop + reverse + keep-last as one gather (one copy instead of a flip copy and a cat copy)
        n = m.shape[1]
        first = 1 if self.heading_avg else 0
        idx = torch.cat([torch.arange(n - 2, first - 1, -1), torch.tensor([n - 1])]).to(m.device)
        return m.index_select(1, idx)

    def _order(self, n: int, device: torch.device) -> torch.Tensor:
        """R as an index over N+1 tokens: ``t[:, R] == reverse_patches(t)`` (the class token stays last)."""
        return torch.cat([torch.arange(n - 2, -1, -1), torch.tensor([n - 1])]).to(device)

    def _fast_applies(self, h: torch.Tensor) -> bool:
        drop_on = self.training and not isinstance(self.drop_path, nn.Identity)
        mlp = self.mlp  # timm SwiGLU as built here: no hidden norm, no dropout (what _forward_fast computes)
        mlp_plain = isinstance(getattr(mlp, "norm", None), nn.Identity) and all(
            getattr(getattr(mlp, d, None), "p", 1.0) == 0 for d in ("drop1", "drop2"))
        return not drop_on and mlp_plain and self.mixer.fast_inference_applies(h)

    def _forward_fast(self, h: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` without autograd, regrouped (same function up to rounding; ``tests/test_adventurer.py``).

        * norm1: the mixer input is ``x / rms(x)`` and norm1's weight is folded into in_proj's weight; the flip
          gathers the tokens in the same pass, and the heading average is the mean of those rows (the weight is
          linear, so ``W diag(w) mean(x^) = W mean(w x^)``);
        * the mixer returns out_proj's output before the gated norm's per-token scale (``Mamba2.forward_infer_parts``)
          and the residual add applies it: ``h + R(o) * R(r)`` in one ``addcmul`` on the un-flipped rows;
        * norm2's weight is folded into the two fc1 weights, the gate is formed in place in the fc1_g output, and
          fc2 accumulates straight into the residual buffer (``addmm_``, no bias copy, no separate add).
        """
        mx, n1, n2, mlp = self.mixer, self.norm1, self.norm2, self.mlp
        b, t, d = h.shape
        head = 1 if self.heading_avg else 0
        order = self._order(t, h.device) if self.flip else None
        s = h.new_empty((b, t + head, d))
        body = s[:, head:]
        hin = h.index_select(1, order) if self.flip else h
        torch.mul(hin, rsqrt_mean_square(hin, n1.eps), out=body)
        if head:
            torch.mean(body, 1, keepdim=True, out=s[:, :1])
        o, r = mx.forward_infer_parts(s, in_scale=n1.weight)
        if self.flip:
            idx = order + head
            o, r = o.index_select(1, idx), (r.index_select(1, idx) if r is not None else None)
        elif head:
            o, r = o[:, head:], (r[:, head:] if r is not None else None)
        h = torch.addcmul(h, o, r) if r is not None else h + o
        if mx.out_proj.bias is not None:
            h.add_(mx.out_proj.bias)
        v = h * rsqrt_mean_square(h, n2.eps)
        g = F.linear(v, mlp.fc1_g.weight * n2.weight, mlp.fc1_g.bias)
        x = F.linear(v, mlp.fc1_x.weight * n2.weight, mlp.fc1_x.bias)
        a = F.silu(g, inplace=True).mul_(x)
        if mlp.fc2.bias is not None:
            h.add_(mlp.fc2.bias)
        h.view(-1, d).addmm_(a.view(-1, a.shape[-1]), mlp.fc2.weight.t())
        return h

    def forward(
        self, h: torch.Tensor, *, return_attn: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(B, N+1, D) -> (B, N+1, D), and with ``return_attn`` the canonical-order mixing matrix (B, H, N+1, N+1)."""
        if not return_attn and self._fast_applies(h):
            return self._forward_fast(h)
        s = self._mixer_input(h)
        h = h + self.drop_path(self._mixer_output(self.mixer(s)))
        h = h + self.drop_path(self._mlp(self.norm2(h)))
        return (h, self.mixing_matrix(s)) if return_attn else h

    def forward_quantities(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        """Same computation keeping ``half`` (h + mixer branch) beside ``out``."""
        half = h + self.drop_path(self._mixer_output(self.mixer(self._mixer_input(h))))
        return {"out": half + self.drop_path(self._mlp(self.norm2(half))), "half": half}

    def mixing_matrix(self, s: torch.Tensor) -> torch.Tensor:
        """The SSD mixing matrix of mixer input ``s`` restricted to the N+1 real tokens, in canonical order."""
        M = self.mixer.mixing_matrix(s)  # (B, H, L, L) in mixer order
        if self.heading_avg:
            M = M[..., 1:, 1:]
        if self.flip:  # conjugate by R: rows and columns back to canonical token order
            n = M.shape[-1]
            perm = torch.cat([torch.arange(n - 2, -1, -1), torch.tensor([n - 1])]).to(M.device)
            M = M[..., perm, :][..., perm]
        return M


class Adventurer(nn.Module):
    """Adventurer image classifier.

    Args:
        cfg: architecture (:class:`AdventurerConfig`).
        img_size: construction input size (position-embedding grid); other sizes are resampled on the fly.
        in_chans: input channels.
        num_classes: head width; 0 gives an identity head (features only).
        drop_path_rate: stochastic depth (training only).
        ssd_backend: the SSD backend of every mixer (see :meth:`set_ssd_backend`).
        ssd_chunk_size: SSD chunk length (speed only).
        memory_efficient: keep less for the backward (see :meth:`set_memory_efficient`): each mixer is recomputed
            in the backward from its input, each SwiGLU keeps only its two fc1 outputs. About 2.5x less training
            memory for one more mixer forward per step; values and gradients unchanged.
    """

    num_prefix_tokens = 1
    cls_token_last = True
    layer_measures: tuple[str, ...] = ()  # no U_k^T z and no sparse codes: see ratelab.analysis.layer_rates
    # how to compute, not what: not recorded in model_args
    execution_args = ("ssd_backend", "ssd_chunk_size", "memory_efficient")

    def __init__(
        self,
        cfg: AdventurerConfig,
        *,
        img_size: int = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        drop_path_rate: float = 0.0,
        ssd_backend: str = "auto",
        ssd_chunk_size: int = 64,
        memory_efficient: bool = True,
    ) -> None:
        super().__init__()
        if img_size % cfg.patch_size:
            raise ValueError(f"img_size={img_size} is not divisible by patch_size={cfg.patch_size}")
        if ssd_backend not in SSD_BACKENDS:
            raise ValueError(f"ssd_backend must be one of {SSD_BACKENDS}, got {ssd_backend!r}")
        self.cfg = cfg
        self.img_size = img_size
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.num_features = self.embed_dim = d = cfg.embed_dim
        self.grid_size = (img_size // cfg.patch_size, img_size // cfg.patch_size)
        n_patches = self.grid_size[0] * self.grid_size[1]
        from timm.layers import PatchEmbed  # deferred: see _timm_note

        # timm's PatchEmbed: Conv2d(kernel = stride = p) with bias, flatten to (B, N, D), no norm; key `proj` as the
        # official layout. img_size=None: any input size (the position table is resampled instead).
        self.patch_embed = PatchEmbed(None, cfg.patch_size, in_chans, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_patches + 1, d))  # last row: the class token's
        rates = [0.0] + [drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # official off-by-one
        self.blocks = nn.ModuleList(
            AdventurerBlock(cfg, flip=f, drop_path=rates[i], chunk_size=ssd_chunk_size, backend=ssd_backend,
                            memory_efficient=memory_efficient)
            for i, f in enumerate(flip_flags(cfg.flip, cfg.depth))
        )
        self.norm = nn.RMSNorm(d, eps=1e-5)
        self.head = nn.Linear(d, num_classes) if num_classes > 0 else nn.Identity()
        self.grad_checkpointing = False
        self.init_weights()

    def init_weights(self) -> None:
        """Official init: lecun-normal stem, trunc-normal(0.02) head/tokens, zero Linear biases, and every mixer
        ``out_proj`` re-drawn kaiming-uniform(a=sqrt 5) and divided by sqrt(depth); Mamba-2 internals keep theirs."""
        w = self.patch_embed.proj.weight
        fan_in = w.shape[1] * w.shape[2] * w.shape[3]
        std = math.sqrt(1.0 / fan_in) / 0.87962566103423978  # std of a unit normal truncated at +-2
        nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std)
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if isinstance(self.head, nn.Linear):
            nn.init.trunc_normal_(self.head.weight, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        for blk in self.blocks:
            p = blk.mixer.out_proj.weight
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
            with torch.no_grad():
                p /= math.sqrt(self.cfg.depth)

    # ---- configuration switches ---------------------------------------------------------------------------
    def set_ssd_backend(self, backend: str) -> None:
        """One of :data:`ratelab.kernels.ssd.BACKENDS`: ``"auto"`` (the recomputing chunked kernel on CPU, fused
        mamba_ssm on CUDA when installed), ``"chunked"``, ``"recompute"``, ``"compiled"``, ``"ref"``, ``"cuda"``."""
        if backend not in SSD_BACKENDS:
            raise ValueError(f"ssd backend must be one of {SSD_BACKENDS}, got {backend!r}")
        for blk in self.blocks:
            blk.mixer.backend = backend

    def set_memory_efficient(self, enable: bool = True) -> None:
        """Recompute every mixer from its input in the backward and keep only the SwiGLU's fc1 outputs (on by
        default); off keeps every intermediate (faster backward, about 2.5x the activation memory).
        ``set_grad_checkpointing`` goes further: whole blocks recomputed, one tensor kept per block."""
        for blk in self.blocks:
            blk.memory_efficient = enable
            blk.mixer.recompute = enable

    def set_fast_inference(self, enable: bool = True) -> None:
        """Without autograd run each block's regrouped fast path (on by default; the same function up to rounding,
        see :meth:`AdventurerBlock._forward_fast`); off runs the op-by-op blocks also under no_grad."""
        for blk in self.blocks:
            blk.mixer.fast_inference = enable

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        # The 1-D A_log, D, dt_bias and norm weights are exempt by rank in ratelab's optimizer already.
        return {"cls_token", "pos_embed"}

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return {"stem": r"^cls_token|^pos_embed|^patch_embed", "blocks": r"^blocks\.(\d+)"}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    # ---- forward ------------------------------------------------------------------------------------------
    def _pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        if grid == self.grid_size:
            return self.pos_embed
        return resample_pos_embed(self.pos_embed, grid, num_prefix_tokens=1, prefix_last=True, old_grid=self.grid_size)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H/p * W/p + 1, D): patch tokens, then the class token LAST, position embeddings added."""
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected input (B, {self.in_chans}, H, W), got {tuple(x.shape)}")
        p = self.cfg.patch_size
        if x.shape[2] % p or x.shape[3] % p:
            raise ValueError(f"image size {x.shape[2]}x{x.shape[3]} is not divisible by patch_size={p}")
        t = self.patch_embed(x)
        t = torch.cat([t, self.cls_token.expand(t.shape[0], -1, -1)], dim=1)
        return t + self._pos_embed((x.shape[2] // p, x.shape[3] // p))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N + 1, D) last-block tokens (before the final RMSNorm); index -1 is the class token."""
        x = self.embed(x)
        with self._scope():
            for blk in self.blocks:
                x = self._run_block(blk, x)
        return x

    def _scope(self) -> contextlib.AbstractContextManager:
        """Without autograd the blocks' SSD scans reuse one set of scratch buffers (``core.workspace``: the pages
        that the first block faults in serve the others); a no-op otherwise."""
        fast = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        return workspace() if fast else contextlib.nullcontext()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, N + 1, D) tokens -> (B, num_classes) logits, or the (B, D) normalized class token."""
        x = self.norm(x[:, -1])
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def _run_block(self, blk: AdventurerBlock, h: torch.Tensor) -> torch.Tensor:
        return checkpoint(blk, h, use_reentrant=False) if self.grad_checkpointing and self.training else blk(h)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        output_fmt: str = "NLC",
        intermediates_only: bool = False,
        return_attn: bool = False,
        return_prefix_tokens: bool = False,
    ) -> Any:
        """Block outputs without hooks, timm's convention (docs/models.md, "Model API").

        Args:
            x: (B, C, H, W) images.
            indices: blocks to keep: ``None`` all, an int n the last n, a list those (negative from the end).
            norm: apply the final RMSNorm to each kept block's tokens.
            output_fmt: ``"NLC"`` (B, h*w, D) patch tokens in row-major order or ``"NCHW"`` (B, D, h, w); the class
                token (last in the sequence) is split off either way, see ``return_prefix_tokens``.
            intermediates_only: return only the intermediates (and the matrices with ``return_attn``).
            return_attn: also return each kept block's implicit SSD mixing matrix (B, H, N+1, N+1): Mamba-2 has
                no attention matrix, so this is ``M[i, j] = (C_i . B_j) dt_j exp(A sum_{j<k<=i} dt_k)``
                (:meth:`ratelab.layers.mamba2.Mamba2.mixing_matrix`), rows = outputs, columns = inputs, over the N+1
                real tokens (class token last; the heading row and column removed) in canonical order (so flipped
                blocks are upper-triangular on the patch rows). It maps the post-conv mixer input x to the SSD
                output before the D skip, the gate and the projections. O(N^2 H) memory.
            return_prefix_tokens: each intermediate becomes ``(patch tokens, (B, 1, D) class token)``.

        Returns:
            ``(final, intermediates)``, ``(final, intermediates, attn)`` with ``return_attn``, or the list alone with
            ``intermediates_only``. ``final`` (B, N+1, D) is what :meth:`forward_features` returns (no norm).
        """
        check_output_fmt(output_fmt, ("NLC", "NCHW"), type(self).__name__)
        take = resolve_indices(len(self.blocks), indices, what="block")
        p = self.cfg.patch_size
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        with self._scope():
            h, inter, attn = collect_intermediates(
                self.embed(x), self.blocks, take, self._run_block, norm=self.norm if norm else None,
                output_fmt=output_fmt, grid=grid, prefix_last=True, return_attn=return_attn,
                return_prefix_tokens=return_prefix_tokens)
        return pack_intermediates(h, inter, attn, intermediates_only=intermediates_only)

    def forward_layer_quantities(self, x: torch.Tensor, indices: int | list[int] | None = None) -> dict[str, Any]:
        """Per kept block: ``tokens`` (block output) and ``half`` (h + mixer branch), all N+1 tokens (B, N+1, D),
        class token last; plus ``indices`` and ``features`` (= :meth:`forward_features`). No ``proj``/``codes``:
        none of the rate measures applies (``layer_measures`` is empty)."""
        take = resolve_indices(len(self.blocks), indices, what="block")
        res: dict[str, Any] = {"indices": take, "tokens": [], "half": []}
        h = self.embed(x)
        for i, blk in enumerate(self.blocks):
            if i in take:
                out = blk.forward_quantities(h)
                h = out["out"]
                res["tokens"].append(h)
                res["half"].append(out["half"])
            else:
                h = self._run_block(blk, h)
        res["features"] = h
        return res

    @classmethod
    def checkpoint_filter_fn(cls, state_dict: dict[str, torch.Tensor], model: Adventurer) -> dict[str, torch.Tensor]:
        from ratelab.models.adventurer.convert import checkpoint_filter_fn

        return checkpoint_filter_fn(state_dict, model)


def _create_adventurer(variant: str, **kwargs: Any) -> Adventurer:
    return build_model_with_cfg(Adventurer, AdventurerConfig, ADVENTURER_VARIANTS[variant], **kwargs)


@register_model
def adventurer_tiny_patch16_224(**kwargs: Any) -> Adventurer:
    return _create_adventurer("tiny", **{"patch_size": 16, **kwargs})


@register_model
def adventurer_small_patch16_224(**kwargs: Any) -> Adventurer:
    return _create_adventurer("small", **{"patch_size": 16, **kwargs})


@register_model
def adventurer_base_patch16_224(**kwargs: Any) -> Adventurer:
    return _create_adventurer("base", **{"patch_size": 16, **kwargs})


@register_model
def adventurer_large_patch16_224(**kwargs: Any) -> Adventurer:
    return _create_adventurer("large", **{"patch_size": 16, **kwargs})


@register_model
def adventurer_base_patch8_224(**kwargs: Any) -> Adventurer:
    return _create_adventurer("base", **{"patch_size": 8, **kwargs})


@register_model
def adventurer_nano_patch4_16(**kwargs: Any) -> Adventurer:
    """5 x 64 Adventurer for 16x16 inputs (digits demo; about the size of crate_nano_patch4_16)."""
    kwargs.setdefault("img_size", 16)
    kwargs.setdefault("num_classes", 10)
    kwargs.setdefault("in_chans", 1)
    return _create_adventurer("nano", **kwargs)


@register_model
def test_adventurer(**kwargs: Any) -> Adventurer:
    """2 x 32 Adventurer on 8x8 RGB inputs, for unit tests."""
    kwargs.setdefault("img_size", 8)
    kwargs.setdefault("num_classes", 10)
    kwargs.setdefault("in_chans", 3)
    return _create_adventurer("test", **kwargs)


__all__ = ["Adventurer", "AdventurerBlock", "AdventurerConfig", "reverse_patches"]
