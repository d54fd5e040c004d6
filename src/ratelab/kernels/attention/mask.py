"""Attention masks shared by the reference and the fast path: causal (KV-cache aligned), user masks, block masks.

Every mask form is turned into ONE dense mask here, so both paths see exactly the same allowed (query, key) pairs.
Convention (the one of ``torch.nn.functional.scaled_dot_product_attention``): a boolean mask is ``True`` where a
query MAY attend; a floating mask is added to the logits (``-inf`` forbids).

Forms, combined by logical AND (or, for a floating ``attn_mask``, by adding ``-inf`` where a boolean form forbids):

* ``is_causal``: query i may see key j iff ``j <= i + (Lk - Lq)``. With ``Lq == Lk`` this is the usual lower
  triangle; with ``Lq < Lk`` (decoding against a KV cache of the ``Lk - Lq`` earlier tokens) the LAST query is aligned
  with the LAST key ("bottom-right" alignment). Note that SDPA's own ``is_causal`` aligns top-left when
  ``Lq != Lk``, which is wrong for a cache; the fast path therefore passes an explicit mask in that case.
* ``attn_mask``: anything broadcastable to (B, H, Lq, Lk).
* ``block_ids`` / ``kv_block_ids``: an integer block (segment) id per query and per key, shape (L,) or (B, L).
  ``block_causal=False`` allows same-block pairs only (block-diagonal: packed variable-length sequences, M-VAR's
  intra-scale attention); ``block_causal=True`` allows ``kv_block <= q_block`` (VAR's block-causal mask over
  scales: a token sees its own scale and every coarser one). :func:`block_ids_from_seqlens` turns a list of
  sequence lengths (or ``cu_seqlens`` offsets) into ids.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["block_ids_from_cu_seqlens", "block_ids_from_seqlens", "build_attn_mask", "check_qkv", "expand_kv_heads"]


def block_ids_from_seqlens(seqlens: Sequence[int] | torch.Tensor, *, device: torch.device | str | None = None):
    """(L,) int64 block ids for packed sequences of the given lengths: ``[2, 3] -> [0, 0, 1, 1, 1]``.

    Args:
        seqlens: lengths of the packed sequences (or VAR scales: ``p_k ** 2`` tokens each), all >= 0.
        device: device of the result (default: that of ``seqlens`` if a tensor, else CPU).
    """
    lengths = torch.as_tensor(seqlens, dtype=torch.long, device=device)
    if lengths.ndim != 1:
        raise ValueError(f"block_ids_from_seqlens: seqlens must be 1-D, got shape {tuple(lengths.shape)}")
    if (lengths < 0).any():
        raise ValueError(f"block_ids_from_seqlens: seqlens must be >= 0, got {lengths.tolist()}")
    return torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)


def block_ids_from_cu_seqlens(cu_seqlens: Sequence[int] | torch.Tensor, *, device: torch.device | str | None = None):
    """Block ids from flash-attention style cumulative offsets ``[0, l_0, l_0 + l_1, ...]``."""
    cu = torch.as_tensor(cu_seqlens, dtype=torch.long, device=device)
    if cu.ndim != 1 or len(cu) < 1 or int(cu[0]) != 0:
        raise ValueError(f"cu_seqlens must be 1-D and start at 0, got {cu.tolist()}")
    return block_ids_from_seqlens(cu.diff(), device=cu.device)


def _ids(ids: torch.Tensor, length: int, name: str) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor of shape (L,) or (B, L)")
    if ids.ndim not in (1, 2) or ids.shape[-1] != length:
        raise ValueError(f"{name} must have shape ({length},) or (B, {length}), got {tuple(ids.shape)}")
    return ids if ids.ndim == 2 else ids[None]


def build_attn_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    is_causal: bool = False,
    attn_mask: torch.Tensor | None = None,
    block_ids: torch.Tensor | None = None,
    kv_block_ids: torch.Tensor | None = None,
    block_causal: bool = False,
) -> torch.Tensor | None:
    """The combined mask for queries ``q`` (B, H, Lq, D) and keys ``k`` (B, H_kv, Lk, D), or ``None`` (no mask).

    Returns:
        ``None``; a bool tensor broadcastable to (B, H, Lq, Lk) (``True`` = may attend) when every form is boolean;
        otherwise a floating additive mask of ``q``'s dtype.
    """
    Lq, Lk = q.shape[-2], k.shape[-2]
    allowed: torch.Tensor | None = None
    if is_causal:
        if Lq > Lk:
            raise ValueError(f"is_causal with more queries ({Lq}) than keys ({Lk}): the last query is aligned with the "
                             "last key, so the first queries would see nothing")
        i = torch.arange(Lq, device=q.device)[:, None]
        j = torch.arange(Lk, device=q.device)[None, :]
        allowed = j <= i + (Lk - Lq)  # (Lq, Lk)
    if kv_block_ids is not None and block_ids is None:
        raise ValueError("kv_block_ids needs block_ids (the queries' block ids)")
    if block_ids is not None:
        if kv_block_ids is None:
            if Lq != Lk:
                raise ValueError(f"block_ids with Lq={Lq} != Lk={Lk}: pass kv_block_ids for the keys")
            kv_block_ids = block_ids
        qb = _ids(block_ids, Lq, "block_ids")[:, None, :, None]  # (B|1, 1, Lq, 1)
        kb = _ids(kv_block_ids, Lk, "kv_block_ids")[:, None, None, :].to(qb.device)  # (B|1, 1, 1, Lk)
        blocks = kb <= qb if block_causal else kb == qb
        allowed = blocks if allowed is None else allowed & blocks
    elif block_causal:
        raise ValueError("block_causal=True needs block_ids")
    if attn_mask is None:
        return allowed
    if not isinstance(attn_mask, torch.Tensor):
        raise ValueError(f"attn_mask must be a tensor, got {type(attn_mask).__name__}")
    if attn_mask.dtype == torch.bool:
        return attn_mask if allowed is None else allowed & attn_mask
    if not attn_mask.dtype.is_floating_point:
        raise ValueError(f"attn_mask must be bool (True = attend) or floating (additive), got {attn_mask.dtype}")
    attn_mask = attn_mask.to(q.dtype)
    if allowed is None:
        return attn_mask
    # where() broadcasts both operands (a (Lq, Lk) user mask with a (B, 1, Lq, Lk) block mask).
    return torch.where(allowed, attn_mask, torch.tensor(float("-inf"), dtype=q.dtype, device=attn_mask.device))


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Shapes: q (B, H, Lq, D), k (B, H_kv, Lk, D), v (B, H_kv, Lk, Dv) with H a multiple of H_kv."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"attention: {name} must be a (B, H, L, D) tensor, got {shape}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"attention: batch sizes differ: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} must share heads and length")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention: q and k head widths differ ({q.shape[-1]} vs {k.shape[-1]})")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"attention: query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")


def expand_kv_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped-query attention: repeat each key/value head H / H_kv times (a no-op when H_kv == H).

    ``repeat_interleave`` keeps query heads ``g * (H / H_kv) ... (g + 1) * (H / H_kv) - 1`` on key head g (the
    grouping of SDPA's ``enable_gqa``); done explicitly so that both paths work on any supported torch.
    """
    rep = q.shape[1] // k.shape[1]
    if rep == 1:
        return k, v
    return k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
