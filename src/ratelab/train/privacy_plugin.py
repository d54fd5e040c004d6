"""The ``privacy`` trainer plugin: DP-SGD with Poisson sampling, per-sample clipping, one noise draw, accounting.

Enable with ``TrainConfig(plugins={"privacy": {"target_epsilon": 8}})`` or ``--set plugins.privacy.target_epsilon=8``
(options: :class:`ratelab.privacy.PrivacyConfig`). One logical step of batch B over N examples:

1. Poisson sampling (:class:`~ratelab.train.data.PoissonBatchSampler`): every example joins with probability
   q = B/N, so batches vary in size and can be empty; an empty batch still takes a (pure-noise) step.
2. Per micro-batch (``physical_batch_size`` bounds it; ``accum_steps`` too): the task's per-example losses go to
   :func:`ratelab.privacy.clipped_backward`, which adds ``sum_i min(1, C/||g_i||) g_i`` to ``p.grad``
   (ghost clipping by default; opacus' hooks/functorch per-sample gradients as fallbacks).
3. Under DDP the trainer sums ``p.grad`` over the ranks (explicitly: variable batches), so every rank holds the
   clipped sum of the whole logical batch.
4. opacus' ``DPOptimizerFastGradientClipping`` adds N(0, sigma^2 C^2) ONCE to that sum, divides by the expected
   batch B (not the realised size: that is what the analysis assumes) and steps the wrapped optimizer. Every
   rank draws the same noise from a generator with the same seed and state: exactly one draw per logical step.
5. The ledger records the step (sigma, q); epsilon (RDP and PRV) is reported at every evaluation (``dp_*`` keys,
   in ``metrics.jsonl`` eval rows and ``final_metrics.json``), per epoch in ``out_dir/privacy.json``. A TAN
   simulation reports the simulated full-batch run's epsilon as ``tan_simulated_epsilon*`` (never ``dp_epsilon*``,
   which would read as this run's guarantee).

Task contract: ``Task.per_sample_loss = True`` and ``training_step(model, batch, cfg, per_sample=True)`` returns a
``(n,)`` vector, entry i depending on example i only (classification: cross-entropy per image; captioning: mean
cross-entropy over the caption's non-pad tokens). A task without it is refused at construction. A task that
releases something computed from the training data besides the weights (the caption task's vocabulary) defines
``check_private_release() -> list[str]``: it raises ConfigError for what it refuses, and returns a note for each
such release the user accepted; every note voids the guarantee (``dp_guarantee = 0``, said in ``privacy.json``).

Resumption: the checkpoint holds the ledger, the noise generator's state and the secret seed the Poisson batches are
drawn from (a batch is a pure function of that seed, the epoch and the step), so a killed and resumed run draws the
same batches and noise, spends the same epsilon and ends with the same weights.

Secrecy: the batches and the noise come from ``dp_seed`` (None: OS entropy, broadcast to every rank). The guarantee
covers the final weights only if that seed and the checkpoints stay private; raw (unclipped) gradient statistics are
never computed or logged. The training loss/accuracy rows are statistics of private batches too (as in opacus'
examples); treat ``metrics.jsonl`` as private.

Not covered: FSDP (refused), several optimizers (refused), secure (CSPRNG) noise.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

import torch
import torch.nn as nn

from ratelab.core.checkpoint import atomic_write_text
from ratelab.core.config import validate_dataclass
from ratelab.core.errors import ConfigError, TrainingDiverged
from ratelab.core.seeding import derive_seed
from ratelab.privacy import (
    PrivacyConfig,
    PrivacyLedger,
    clipped_backward,
    find_noise_multiplier,
    make_per_sample_module,
    tan_noise_multiplier,
)
from ratelab.privacy.clipping import non_leaf_parameters
from ratelab.train.data import PoissonBatchSampler, ShardedBatchSampler
from ratelab.train.plugins import Plugin, register_plugin

__all__ = ["PrivacyPlugin"]


class _ShuffledBatches(ShardedBatchSampler):
    """Fixed-size shuffled batches whose gradients the trainer sums explicitly over ranks (``poisson=False``).

    DDP's in-backward all-reduce cannot serve ghost clipping's two backward passes, hence ``fixed_size = False``.
    """

    fixed_size = False


@register_plugin("privacy", config=PrivacyConfig)
class PrivacyPlugin(Plugin):
    """DP-SGD as a trainer plugin (see the module docstring for the step, the task contract and resumption)."""

    allows_grad_stats = False
    step_on_empty_batch = True
    per_sample_loss = True

    def __init__(self, config: PrivacyConfig | None = None) -> None:
        super().__init__(config)
        validate_dataclass(self.config, prefix="plugins.privacy")
        c = self.config
        if c.tan_batch_size is not None and not c.poisson:
            raise ConfigError("plugins.privacy.tan_batch_size: TAN simulation needs poisson=True")
        self.max_micro_batch = c.physical_batch_size
        self.ledger = PrivacyLedger()
        self.per_epoch: list[dict[str, float]] = []
        self.module: nn.Module | None = None
        self.optimizer: Any = None
        self.trainer: Any = None
        self._seed: int | None = None
        self.generator: torch.Generator | None = None
        self._eps_cache: dict[str, Any] = {}
        self.release_notes: list[str] = []  # the task's accepted un-noised releases (each voids the guarantee)

    # ---- derived settings ---------------------------------------------------------------------------------------
    @property
    def no_guarantee_reasons(self) -> list[str]:
        """Why this run's epsilon is not a formal guarantee: the settings' reasons
        (:meth:`PrivacyConfig.no_guarantee_reasons`) and the task's accepted un-noised releases (``release_notes``)."""
        return [*self.config.no_guarantee_reasons(), *self.release_notes]

    @property
    def has_guarantee(self) -> bool:
        """Whether this run's epsilon is a formal guarantee (no reason against it)."""
        return not self.no_guarantee_reasons

    @property
    def guarantee_note(self) -> str:
        return self.config.guarantee_note(self.release_notes)

    @property
    def epsilon_key(self) -> str:
        """``dp_epsilon``, or ``tan_simulated_epsilon`` under TAN: the simulated run's epsilon is not this run's."""
        return "tan_simulated_epsilon" if self.config.tan_batch_size is not None else "dp_epsilon"

    def _expected_batch(self, global_batch: int) -> int:
        return self.config.tan_batch_size or global_batch

    def batch_sampler(self, n: int, *, global_batch: int, rank: int, world_size: int, seed: int, epoch: int,
                      start_step: int) -> Any:
        expected = self._expected_batch(global_batch)
        if global_batch > n or expected > n:
            raise ConfigError(f"batch_size: the expected batch {max(global_batch, expected)} exceeds the {n} training "
                              "examples (q = B/N must be <= 1)")
        # Before setup (the trainer asks for the epoch length first) no secret seed exists; that sampler is only
        # measured, never iterated.
        s = derive_seed(self._seed, 2) if self._seed is not None else seed
        if not self.config.poisson:
            return _ShuffledBatches(n, global_batch=expected, rank=rank, world_size=world_size, seed=s, epoch=epoch,
                                    start_step=start_step)
        # An epoch keeps the full-batch run's length (N / B steps) under TAN: same steps, smaller batches.
        return PoissonBatchSampler(n, sample_rate=expected / n, rank=rank, world_size=world_size, seed=s,
                                   epoch=epoch, start_step=start_step, steps=max(1, round(n / global_batch)))

    # ---- hooks ------------------------------------------------------------------------------------------------
    def setup(self, trainer: Any) -> None:
        c, cfg = self.config, trainer.cfg
        if trainer.strategy.name == "fsdp":
            raise ConfigError("plugins.privacy: strategy 'fsdp' is not supported under DP; use ddp or single")
        check = getattr(trainer.task, "check_private_release", None)
        self.release_notes = list(check()) if callable(check) else []
        self.trainer = trainer
        self.n = len(trainer.train_dataset)
        self.batch_size = cfg.batch_size
        self.sample_rate = cfg.batch_size / self.n
        self.delta = c.delta if c.delta is not None else 1.0 / self.n
        self.total_steps = int(trainer.total_steps)
        if c.noise_multiplier is not None:
            self.noise_multiplier = float(c.noise_multiplier)
        else:
            self.noise_multiplier = find_noise_multiplier(c.target_epsilon, self.delta, self.sample_rate,
                                                          self.total_steps, c.accountant)
        self.expected_batch = self._expected_batch(cfg.batch_size)
        self.applied_noise_multiplier = (tan_noise_multiplier(self.noise_multiplier, cfg.batch_size,
                                                              c.tan_batch_size)
                                         if c.tan_batch_size is not None else self.noise_multiplier)
        self._set_seed(self._initial_seed(trainer))
        if trainer.dist.is_main:
            print(f"[privacy] DP-SGD: sigma={self.noise_multiplier:.4g} (applied {self.applied_noise_multiplier:.4g}),"
                  f" C={c.max_grad_norm:g}, q={self.sample_rate:.4g} (B={cfg.batch_size} of N={self.n}), "
                  f"T={self.total_steps} steps, delta={self.delta:.3g}, clipping={c.clipping}, accountant="
                  f"{c.accountant}: {self.guarantee_note}", flush=True)

    def _initial_seed(self, trainer: Any) -> int:
        if self.config.dp_seed is not None:
            return int(self.config.dp_seed)
        seed = [secrets.randbits(63)]
        if trainer.dist.distributed:
            import torch.distributed as torch_dist

            torch_dist.broadcast_object_list(seed, src=0)
        return int(seed[0])

    def _set_seed(self, seed: int) -> None:
        self._seed = int(seed)
        device = self.trainer.device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(derive_seed(self._seed, 1))

    def wrap_model(self, model: nn.Module) -> nn.Module:
        self.module = make_per_sample_module(model, self.config.clipping)
        slow = non_leaf_parameters(model)
        if slow and self.trainer is not None and self.trainer.dist.is_main:
            print(f"[privacy] {slow} belong to modules with submodules: their per-sample gradients take a vmap over "
                  "those modules' whole forward (exact, slower); freeze them or move them into a leaf module",
                  flush=True)
        return self.module

    def wrap_optimizer(self, optimizer: Any, model: nn.Module) -> Any:
        if self.optimizer is not None:
            raise ConfigError("plugins.privacy: the task configures several optimizers; DP-SGD here supports one")
        from ratelab.privacy.noise import make_dp_optimizer

        # A trainable parameter the optimizer steps but the wrapped model does not own would get no clipping (hooks
        # and functorch leave its raw gradient in .grad): refuse it, as opacus' make_private does.
        owned = {id(p) for p in model.parameters()}
        foreign = [i for g in optimizer.param_groups for i, p in enumerate(g["params"])
                   if p.requires_grad and id(p) not in owned]
        if foreign:
            raise ConfigError(f"plugins.privacy: the optimizer steps {len(foreign)} trainable parameter(s) that are "
                              "not in the model (e.g. a task-owned scale); their gradients would not be clipped. "
                              "Make them part of the model or freeze them.")
        # p.grad arrives holding the clipped SUM (clipped_backward, all-reduced): this optimizer only adds the noise
        # and divides by the expected batch size.
        self.optimizer = make_dp_optimizer(  # opacus' DPOptimizerFastGradientClipping, noise added in place
            optimizer, noise_multiplier=self.applied_noise_multiplier, max_grad_norm=self.config.max_grad_norm,
            expected_batch_size=self.expected_batch, loss_reduction="mean", generator=self.generator)
        return self.optimizer

    def backward(self, losses: torch.Tensor, *, scaler: Any = None) -> None:
        try:
            clipped_backward(self.module, losses, max_grad_norm=self.config.max_grad_norm, scaler=scaler)
        except TrainingDiverged as e:
            step = self.trainer.step + 1
            raise TrainingDiverged(f"training diverged at step {step}: {e}", step=step, loss=float("nan")) from None

    def on_step_end(self, trainer: Any) -> dict[str, float]:
        # Every logical step is one composition, with or without examples or an update (conservative).
        self.ledger.step(self.noise_multiplier, self.sample_rate)
        if trainer.batch_in_epoch == trainer.steps_per_epoch:
            eps = self._epsilons()
            self.per_epoch.append({"epoch": trainer.epoch + 1, "step": trainer.step, "epsilon_rdp": eps["rdp"],
                                   "epsilon_prv": eps["prv"]})
        return {}

    def _epsilons(self) -> dict[str, float]:
        # The end of an epoch and its evaluation ask for the same history; PRV takes ~0.3-1.5 s.
        key = repr(self.ledger.history)
        if self._eps_cache.get("key") != key:
            self._eps_cache = {"key": key, "eps": self.ledger.epsilons(self.delta)}
        return dict(self._eps_cache["eps"])

    def epoch_metrics(self, trainer: Any) -> dict[str, float]:
        eps = self._epsilons()
        k = self.epsilon_key
        out = {
            k: eps[self.config.accountant],
            f"{k}_rdp": eps["rdp"],
            f"{k}_prv": eps["prv"],
            "dp_delta": self.delta,
            "dp_noise_multiplier": self.noise_multiplier,
            "dp_sample_rate": self.sample_rate,
            "dp_steps": float(self.ledger.steps),
            "dp_guarantee": 1.0 if self.has_guarantee else 0.0,
        }
        if self.config.tan_batch_size is not None:
            out["dp_tan_noise_multiplier"] = self.applied_noise_multiplier
        if trainer.dist.is_main:
            self._write_report(trainer, eps)
        return out

    def report(self, eps: dict[str, float] | None = None) -> dict[str, Any]:
        """Everything ``privacy.json`` holds: epsilon by accountant and by epoch, the history, what it means.

        Under TAN the epsilon keys are ``tan_simulated_epsilon*`` (here and in ``per_epoch``), else ``epsilon*``."""
        c = self.config
        eps = eps if eps is not None else self._epsilons()
        k = self.epsilon_key.removeprefix("dp_")  # epsilon, or tan_simulated_epsilon under TAN
        per_epoch = [{(f"{k}{key[len('epsilon'):]}" if key.startswith("epsilon") else key): v for key, v in e.items()}
                     for e in self.per_epoch]
        return {
            "guarantee": self.guarantee_note,
            "formal_guarantee": self.has_guarantee,
            "no_guarantee_reasons": self.no_guarantee_reasons,
            "accountant": c.accountant,
            k: eps[c.accountant],
            f"{k}_rdp": eps["rdp"],
            f"{k}_prv": eps["prv"],
            "delta": self.delta,
            "target_epsilon": c.target_epsilon,
            "noise_multiplier": self.noise_multiplier,
            "applied_noise_multiplier": self.applied_noise_multiplier,
            "max_grad_norm": c.max_grad_norm,
            "sample_rate": self.sample_rate,
            "batch_size": self.batch_size,
            "expected_batch_size_trained": self.expected_batch,
            "dataset_size": self.n,
            "steps": self.ledger.steps,
            "planned_steps": self.total_steps,
            "clipping": c.clipping,
            "poisson": c.poisson,
            "tan_batch_size": c.tan_batch_size,
            "history": self.ledger.history,
            "per_epoch": per_epoch,
        }

    def _write_report(self, trainer: Any, eps: dict[str, float]) -> None:
        trainer.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json.dumps(self.report(eps), indent=2), trainer.out_dir / "privacy.json")

    # ---- checkpoint -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "ledger": self.ledger.state_dict(),
            "per_epoch": [dict(e) for e in self.per_epoch],
            "seed": self._seed,
            "generator": self.generator.get_state() if self.generator is not None else None,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "delta": self.delta,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("sample_rate", "delta"):
            if abs(float(state[key]) - getattr(self, key)) > 1e-15 * max(1.0, abs(getattr(self, key))):
                raise ConfigError(f"resume: plugins.privacy.{key} was {state[key]!r}, now {getattr(self, key)!r} "
                                  "(did the dataset or the batch size change?)")
        saved_sigma = float(state["noise_multiplier"])
        if saved_sigma != self.noise_multiplier and self.trainer is not None and self.trainer.dist.is_main:
            print(f"[privacy] resume: keeping the run's sigma {saved_sigma:.6g} (solving again for the new length "
                  f"gave {self.noise_multiplier:.6g}); epsilon follows the steps actually taken", flush=True)
        self.noise_multiplier = saved_sigma
        c = self.config
        self.applied_noise_multiplier = (tan_noise_multiplier(saved_sigma, self.batch_size, c.tan_batch_size)
                                         if c.tan_batch_size is not None else saved_sigma)
        if self.optimizer is not None:
            self.optimizer.noise_multiplier = self.applied_noise_multiplier
        self.ledger.load_state_dict(state["ledger"])
        self.per_epoch = [dict(e) for e in state.get("per_epoch", [])]
        self._set_seed(int(state["seed"]))
        if state.get("generator") is not None:
            self.generator.set_state(state["generator"])
        if self.optimizer is not None:
            self.optimizer.generator = self.generator
