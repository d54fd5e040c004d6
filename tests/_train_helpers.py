"""Shared pieces of the trainer tests, and a runner script for the subprocess / torchrun tests.

As a script (``python tests/_train_helpers.py --config-json '{...}' [--sleep-per-step S] [--mode ddp] [--dump F]``)
it trains one run with the Trainer API. The only test hook is ``--sleep-per-step``: a task wrapper that sleeps
after every training step so that a test can SIGKILL the process mid-run; it lives here, not in the library.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from ratelab.train import ClassificationTask, TrainConfig, Trainer


def tiny_config(out_dir: str | Path, **overrides: Any) -> TrainConfig:
    """test_crate (2 x 32, 4x4 patches) on digits at 16x16, 1 channel: about 30 ms per step on one CPU thread.

    ``device="cpu"`` even where CUDA exists: these tests pin down CPU behaviour (bitwise resumption, gloo DDP).
    """
    base = dict(
        model="test_crate",
        dataset="digits",
        batch_size=64,
        epochs=2,
        lr=3e-3,
        warmup_epochs=0.5,
        log_every=1,
        progress=False,
        ckpt_every=0,
        out_dir=str(out_dir),
        seed=0,
        device="cpu",
    )
    base.update(overrides)
    return TrainConfig(**base)


class SlowTask(ClassificationTask):
    """Classification that sleeps after each step (wall-clock only; consumes no RNG)."""

    def __init__(self, sleep: float) -> None:
        super().__init__()
        self.sleep = sleep

    def training_step(self, model, batch, cfg):
        out = super().training_step(model, batch, cfg)
        time.sleep(self.sleep)
        return out


class CrashAt(ClassificationTask):
    """Raises ``RuntimeError("crash")`` when asked for its ``at``-th step (1-based), before computing it."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at, self.calls = at, 0

    def training_step(self, model, batch, cfg):
        self.calls += 1
        if self.calls == self.at:
            raise RuntimeError("crash")
        return super().training_step(model, batch, cfg)


class NaNAt(ClassificationTask):
    """Returns a NaN loss at its ``at``-th step (1-based), as an overflowing model would."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at, self.calls = at, 0

    def training_step(self, model, batch, cfg):
        self.calls += 1
        loss, metrics = super().training_step(model, batch, cfg)
        if self.calls == self.at:
            loss = loss * float("nan")
        return loss, metrics


def read_rows(out_dir: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    rows = [json.loads(ln) for ln in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [r for r in rows if kind is None or r.get("kind") == kind]


def _gather_checks(out: Path) -> None:
    """all_gather_with_grad / all_gather_tensor / all_reduce_mean on this rank; writes inputs and grads."""
    import torch.distributed as dist

    from ratelab.core.dist import all_gather_tensor, all_gather_with_grad, all_reduce_mean

    r, w = dist.get_rank(), dist.get_world_size()
    x = (torch.arange(6.0).reshape(3, 2) + 10 * r).requires_grad_(True)
    weight = torch.randn(3 * w, 2, generator=torch.Generator().manual_seed(100 + r))
    g = all_gather_with_grad(x)  # (3w, 2)
    loss = (g * weight).sum() + (r + 1) * (g**2).sum()  # a different loss on every rank
    loss.backward()
    plain = all_gather_tensor(x.detach())
    mean = all_reduce_mean(torch.tensor([float(r)]))
    mismatch = ""
    try:
        all_gather_tensor(torch.zeros(r + 1, 2))
    except ValueError as e:
        mismatch = str(e)
    torch.save(
        {
            "x": x.detach(),
            "weight": weight,
            "grad": x.grad,
            "gathered": g.detach(),
            "plain": plain,
            "mean": mean,
            "mismatch": mismatch,
        },
        out / f"gather_rank{r}.pt",
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config-json", required=True, help="TrainConfig as JSON")
    p.add_argument("--sleep-per-step", type=float, default=0.0, help="seconds to sleep after each step (kill tests)")
    p.add_argument("--mode", choices=("train", "ddp"), default="train", help="ddp: also run the collective checks")
    p.add_argument("--dump", default=None, help="rank 0 saves {'state', 'ema', 'result'} here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if '"test_' in args.config_json:
        import test_trainer_v2  # noqa: F401  (registers the test plugins the config names)
    cfg = TrainConfig.from_json(args.config_json)
    if args.mode == "ddp":
        from ratelab.core.dist import barrier, cleanup, init_distributed

        init_distributed("cpu")
        _gather_checks(Path(cfg.out_dir).parent)
    task = SlowTask(args.sleep_per_step) if args.sleep_per_step > 0 else ClassificationTask()
    trainer = Trainer(cfg, task)
    result = trainer.fit()
    if args.dump and trainer.dist.is_main:
        ema = trainer.ema_model.state_dict() if trainer.ema_model is not None else None
        torch.save({"state": trainer.model.state_dict(), "ema": ema, "result": result}, args.dump)
    if args.mode == "ddp":
        barrier()  # every rank done (rank 0 just wrote the dump) before any tears the group down
        cleanup()
    return 0


if __name__ == "__main__":
    from ratelab.core.dist import exit_process

    exit_process(main())
