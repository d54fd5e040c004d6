"""torchrun worker for tests/test_strategy.py: the same 3 AdamW steps of a tiny CRATE under DDP and FSDP2.

Each variant trains ``test_crate`` (16x16, 1 channel) with a hand-written loop: a global batch of 16 split
contiguously over the ranks (and over the micro-steps with accumulation), mean cross-entropy, gradient clipping at
1.0 (active: the gradient norm starts near 3) and AdamW. Rank 0 writes every variant's final full state dict,
per-step gradient norms and the probes below to ``--out``; the test compares them with a one-process run of the
same functions.

Run as ``torchrun --nproc_per_node=2 tests/_strategy_worker.py --out results.pt --ckpt-dir DIR`` (2 processes:
variants), or with ``--resume-from DIR`` (any number of processes: load a 2-process FSDP checkpoint, train one step).
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F

import ratelab
from ratelab.core.dist import DistInfo, barrier, cleanup, init_distributed
from ratelab.train.optim import build_optimizer
from ratelab.train.strategy import Strategy, build_strategy

GLOBAL_BATCH = 16
STEPS = 3
LR = 1e-3
CLIP = 1.0


def make_batches(steps: int = STEPS, seed: int = 123) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(GLOBAL_BATCH, 1, 16, 16, generator=g), torch.randint(0, 10, (GLOBAL_BATCH,), generator=g))
        for _ in range(steps)
    ]


def build(
    strategy_name: str,
    dist: DistInfo,
    *,
    init_seed: int = 0,
    activation_checkpointing: bool = False,
    mixed_precision: str = "none",
    force_wrapper: bool = False,
) -> tuple[Strategy, torch.nn.Module, torch.nn.Module, torch.optim.Optimizer]:
    """Model, wrapped model and AdamW, in the trainer's order (wrap before the optimizer)."""
    torch.manual_seed(init_seed)
    model = ratelab.create_model("test_crate", num_classes=10, img_size=16, in_chans=1)
    if force_wrapper:
        # Hide CRATE's own switch so activation checkpointing takes the checkpoint_wrapper path (used by models
        # without set_grad_checkpointing).
        model.set_grad_checkpointing = None
    # Count block forwards: activation checkpointing shows up as a second forward per block and step.
    model.block_calls = 0

    def count(*_: Any) -> None:
        model.block_calls += 1

    for blk in model.blocks:
        blk.register_forward_pre_hook(count)
    strategy = build_strategy(strategy_name, dist)
    wrapped = strategy.wrap(model, activation_checkpointing=activation_checkpointing, mixed_precision=mixed_precision)
    opt = build_optimizer(model, name="adamw", lr=LR, weight_decay=0.05)
    return strategy, model, wrapped, opt


def local_slices(dist: DistInfo, accum: int) -> list[slice]:
    """This rank's contiguous part of the global batch, cut into ``accum`` contiguous micro-batches."""
    per_rank = GLOBAL_BATCH // dist.world_size
    per_micro = per_rank // accum
    start = dist.rank * per_rank
    return [slice(start + m * per_micro, start + (m + 1) * per_micro) for m in range(accum)]


def train(
    strategy: Strategy,
    model: torch.nn.Module,
    wrapped: torch.nn.Module,
    opt: torch.optim.Optimizer,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    accum: int = 1,
    probe: dict[str, Any] | None = None,
) -> list[float]:
    """One optimizer step per batch; returns the gradient norms (before clipping)."""
    params = [p for p in model.parameters() if p.requires_grad]
    norms = []
    wrapped.train()
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        for m, sl in enumerate(local_slices(strategy.dist, accum)):
            last = m == accum - 1
            with contextlib.nullcontext() if last else strategy.no_sync(wrapped):
                out = wrapped(x[sl])
                loss = F.cross_entropy(out, y[sl]) / accum
                loss.backward()
            if probe is not None:
                probe.setdefault("out_dtype", str(out.dtype))
            if not last and probe is not None and "after_no_sync" not in probe:
                probe["after_no_sync"] = _grad_probe(strategy, params)
        norm = strategy.grad_norm(params)
        strategy.clip_grads_with_norm_(params, CLIP, norm)
        opt.step()
        norms.append(norm.item())
    return norms


def _grad_probe(strategy: Strategy, params: list[torch.Tensor]) -> dict[str, Any]:
    """What a micro-step under no_sync left behind: are the ranks' gradients still their own?"""
    grads = [p.grad for p in params if p.grad is not None]
    out: dict[str, Any] = {"n_grads": len(grads)}
    if grads and strategy.dist.distributed and strategy.name == "ddp":
        flat = torch.cat([g.reshape(-1) for g in grads])
        parts = [torch.empty_like(flat) for _ in range(strategy.dist.world_size)]
        torch_dist.all_gather(parts, flat)
        out["max_rank_diff"] = (parts[0] - parts[1]).abs().max().item()
    return out


def run_variants(dist: DistInfo, ckpt_dir: Path) -> dict[str, Any]:
    batches = make_batches()
    res: dict[str, Any] = {"world_size": dist.world_size}
    for name, strategy_name, accum, kwargs in [
        ("ddp", "ddp", 1, {}),
        ("ddp_accum2", "ddp", 2, {}),
        ("fsdp", "fsdp", 1, {}),
        ("fsdp_accum2", "fsdp", 2, {}),
        ("fsdp_ac", "fsdp", 1, {"activation_checkpointing": True}),
        ("fsdp_ac_wrapper", "fsdp", 1, {"activation_checkpointing": True, "force_wrapper": True}),
        ("fsdp_bf16", "fsdp", 1, {"mixed_precision": "bf16"}),
    ]:
        # Only rank 0 draws the reference initialization: both strategies must broadcast it (as DDP always did).
        seed = 0 if dist.rank == 0 else 100 + dist.rank
        strategy, model, wrapped, opt = build(strategy_name, dist, init_seed=seed, **kwargs)
        probe: dict[str, Any] = {}
        norms = train(strategy, model, wrapped, opt, batches, accum=accum, probe=probe)
        if name in ("ddp", "fsdp"):
            probe["finite"] = strategy.all_finite(model.parameters())
            # A NaN in rank 1's part only: every rank must hear of it.
            last = list(model.parameters())[-1]
            with torch.no_grad():
                local = last.to_local() if hasattr(last, "to_local") else last
                saved = local.clone()
                if dist.rank == 1:
                    local.view(-1)[0] = float("nan")
                probe["finite_with_nan_on_rank1"] = strategy.all_finite(model.parameters())
                local.copy_(saved)
        res[name] = {
            "type": type(strategy).__name__,
            "sd": strategy.full_state_dict(model),
            "norms": norms,
            "probe": probe,
            "param_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
            "param_types": sorted({type(p).__name__ for p in model.parameters()}),
            "block_calls": model.block_calls,
            "depth": len(model.blocks),
        }

    # Exact resume: 2 steps, checkpoint, everything rebuilt from another seed, load, 1 more step.
    strategy, model, wrapped, opt = build("fsdp", dist)
    train(strategy, model, wrapped, opt, batches[:2])
    path = strategy.checkpoint_path(ckpt_dir)
    strategy.save_checkpoint(path, model=model, optimizers={"main": opt}, extra={"step": 2, "note": "two steps"})
    # A second save over the first exercises the directory swap (the previous checkpoint is replaced, not merged).
    strategy.save_checkpoint(path, model=model, optimizers={"main": opt}, extra={"step": 2, "note": "two steps"})
    del strategy, model, wrapped, opt
    strategy, model, wrapped, opt = build("fsdp", dist, init_seed=1)
    found = strategy.checkpoint_exists(ckpt_dir)
    extra = strategy.load_checkpoint(found, model=model, optimizers={"main": opt})
    loaded_sd = strategy.full_state_dict(model)
    norms = train(strategy, model, wrapped, opt, batches[2:])
    res["fsdp_resume"] = {
        "sd": strategy.full_state_dict(model),
        "loaded_sd": loaded_sd,
        "extra": extra,
        "found": str(found),
        "norms": norms,
    }
    return res


def resume_one_step(dist: DistInfo, ckpt_dir: Path) -> dict[str, Any]:
    """Load the 2-process checkpoint on this job's world size and take the third step."""
    strategy, model, wrapped, opt = build("fsdp", dist, init_seed=1)
    extra = strategy.load_checkpoint(strategy.checkpoint_exists(ckpt_dir), model=model, optimizers={"main": opt})
    norms = train(strategy, model, wrapped, opt, make_batches()[2:])
    return {"sd": strategy.full_state_dict(model), "extra": extra, "norms": norms, "world_size": dist.world_size}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--ckpt-dir", type=Path)
    ap.add_argument("--resume-from", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist = init_distributed("cpu")
    try:
        res = resume_one_step(dist, args.resume_from) if args.resume_from else run_variants(dist, args.ckpt_dir)
        if dist.is_main:
            torch.save(res, args.out)
        # Every rank reaches the end before any tears its process group down: a gloo rank destroying its group while
        # the other still works aborted once in CI ("terminate called without an active exception").
        barrier()
    finally:
        cleanup()


if __name__ == "__main__":
    from ratelab.core.dist import exit_process

    main()
    exit_process(0)
