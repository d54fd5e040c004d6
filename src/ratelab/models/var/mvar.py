"""M-VAR: VAR with decoupled intra-scale attention and inter-scale Mamba-2.

Paper: Ren, Yu, Ruiz, Wang, Yuille, Xie, "M-VAR: Decoupled Scale-wise Autoregressive Modeling for High-Quality
Image Generation" (arXiv 2411.10433). Layout and math follow the official code (OliverRensu/MVAR
``models/basic_mvar.py``, ``models/mvar.py``), re-written. Embeddings, head, init and sampling are VAR's
(:mod:`ratelab.models.var.var`); the block is

    (g1, g2, g3, s1, s2, s3, b1, b2, b3) = ada_lin(SiLU(c))       9 chunks, in the code's order
    x += DropPath(g1 * Attn_intra(LN(x)(1 + s1) + b1))            bidirectional inside each scale only
    x += DropPath(g2 * Mamba2(LN(x)(1 + s2) + b2))                causal over the whole coarse -> fine sequence
    x += DropPath(g3 * MLP(LN(x)(1 + s3) + b3))

Intra-scale attention is the block-diagonal form of :func:`ratelab.kernels.attention.attention` (``block_ids`` =
scale of each token, ``block_causal=False``), the SAME mask in training, evaluation and generation. The mixer is
:class:`ratelab.layers.mamba2.Mamba2` (d_state 64, d_conv 4, expand 2, headdim 64, one group; mamba_ssm's key names),
whose scan is :func:`ratelab.kernels.ssd.ssd`.

Generation runs one scale per step. Attention needs no cache (it never leaves the scale). For the mixer,
``state_carry=True`` keeps per block the recurrent state across scales - the last ``d_conv`` conv inputs and the SSM
state (H, P, N) - and scans only the p_k^2 new tokens from it (:meth:`Mamba2.chunk`): O(L) Mamba work in total.
``state_carry=False`` is the official algorithm: every block keeps the prefix of its post-attention hidden states
and re-runs Mamba-2 on all of it at every scale (sum_k cum_k = 1710 token-steps instead of 680 at 256^2). Both equal
the teacher-forced forward up to float rounding (tests/test_mvar_model.py).

Sizes (``mvar_d12 ... mvar_d32``): 198M / 464M / 901M / 1.55B / 3.66B. The paper lists d32 as "3.0B", the size of a
depth-30 model; ``mvar_d32`` is built as the code builds it (width 2048), and the converter reports the depth and
width of a file that differs (pass ``depth=30`` for a depth-30 file). The README says to build d16/d20 with
``attn_l2_norm=False`` to load their checkpoints (the weights registry does so).

Deviations from the official code: the official eval path runs ``flash_attn_func`` over whatever it is given, so a
teacher-forced evaluation of all L tokens attends ACROSS scales, and its Mamba cache only exists inside
``autoregressive_infer_cfg``; here the intra-scale mask applies everywhere and ``forward`` behaves identically in
train and eval mode (except label dropout and DropPath, which are training-only). Training does not need
flash-attention's varlen kernel (its ``max_seqlen`` is hard-coded to 256 there, correct only for the 256^2
schedule); any ``patch_nums`` works. The buffers ``attn_bias_for_masking``, ``lvl_1L``, ``attn.zero_k_bias`` and
``attn.patch_nums`` are not saved (the converter checks the official ones). Otherwise as VAR (see its docstring).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ratelab.core.registry import register_model
from ratelab.layers.mamba2 import Mamba2
from ratelab.models.var.config import MVAR_VARIANTS, MVARConfig
from ratelab.models.var.var import (
    ScaleAR,
    ScaleAttention,
    _drop_path,
    _mlp,
    _split_kwargs,
    _with_model_args,
    build_config,
    modulate,
)

__all__ = ["MVAR", "MVARBlock"]


class MVARBlock(nn.Module):
    """AdaLN block: intra-scale attention, Mamba-2 over all scales, FFN. (B, L, C), (B, C) -> (B, L, C)."""

    n_chunks = 9

    def __init__(self, cfg: MVARConfig, drop_path: float = 0.0, *, backend: str = "auto",
                 ssd_backend: str = "auto") -> None:
        super().__init__()
        C = cfg.embed_dim
        self.C = C
        self.ln = nn.LayerNorm(C, eps=cfg.norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Linear(C, self.n_chunks * C)  # applied to SiLU(cond)
        self.attn = ScaleAttention(C, cfg.num_heads, attn_l2_norm=cfg.attn_l2_norm, backend=backend)
        self.mixer = Mamba2(
            C, d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand, headdim=cfg.headdim, ngroups=cfg.ngroups,
            chunk_size=cfg.chunk_size, backend=ssd_backend,
        )  # fmt: skip
        self.mlp = _mlp(C, cfg.mlp_ratio)
        self.drop_path = _drop_path(drop_path)

    def chunks(self, cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.ada_lin(F.silu(cond)).view(-1, 1, self.n_chunks, self.C).unbind(2)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, *, block_ids: torch.Tensor | None,
                return_attn: bool = False) -> Any:
        """Teacher forcing over the whole sequence; ``block_ids`` = scale of each token (None: one scale)."""
        g1, g2, g3, s1, s2, s3, b1, b2, b3 = self.chunks(cond)
        a = self.attn(modulate(x, self.ln, s1, b1), block_ids=block_ids, return_attn=return_attn)
        a, w = a if return_attn else (a, None)
        x = x + self.drop_path(a * g1)
        x = x + self.drop_path(self.mixer(modulate(x, self.ln, s2, b2)) * g2)
        x = x + self.drop_path(self.mlp(modulate(x, self.ln, s3, b3)) * g3)
        return (x, w) if return_attn else x

    def forward_scale(self, x: torch.Tensor, cond: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        """The tokens of ONE scale (B, p^2, C), continuing the sequence recorded in ``state`` (updated in place).

        ``state`` holds ``conv``/``ssm`` (state carry) or ``prefix`` (re-scan: post-attention hidden states so far).
        """
        g1, g2, g3, s1, s2, s3, b1, b2, b3 = self.chunks(cond)
        x = x + self.attn(modulate(x, self.ln, s1, b1)) * g1  # every token is of this scale: no mask
        if "ssm" in state:
            m, state["conv"], state["ssm"] = self.mixer.chunk(modulate(x, self.ln, s2, b2), state["conv"],
                                                          state["ssm"])
        else:
            prefix = x if state.get("prefix") is None else torch.cat([state["prefix"], x], dim=1)
            state["prefix"] = prefix
            m = self.mixer(modulate(prefix, self.ln, s2, b2))[:, -x.shape[1]:]
        x = x + m * g2
        return x + self.mlp(modulate(x, self.ln, s3, b3)) * g3


class MVAR(ScaleAR):
    """M-VAR (see the module docstring). ``forward(labels, x_BLCv_wo_first_l) -> (B, L, V)``."""

    block_type = MVARBlock

    def __init__(self, cfg: MVARConfig, *, backend: str = "auto", ssd_backend: str = "auto") -> None:
        super().__init__(cfg, backend=backend, ssd_backend=ssd_backend)

    @classmethod
    def checkpoint_filter_fn(cls, state_dict: dict[str, torch.Tensor], model: MVAR) -> dict[str, torch.Tensor]:
        """Official (OliverRensu/MVAR) or ratelab layout -> this model's keys."""
        from ratelab.models.var.convert import convert_mvar_checkpoint

        return convert_mvar_checkpoint(state_dict, model)

    def gen_begin(self, batch: int, *, state_carry: bool = True) -> list[dict[str, Any]]:
        states: list[dict[str, Any]] = []
        for blk in self.blocks:
            if state_carry:
                conv, ssm = blk.mixer.allocate_inference_cache(batch)
                states.append({"conv": conv, "ssm": ssm})
            else:
                states.append({"prefix": None})
        return states

    def gen_blocks(self, x: torch.Tensor, cond: torch.Tensor, si: int, state: Any) -> torch.Tensor:
        for blk, st in zip(self.blocks, state):
            x = blk.forward_scale(x, cond, st)
        return x

    def gen_end(self, state: Any) -> None:
        for st in state:
            st.clear()


def _create_mvar(variant: str, **kwargs: Any) -> MVAR:
    arch, runtime = _split_kwargs(kwargs)
    if "ssd_backend" in arch:
        runtime["ssd_backend"] = arch.pop("ssd_backend")
    return _with_model_args(MVAR(build_config(MVAR_VARIANTS[variant], **arch), **runtime), arch)


@register_model
def mvar_d12(**kwargs: Any) -> MVAR:
    return _create_mvar("d12", **kwargs)


@register_model
def mvar_d16(**kwargs: Any) -> MVAR:
    return _create_mvar("d16", **kwargs)


@register_model
def mvar_d20(**kwargs: Any) -> MVAR:
    return _create_mvar("d20", **kwargs)


@register_model
def mvar_d24(**kwargs: Any) -> MVAR:
    return _create_mvar("d24", **kwargs)


@register_model
def mvar_d32(**kwargs: Any) -> MVAR:
    """Width 2048 (64 x 32) as OliverRensu/MVAR builds it: 3.66B parameters (the paper's table says 3.0B)."""
    return _create_mvar("d32", **kwargs)
