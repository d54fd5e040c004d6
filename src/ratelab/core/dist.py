"""Distributed helpers: one setup call, rank-0 printing, and collectives that are no-ops in a single process.

Every helper works unchanged when ``torch.distributed`` is not initialized (one process, world size 1), so code
written against them runs the same under ``python`` and under ``torchrun --nproc_per_node=N``.

Launch detection follows torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``). The backend is ``nccl`` on CUDA and ``gloo`` on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "all_gather_tensor",
    "all_gather_with_grad",
    "all_reduce_mean",
    "all_reduce_sum",
    "barrier",
    "exit_process",
    "cleanup",
    "get_dist_info",
    "init_distributed",
    "is_dist",
    "is_main",
    "print0",
    "resolve_device",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job.

    Attributes:
        rank: global rank (0 in a single process).
        local_rank: rank on this machine; selects the CUDA device.
        world_size: number of processes.
        device: the device this process computes on.
    """

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str | torch.device = "auto", *, local_rank: int = 0) -> torch.device:
    """``"auto"`` -> ``cuda:<local_rank>`` when CUDA is available, else ``cpu``; ``"cuda"`` gets the local index.

    Raises:
        ValueError: ``device`` names CUDA but none is available, or is not a device string.
    """
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device: {device!r} is not a device ('auto', 'cpu', 'cuda', 'cuda:1', ...)") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} was requested but CUDA is not available; use 'cpu' or 'auto'")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
    return dev


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as e:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from e


def is_dist() -> bool:
    """True when a process group is up (and has more than one member)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_dist_info(device: str | torch.device = "auto") -> DistInfo:
    """Describe the current process without initializing anything."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    local_rank = _env_int("LOCAL_RANK", 0) if world > 1 else 0
    dev = resolve_device(device, local_rank=local_rank)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=dev)


def init_distributed(device: str | torch.device = "auto") -> DistInfo:
    """Join the torchrun job described by the environment, or describe a single process.

    With ``WORLD_SIZE`` > 1 this initializes the default process group (``nccl`` for CUDA, ``gloo`` for CPU) unless
    one is already up, and pins this process to ``cuda:LOCAL_RANK``. With no torchrun environment it does nothing.

    Args:
        device: ``"auto"``, ``"cpu"``, ``"cuda"``; ``"cuda"`` becomes ``cuda:LOCAL_RANK``.

    Returns:
        The frozen :class:`DistInfo` of this process.
    """
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        return DistInfo(rank=0, local_rank=0, world_size=1, device=resolve_device(device))
    local_rank = _env_int("LOCAL_RANK", 0)
    dev = resolve_device(device, local_rank=local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ValueError(f"WORLD_SIZE={world} but {missing} are not set; launch with torchrun")
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank=dist.get_rank(), local_rank=local_rank, world_size=dist.get_world_size(), device=dev)


def cleanup() -> None:
    """Destroy every process group if one is up.

    Unreferenced DDP reducers and gloo work objects are collected first, while the group still exists: a gloo work
    item that outlives its group is destroyed during interpreter shutdown, where it aborts the process
    ("terminate called without an active exception") after the run itself succeeded.
    """
    if dist.is_available() and dist.is_initialized():
        import gc

        gc.collect()
        dist.destroy_process_group()


def exit_process(code: int = 0) -> None:
    """End a torchrun worker with ``code`` without the interpreter's finalization.

    After :func:`cleanup`, the only work left is tearing down C++ objects (gloo transport threads, the intra-op
    pool) in an order torch does not control, which sometimes aborts a process whose run succeeded (exit code -6,
    "terminate called without an active exception"; pytorch/pytorch#190489 describes the mechanism). Output is
    flushed first; nothing else is pending by then (checkpoints are written atomically before this point).
    """
    import sys

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(int(code))


def is_main() -> bool:
    """True on rank 0 (and in a single process)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def print0(*args: Any, **kwargs: Any) -> None:
    """``print`` on rank 0 only (flushed, so interleaving with other ranks' stderr stays readable)."""
    if is_main():
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def barrier() -> None:
    """Wait for every rank; a no-op in a single process."""
    if is_dist():
        dist.barrier()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over ranks (a new tensor; ``x`` is not modified)."""
    if not is_dist():
        return x.clone()
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ranks (a new tensor; ``x`` is not modified)."""
    if not is_dist():
        return x.clone()
    return all_reduce_sum(x) / dist.get_world_size()


_MAX_NDIM = 8


def _check_same_shape(x: torch.Tensor) -> None:
    # all_gather needs equal shapes on every rank; a mismatch would otherwise hang or fail with a backend error.
    if x.ndim > _MAX_NDIM:
        raise ValueError(f"all_gather: tensors with more than {_MAX_NDIM} dims are not supported, got {x.ndim}")
    code = torch.full((_MAX_NDIM + 1,), -1, dtype=torch.int64, device=x.device)
    code[0] = x.ndim
    code[1 : x.ndim + 1] = torch.tensor(x.shape, dtype=torch.int64)
    codes = [torch.empty_like(code) for _ in range(dist.get_world_size())]
    dist.all_gather(codes, code)
    if any(not torch.equal(c, code) for c in codes):
        got = [tuple(c[1 : int(c[0]) + 1].tolist()) for c in codes]
        raise ValueError(f"all_gather: every rank must pass the same shape, got {got} (in rank order)")


def all_gather_tensor(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, without gradient.

    Args:
        x: (n, ...) local tensor; every rank must pass the same shape.

    Returns:
        (world_size * n, ...), rank 0's rows first. In a single process, ``x`` itself.
    """
    if not is_dist():
        return x
    _check_same_shape(x)
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts, dim=0)


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: all_gather and concatenate. Backward: sum the incoming gradients over ranks, keep the local slice.

    Summing is right because rank r's rows feed the loss of *every* rank: d(sum_q L_q)/d x_r = sum_q dL_q/d rows_r.
    Under DDP, which averages parameter gradients, the result is the gradient of ``mean_q L_q`` -- exactly the
    single-process gradient when every rank computes the same global loss from the gathered tensor.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        ctx.rank, ctx.n = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, keeping the autograd path to the local rows.

    Needed when a loss couples samples across ranks (e.g. MCR^2 over a global batch of features). Every rank must
    call this the same number of times in the same order, and must run backward through it (the backward is a
    collective).

    Args:
        x: (n, ...) local tensor; every rank must pass the same shape.

    Returns:
        (world_size * n, ...) tensor; the gradient w.r.t. ``x`` is the sum over ranks of the gradients flowing into
        this rank's rows (see :class:`_AllGatherWithGrad`). In a single process, ``x`` itself.
    """
    if not is_dist():
        return x
    _check_same_shape(x)
    return _AllGatherWithGrad.apply(x)
