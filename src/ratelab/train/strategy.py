"""How a model is spread over processes: one process, DDP (replicated) or FSDP2 (sharded).

The trainer is written once against :class:`Strategy`; :func:`build_strategy` picks the implementation:

* ``single``: one process; the model is used as it is.
* ``ddp``: :class:`~torch.nn.parallel.DistributedDataParallel`. Every rank holds the whole model and its optimizer
  state; gradients are averaged by all-reduce during backward.
* ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) on every block and then on the root, so each rank keeps
  ``1 / world_size`` of every parameter, gradient and optimizer state, and all-gathers one block's parameters at a
  time for its forward and backward. Works with ``nccl`` on GPUs and with ``gloo`` on CPUs.

Call order (every method marked *collective* must be called by every rank, in the same order)::

    strategy = build_strategy(cfg.strategy, dist)
    wrapped = strategy.wrap(model, activation_checkpointing=..., mixed_precision=...)  # before the optimizer
    optimizer = build_optimizer(model, ...)          # FSDP2 has replaced the parameters by DTensor shards
    if (path := strategy.checkpoint_exists(out_dir)) is not None:
        extra = strategy.load_checkpoint(path, model=model, optimizers={"main": optimizer})
    for micro_step in range(accum_steps):             # gradient accumulation
        ctx = strategy.no_sync(wrapped) if micro_step < accum_steps - 1 else contextlib.nullcontext()
        with ctx:
            (loss_fn(wrapped(x_micro)) / accum_steps).backward()
    norm = strategy.grad_norm(params)                 # collective under FSDP
    ok = strategy.all_finite(model.parameters())      # collective; local shards + one scalar all-reduce
    strategy.clip_grads_with_norm_(params, max_norm, norm)
    optimizer.step()
    strategy.save_checkpoint(strategy.checkpoint_path(out_dir), model=model, optimizers=..., extra=...)  # collective
    final = strategy.full_state_dict(model)           # collective; rank 0 gets the weights, the others None
    strategy.close()                                  # at the end of the run (in a ``finally``)

Checkpoint layout (``out_dir/checkpoints/``):

* ``single`` / ``ddp``: ``last.pt``, one ``torch.save`` file written by rank 0 through a temporary file and an
  atomic rename: ``{"model": <full state dict, the model's own keys>, "optimizers": {name: optimizer.state_dict()},
  **extra}``.
* ``fsdp``: ``last/``, a directory: the ``torch.distributed.checkpoint`` (DCP) files of ``{"model": ...,
  "optimizers": {name: ...}}`` (``.metadata`` plus one ``__<rank>_0.distcp`` per rank, each rank writing its own
  shards), ``extra.pt`` (``torch.save`` of ``extra``, rank 0) and ``strategy.json`` (format version, world size,
  optimizer names; written last). It is written into ``.last.tmp/`` and swapped in by two renames (``last`` ->
  ``.last.old``, ``.last.tmp`` -> ``last``); a process killed at any point leaves a complete checkpoint, which
  :meth:`FSDPStrategy.checkpoint_exists` finds (``last/``, or ``.last.old/`` when the kill fell between the two
  renames). All ranks must see one shared file system. DCP reshards on load, so an FSDP checkpoint resumes on any
  number of processes.

A checkpoint of one layout is not read by the other strategy family (an error says which strategy wrote it); the
final weights (``model.safetensors``) are the same for all three. Guide for users: ``docs/distributed.md``.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
import torch.nn as nn

from ratelab.core.checkpoint import (
    atomic_torch_save,
    atomic_write_text,
    load_state_dict_strict,
    load_torch_file,
    unwrap_model,
)
from ratelab.core.dist import DistInfo, barrier
from ratelab.core.errors import CheckpointError, ConfigError

__all__ = [
    "FSDP_CHECKPOINT_VERSION",
    "MIXED_PRECISION",
    "STRATEGIES",
    "DDPStrategy",
    "FSDPStrategy",
    "SingleStrategy",
    "Strategy",
    "build_strategy",
]

STRATEGIES = ("single", "ddp", "fsdp")
MIXED_PRECISION = ("none", "bf16")
FSDP_CHECKPOINT_VERSION = 1
_RESERVED = ("model", "optimizers")  # top-level keys of a checkpoint that ``extra`` may not use
_FILE_CKPT = "last.pt"
_DIR_CKPT = "last"
_EXTRA = "extra.pt"
_META = "strategy.json"  # written last into an FSDP checkpoint: its presence marks the directory complete


Params = Iterable[torch.Tensor]


def _check_mixed_precision(mixed_precision: str) -> None:
    if mixed_precision not in MIXED_PRECISION:
        raise ConfigError(f"mixed_precision: must be one of {list(MIXED_PRECISION)}, got {mixed_precision!r}")


def _check_extra(extra: dict[str, Any]) -> None:
    clash = sorted(set(extra) & set(_RESERVED))
    if clash:
        raise ValueError(f"save_checkpoint: extra may not use the reserved keys {clash} (they hold the states)")


# What the ``.metadata`` pickle of a torch.distributed.checkpoint directory references: DCP's own dataclasses, tensor
# properties (dtype, layout, memory format, Size) and the directory's path.
_DCP_GLOBALS = {("torch.serialization", "_get_layout"), ("torch", "Size"), ("collections", "OrderedDict"),
                ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
                ("pathlib", "PureWindowsPath"), ("pathlib", "Path")}


class _DcpMetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        ok = (module.startswith("torch.distributed.checkpoint.") or (module, name) in _DCP_GLOBALS
              or (module == "torch" and isinstance(getattr(torch, name, None),
                                                   (torch.dtype, torch.layout, torch.memory_format))))
        if not ok:
            raise pickle.UnpicklingError(f"GLOBAL {module}.{name} is not part of a checkpoint's metadata")
        return super().find_class(module, name)


def check_dcp_metadata(directory: str | os.PathLike) -> None:
    """Refuse a sharded checkpoint whose ``.metadata`` would run code when torch unpickles it.

    ``torch.distributed.checkpoint`` reads that file with an unrestricted ``pickle.load``. It is unpickled here
    first with an unpickler that admits only what DCP writes there, so a tampered file is refused before DCP sees it.

    Raises:
        CheckpointError: the file is missing, unreadable or references anything else (named).
    """
    path = Path(directory) / ".metadata"
    try:
        with open(path, "rb") as f:
            _DcpMetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; {directory} is not a complete sharded checkpoint") from None
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused to load this sharded checkpoint: its metadata pickle references "
                              f"Python objects other than the checkpoint's own, and unpickling it could run "
                              f"arbitrary code. Detail: {e}") from None
    except Exception as e:  # a corrupt pickle raises anything from EOFError to ValueError
        raise CheckpointError(f"{path}: cannot read the sharded checkpoint's metadata ({type(e).__name__}: {e})") from e


def _check_names(path: Path, saved: Iterable[str], given: Iterable[str]) -> None:
    saved, given = sorted(saved), sorted(given)
    if saved != given:
        raise CheckpointError(f"{path}: holds the optimizers {saved}, but {given} were given to load into")


def _block_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP shards one at a time (and activation checkpointing wraps): ``fsdp_units()`` or ``blocks``.

    A model's own ``fsdp_units()`` wins over the ``blocks`` convention, so a family whose ``blocks`` are too small
    or too large to be good sharding units can say so.
    """
    if callable(getattr(model, "fsdp_units", None)):
        units = list(model.fsdp_units())
        source = f"{type(model).__name__}.fsdp_units()"
    elif isinstance(getattr(model, "blocks", None), (nn.ModuleList, nn.Sequential)):
        units = list(model.blocks.children())
        source = f"{type(model).__name__}.blocks"
    else:
        raise ConfigError(
            f"{type(model).__name__} has no `blocks` (an nn.ModuleList of its repeated layers) and no "
            f"`fsdp_units()` method returning the modules to shard one at a time; FSDP and activation "
            f"checkpointing need one of the two"
        )
    if not units or not all(isinstance(u, nn.Module) for u in units):
        raise ConfigError(f"{source} must give one or more nn.Module units, got {units!r}")
    return units


def _checkpoint_wrap_units(model: nn.Module, units: list[nn.Module]) -> list[nn.Module]:
    """Replace every unit by ``checkpoint_wrapper(unit)`` in its parent; state-dict keys stay unchanged."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    names = {id(m): name for name, m in model.named_modules()}
    wrapped = []
    for unit in units:
        name = names.get(id(unit))
        if not name:
            raise ConfigError(f"activation checkpointing: {type(unit).__name__} is not a submodule of the model")
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        # Non-reentrant checkpointing: correct with inputs that do not require grad and composes with FSDP2.
        w = checkpoint_wrapper(unit)
        setattr(parent, attr, w)
        wrapped.append(w)
    return wrapped


def _apply_activation_checkpointing(model: nn.Module) -> list[nn.Module]:
    """Recompute each block's activations in backward; returns the (possibly wrapped) units."""
    units = _block_units(model)
    if callable(getattr(model, "set_grad_checkpointing", None)):
        # The model checkpoints its own blocks (timm convention); its forward stays as written.
        model.set_grad_checkpointing(True)
        return units
    return _checkpoint_wrap_units(model, units)


class Strategy:
    """Base class: the single-process behaviour, which DDP and FSDP override where they differ.

    Args:
        dist: this process's place in the job (:func:`ratelab.core.dist.init_distributed`).
    """

    name = "single"
    # The checkpoint file or directory below ``out_dir/checkpoints`` (see the module docstring).
    checkpoint_name = _FILE_CKPT

    def __init__(self, dist: DistInfo) -> None:
        self.dist = dist
        self._owns_process_group = False

    def close(self) -> None:
        """Release what the strategy set up itself (FSDP's one-process group); call once, at the end of the run."""

    # ---- model -------------------------------------------------------------------------------------------------
    def wrap(
        self,
        model: nn.Module,
        *,
        find_unused_parameters: bool = False,
        activation_checkpointing: bool = False,
        mixed_precision: str = "none",
    ) -> nn.Module:
        """Prepare ``model`` (already on its device) for training; returns the module to call forward on.

        Must run before the optimizer is built (FSDP replaces the parameters).

        Args:
            model: the raw model.
            find_unused_parameters: DDP's flag (models with branches that some steps skip); ignored elsewhere.
            activation_checkpointing: recompute each block's activations in backward instead of storing them;
                through the model's ``set_grad_checkpointing`` when it has one, else ``checkpoint_wrapper`` on each
                block.
            mixed_precision: ``"none"``, or ``"bf16"`` (FSDP only: bf16 parameters for compute and fp32 gradient
                reduction). Single and DDP runs get mixed precision from the trainer's autocast instead.

        Raises:
            ConfigError: unknown ``mixed_precision``, or one this strategy does not apply; a model without blocks
                asked for activation checkpointing.
        """
        _check_mixed_precision(mixed_precision)
        if mixed_precision != "none":
            raise ConfigError(
                f"mixed_precision={mixed_precision!r} is a parameter-dtype policy of the fsdp strategy; with "
                f"{self.name!r} use the trainer's autocast (amp) instead"
            )
        if activation_checkpointing:
            _apply_activation_checkpointing(model)
        return model

    def no_sync(self, wrapped: nn.Module) -> contextlib.AbstractContextManager:
        """Context for every micro-step but the last: accumulate gradients locally, without communication."""
        return contextlib.nullcontext()

    # ---- gradients ---------------------------------------------------------------------------------------------
    def grad_norm(self, params: Params) -> torch.Tensor:
        """Global L2 norm of the gradients of ``params`` (a 0-dim tensor, the same on every rank).

        Collective under FSDP. Parameters without a gradient are skipped; none at all gives 0.
        """
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.dist.device)
        return torch.nn.utils.get_total_norm(grads, 2.0)

    def all_finite(self, tensors: Iterable[torch.Tensor]) -> bool:
        """True when no rank's part of ``tensors`` (weights, gradients) holds a NaN or inf. Collective.

        Looks at each rank's local shard (a sharded DTensor's ``to_local()``), so it costs one scalar all-reduce
        under any strategy.
        """
        local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
        bad = torch.zeros((), device=self.dist.device)
        for t in local:
            bad = bad + (~torch.isfinite(t.detach())).any().float()
        if torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
            torch_dist.all_reduce(bad, op=torch_dist.ReduceOp.SUM)
        return bool(bad.item() == 0)

    def clip_grads_with_norm_(self, params: Params, max_norm: float, total_norm: torch.Tensor) -> None:
        """Scale the gradients by ``min(1, max_norm / (total_norm + 1e-6))`` in place (torch's rule)."""
        torch.nn.utils.clip_grads_with_norm_(list(params), max_norm, total_norm)

    # ---- weights and checkpoints -------------------------------------------------------------------------------
    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """The complete state dict on the CPU with the model's own keys on rank 0, ``None`` on the others.

        Collective (every rank calls it). The tensors are copies: training on does not change them.
        """
        if not self.dist.is_main:
            return None
        return {k: v.detach().to("cpu", copy=True) for k, v in unwrap_model(model).state_dict().items()}

    def checkpoint_path(self, out_dir: str | os.PathLike) -> Path:
        """Where this strategy writes the run's training checkpoint: ``out_dir/checkpoints/<checkpoint_name>``."""
        return Path(out_dir) / "checkpoints" / self.checkpoint_name

    def checkpoint_exists(self, out_dir: str | os.PathLike) -> Path | None:
        """The checkpoint to resume ``out_dir`` from, or ``None`` when it has none.

        Raises:
            CheckpointError: ``out_dir`` holds a checkpoint of the other layout (FSDP vs single/DDP).
        """
        ckpt_dir = Path(out_dir) / "checkpoints"
        path = ckpt_dir / _FILE_CKPT
        if path.is_file():
            return path
        if _find_dir_checkpoint(ckpt_dir / _DIR_CKPT) is not None:
            raise CheckpointError(
                f"{ckpt_dir / _DIR_CKPT} is a sharded checkpoint written by the fsdp strategy; resume it with "
                f"--strategy fsdp (this run uses {self.name!r})"
            )
        return None

    def save_checkpoint(
        self,
        path: str | os.PathLike,
        *,
        model: nn.Module,
        optimizers: dict[str, torch.optim.Optimizer],
        extra: dict[str, Any],
    ) -> None:
        """Write ``{"model", "optimizers", **extra}`` atomically to the file ``path`` (rank 0). Collective.

        Args:
            path: the checkpoint file (:meth:`checkpoint_path`).
            model: the raw or the wrapped model (wrapper prefixes never reach the file).
            optimizers: every optimizer by name.
            extra: anything else to keep (trainer state, RNG states), identical or already gathered on rank 0.
        """
        _check_extra(extra)
        sd = self.full_state_dict(model)
        if self.dist.is_main:
            state = {"model": sd, "optimizers": {k: o.state_dict() for k, o in optimizers.items()}, **extra}
            atomic_torch_save(state, path)
        barrier()

    def load_checkpoint(
        self, path: str | os.PathLike, *, model: nn.Module, optimizers: dict[str, torch.optim.Optimizer]
    ) -> dict[str, Any]:
        """Load model and optimizer states in place (after :meth:`wrap` and after building the optimizers).

        Returns:
            ``extra`` as it was given to :meth:`save_checkpoint`.

        Raises:
            CheckpointError: unreadable file, keys that do not fit the model, other optimizer names, or a sharded
                FSDP checkpoint directory.
        """
        path = Path(path)
        if path.is_dir():
            raise CheckpointError(f"{path} is a sharded checkpoint directory of the fsdp strategy; use --strategy fsdp")
        ckpt = load_torch_file(path, what="training checkpoint")
        if not isinstance(ckpt, dict) or not all(k in ckpt for k in _RESERVED):
            keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
            raise CheckpointError(f"{path}: not a strategy checkpoint (needs 'model' and 'optimizers', has {keys})")
        load_state_dict_strict(unwrap_model(model), ckpt["model"], source=str(path))
        _check_names(path, ckpt["optimizers"], optimizers)
        for name, opt in optimizers.items():
            try:
                opt.load_state_dict(ckpt["optimizers"][name])
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{path}: optimizer {name!r} does not fit ({e})") from e
        return {k: v for k, v in ckpt.items() if k not in _RESERVED}


class SingleStrategy(Strategy):
    """One process: no wrapper, no communication."""

    name = "single"


class DDPStrategy(Strategy):
    """DistributedDataParallel: a full replica per rank, gradients averaged by all-reduce in backward."""

    name = "ddp"

    def wrap(
        self,
        model: nn.Module,
        *,
        find_unused_parameters: bool = False,
        activation_checkpointing: bool = False,
        mixed_precision: str = "none",
    ) -> nn.Module:
        super().wrap(model, activation_checkpointing=activation_checkpointing, mixed_precision=mixed_precision)
        from torch.nn.parallel import DistributedDataParallel

        dev = self.dist.device
        return DistributedDataParallel(
            model,
            device_ids=[dev.index] if dev.type == "cuda" else None,
            find_unused_parameters=find_unused_parameters,
        )

    def no_sync(self, wrapped: nn.Module) -> contextlib.AbstractContextManager:
        if not callable(getattr(wrapped, "no_sync", None)):
            raise TypeError(f"ddp no_sync: pass the module wrap() returned, got {type(wrapped).__name__}")
        return wrapped.no_sync()


class FSDPStrategy(Strategy):
    """FSDP2: parameters, gradients and optimizer states sharded over the ranks, one block gathered at a time."""

    name = "fsdp"
    checkpoint_name = _DIR_CKPT

    def wrap(
        self,
        model: nn.Module,
        *,
        find_unused_parameters: bool = False,
        activation_checkpointing: bool = False,
        mixed_precision: str = "none",
    ) -> nn.Module:
        """Shard each block (``fsdp_units()`` or ``blocks``), then the root; returns ``model`` itself.

        ``find_unused_parameters`` is not needed (FSDP2 reduces per block, whatever ran) and is ignored. Rank 0's
        weights are broadcast first, as DDP does, so the ranks need not have drawn the same initialization.
        ``mixed_precision="bf16"``: the gathered parameters (hence the compute) are bf16, gradients are reduced and
        kept in fp32, the sharded master weights and optimizer states stay fp32, and the model's output is cast to
        fp32. Autocast on top keeps its fp32 ops (norms, softmax) in fp32. Meant for GPUs; on a CPU it runs (gloo)
        but bf16 matmuls there are slow: useful for tests only.
        """
        _check_mixed_precision(mixed_precision)
        units = _apply_activation_checkpointing(model) if activation_checkpointing else _block_units(model)
        elsewhere = sorted({str(t.device) for t in [*model.parameters(), *model.buffers()]} - {str(self.dist.device)})
        if elsewhere:
            # The broadcast below and the mesh run on this device (nccl cannot send CPU tensors).
            raise ConfigError(f"fsdp: move the model to {self.dist.device} before wrap (found tensors on {elsewhere})")
        self._ensure_process_group()
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        self._broadcast_from_rank0(model)
        mesh = init_device_mesh(self.dist.device.type, (self.dist.world_size,))
        unit_kw: dict[str, Any] = {"mesh": mesh}
        root_kw: dict[str, Any] = {"mesh": mesh}
        if mixed_precision == "bf16":
            bf16, fp32 = torch.bfloat16, torch.float32
            unit_kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)
            # The root hands fp32 outputs to the loss (a cross-entropy over bf16 logits loses digits); between
            # the blocks activations stay bf16.
            root_kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32, output_dtype=fp32)
        for unit in units:
            fully_shard(unit, **unit_kw)
        fully_shard(model, **root_kw)  # the root: embeddings, head and whatever lies outside the units
        return model

    def _ensure_process_group(self) -> None:
        if torch_dist.is_initialized():
            return
        if self.dist.world_size != 1:
            raise ConfigError(f"strategy 'fsdp': world size {self.dist.world_size} but no process group; use torchrun")
        # One process (plain `python`, or torchrun with one process, where init_distributed creates no group):
        # FSDP2 and DCP still need a group, so make a private one-member group; close() destroys it.
        backend = "nccl" if self.dist.device.type == "cuda" else "gloo"
        torch_dist.init_process_group(backend, store=torch_dist.HashStore(), rank=0, world_size=1)
        self._owns_process_group = True

    def close(self) -> None:
        if self._owns_process_group and torch_dist.is_initialized():
            torch_dist.destroy_process_group()
        self._owns_process_group = False

    @staticmethod
    def _broadcast_from_rank0(model: nn.Module) -> None:
        # FSDP2 keeps each rank's own slice of its local tensors; without this, ranks seeded differently would
        # assemble a model that no rank ever built.
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                torch_dist.broadcast(t.data, src=0)

    def no_sync(self, wrapped: nn.Module) -> contextlib.AbstractContextManager:
        if not callable(getattr(wrapped, "set_requires_gradient_sync", None)):
            raise TypeError(f"fsdp no_sync: pass the module wrap() returned, got {type(wrapped).__name__}")
        return _fsdp_no_sync(wrapped)

    def grad_norm(self, params: Params) -> torch.Tensor:
        norm = super().grad_norm(params)
        # The norm of sharded DTensor gradients is a DTensor; full_tensor() is the all-reduce of the squared parts.
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # full_state_dict all-gathers every shard; cpu_offload keeps the result on rank 0 only (others get {}).
        sd = get_model_state_dict(
            unwrap_model(model), options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        return sd if self.dist.is_main else None

    def checkpoint_exists(self, out_dir: str | os.PathLike) -> Path | None:
        ckpt_dir = Path(out_dir) / "checkpoints"
        found = _find_dir_checkpoint(ckpt_dir / _DIR_CKPT)
        if found is None and (ckpt_dir / _FILE_CKPT).is_file():
            raise CheckpointError(
                f"{ckpt_dir / _FILE_CKPT} was written by the single/ddp strategy; resume it with --strategy ddp "
                f"(this run uses 'fsdp')"
            )
        return found

    def save_checkpoint(
        self,
        path: str | os.PathLike,
        *,
        model: nn.Module,
        optimizers: dict[str, torch.optim.Optimizer],
        extra: dict[str, Any],
    ) -> None:
        """Write the sharded checkpoint directory ``path`` (see the module docstring). Collective.

        ``extra`` is saved from rank 0 only: gather per-rank values (RNG states) into it beforehand.
        """
        import torch.distributed.checkpoint as dcp

        _check_extra(extra)
        final = Path(path)
        tmp, old = _tmp_and_old(final)
        if self.dist.is_main:
            if tmp.exists():  # left by a run killed while writing
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        barrier()
        # An optimizer that has not stepped yet has no state to keep; asking DCP for its state dict would run a
        # zero-lr step to create one (state_dict._init_optim_state) and so change the live run. It is left out.
        stepped = {k: o for k, o in optimizers.items() if o.state}
        dcp.save(self._dcp_state(model, stepped), checkpoint_id=str(tmp))
        if self.dist.is_main:
            torch.save(extra, tmp / _EXTRA)
            _fsync(tmp / _EXTRA)
            meta = {
                "format": "ratelab-fsdp-dcp",
                "version": FSDP_CHECKPOINT_VERSION,
                "world_size": self.dist.world_size,
                "optimizers": sorted(optimizers),
                "optimizers_with_state": sorted(stepped),
            }
            atomic_write_text(json.dumps(meta, indent=1) + "\n", tmp / _META)
            _commit_dir(tmp, final, old)
        barrier()

    def load_checkpoint(
        self, path: str | os.PathLike, *, model: nn.Module, optimizers: dict[str, torch.optim.Optimizer]
    ) -> dict[str, Any]:
        """Load a sharded checkpoint in place; any world size may read it (DCP reshards). Collective."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        given = Path(path)
        found = _find_dir_checkpoint(given)
        if found is None:
            what = "a file (single/ddp checkpoint; use --strategy ddp)" if given.is_file() else "not a complete one"
            raise CheckpointError(f"{given}: no FSDP checkpoint directory there ({what})")
        meta = json.loads((found / _META).read_text())
        if meta.get("version") != FSDP_CHECKPOINT_VERSION:
            raise CheckpointError(f"{found / _META}: version {meta.get('version')}, this ratelab reads "
                                  f"{FSDP_CHECKPOINT_VERSION}")
        _check_names(found, meta["optimizers"], optimizers)
        raw = unwrap_model(model)
        # The current (sharded) states give DCP the layout to read into; it fills them in place.
        stepped = {k: optimizers[k] for k in meta["optimizers_with_state"]}  # the others stay as built
        state = self._dcp_state(raw, stepped)
        check_dcp_metadata(found)
        try:
            dcp.load(state, checkpoint_id=str(found))
        except Exception as e:  # DCP reports a per-rank failure list; keep the path in front of it
            raise CheckpointError(f"{found}: cannot load the sharded checkpoint ({type(e).__name__}: {e})") from e
        set_model_state_dict(raw, state["model"])
        for name, opt in stepped.items():
            set_optimizer_state_dict(raw, opt, state["optimizers"][name])
        return load_torch_file(found / _EXTRA, what="training checkpoint")

    @staticmethod
    def _dcp_state(model: nn.Module, optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        raw = unwrap_model(model)
        # Keys are the model's parameter names (FQNs), so the files do not depend on the world size or wrapping.
        return {
            "model": get_model_state_dict(raw),
            "optimizers": {k: get_optimizer_state_dict(raw, o) for k, o in optimizers.items()},
        }


@contextlib.contextmanager
def _fsdp_no_sync(wrapped: nn.Module) -> Iterator[None]:
    # Gradients of the micro-steps accumulate unsharded on each rank until the last backward reduce-scatters them.
    wrapped.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        wrapped.set_requires_gradient_sync(True)


# ---- directory checkpoints: atomic replace ------------------------------------------------------------------------


def _tmp_and_old(final: Path) -> tuple[Path, Path]:
    return final.with_name(f".{final.name}.tmp"), final.with_name(f".{final.name}.old")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit_dir(tmp: Path, final: Path, old: Path) -> None:
    """Swap the complete directory ``tmp`` in as ``final``: two renames, the previous one kept until the second.

    POSIX cannot rename a directory over a non-empty one, so the swap is ``final -> old``, ``tmp -> final``, then
    ``old`` is deleted. A kill between the renames leaves ``old`` complete, and :func:`_find_dir_checkpoint` falls
    back to it.
    """
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync(final.parent)
    if old.exists():
        shutil.rmtree(old)


def _is_complete(path: Path) -> bool:
    return path.is_dir() and (path / _META).is_file() and (path / ".metadata").is_file()


def _find_dir_checkpoint(final: Path) -> Path | None:
    """``final`` when complete, else its previous version ``.<name>.old`` when that is complete, else ``None``."""
    if _is_complete(final):
        return final
    old = _tmp_and_old(final)[1]
    return old if _is_complete(old) else None


def build_strategy(name: str, dist: DistInfo) -> Strategy:
    """The strategy called ``name`` for this process.

    ``ddp`` in a one-process job gives :class:`SingleStrategy` (DDP over one rank only adds overhead). ``fsdp`` in
    one process creates a private one-member process group in ``wrap`` (FSDP2 and DCP need one; :meth:`Strategy.close`
    destroys it), so an FSDP checkpoint can be resumed, or the bf16 policy used, on a single device.

    Raises:
        ConfigError: unknown name, or ``single`` in a job of several processes.
    """
    if name not in STRATEGIES:
        raise ConfigError(f"strategy: must be one of {list(STRATEGIES)}, got {name!r}")
    if name == "single":
        if dist.distributed:
            raise ConfigError(f"strategy 'single' in a job of {dist.world_size} processes; use 'ddp' or 'fsdp'")
        return SingleStrategy(dist)
    if name == "ddp":
        return DDPStrategy(dist) if dist.distributed else SingleStrategy(dist)
    return FSDPStrategy(dist)
