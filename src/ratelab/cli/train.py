"""``ratelab train``: train a model with the one Trainer; every TrainConfig field is an option.

Single process: ``ratelab train --model crate_nano_patch4_16 --dataset digits --epochs 60 --out-dir runs/x``.
Task options: ``ratelab train --task mcr2 --task.eps 0.5`` (or ``--set task.eps=0.5``); a YAML/JSON base with
``--config run.yaml``. Several processes: ``torchrun --nproc_per_node=N -m ratelab train ...`` (``--batch-size``
stays the global batch; ``--strategy fsdp`` shards the model).

Resume: ``ratelab train --out-dir X --resume`` continues the run saved in X with ITS settings (read from the
checkpoint). Options given together with ``--resume`` are checked against them: a setting that may change
(run length, logging, checkpoint interval, device, workers) is applied and logged; any other difference is an
error naming it.
"""

from __future__ import annotations

import argparse
import json
import os

_EPILOG = """\
task options (set with --task.OPTION VALUE or --set task.OPTION=VALUE; see `ratelab train --list-tasks`):
{tasks}
examples:
  ratelab train --model crate_nano_patch4_16 --dataset digits --epochs 40 --out-dir runs/digits
  ratelab train --out-dir runs/digits --resume                  # continue exactly, with the saved settings
  ratelab train --out-dir runs/digits --resume --epochs 60      # a longer run (logged; schedule keeps its length)
  ratelab train --task mcr2 --model mcr2_mlp_small --img-size 8 --task.eps 0.5 --out-dir runs/mcr2
  ratelab train --config run.yaml --set task.feature_dim=64 --accum-steps 4
  torchrun --nproc_per_node=2 -m ratelab train --strategy fsdp --model crate_nano_patch4_16 --out-dir runs/fsdp
"""


def _task_help() -> str:
    from dataclasses import fields

    from ratelab.train import TASKS

    lines = []
    for name in sorted(TASKS):
        opts = [f"{f.name}={getattr(TASKS[name].Config(), f.name)!r}" for f in fields(TASKS[name].Config)
                if f.name != "name"]
        lines.append(f"  {name}: " + (", ".join(opts) if opts else "(no options)"))
    return "\n".join(lines)


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ratelab.train.config import TrainConfig, add_config_args

    p = sub.add_parser(
        "train",
        help="train a model (classification and other tasks)",
        description="Train a registered model on a registered dataset. Options map one-to-one onto "
        "ratelab.train.TrainConfig fields; --config FILE (JSON or YAML) supplies a base, explicit options override "
        "it, --set KEY=VALUE and --task.OPTION VALUE set any dotted key. Writes OUT_DIR/config.json, metrics.jsonl, "
        "checkpoints/, model.safetensors and final_metrics.json. Under torchrun the same command trains "
        "data-parallel; --batch-size is global. With several processes, each sample's augmentation is seeded by "
        "(seed, epoch, index), so N processes see what one process sees (--no-seeded-augmentation: one RNG "
        "stream per rank).",
        epilog=_EPILOG.format(tasks=_task_help()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(p, TrainConfig)
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument("--list-tasks", action="store_true", help="list the registered tasks and their options")
    p.set_defaults(func=run, accepts_extra=True)


def _is_rank0() -> bool:
    # The process group does not exist yet when the config is printed; torchrun's RANK says who we are.
    return os.environ.get("RANK", "0") == "0"


def resolve_config(args: argparse.Namespace, extra: list[str] | None = None):
    """The run's config: the command line over the defaults, or, with ``--resume``, over the saved run's config."""
    from ratelab.train import TrainConfig
    from ratelab.train.config import config_from_args
    from ratelab.train.trainer import read_checkpoint_config

    if getattr(args, "resume", False):
        out_dir = getattr(args, "out_dir", None)
        if out_dir is None:
            from ratelab.core.errors import ConfigError

            raise ConfigError("--resume: give the run directory with --out-dir")
        _, saved = read_checkpoint_config(out_dir)
        return config_from_args(args, TrainConfig, extra=extra, base=saved)
    return config_from_args(args, TrainConfig, extra=extra)


def run(args: argparse.Namespace, extra: list[str] | None = None) -> int:
    from ratelab.train import Trainer, build_task

    if args.list_tasks:
        print(_task_help())
        return 0
    cfg = resolve_config(args, extra)
    if _is_rank0():
        print("[train] config:\n" + cfg.to_json(), flush=True)
    if args.print_config:
        return 0
    result = Trainer(cfg, build_task(cfg)).fit()
    if _is_rank0():
        print("[train] final metrics:\n" + json.dumps(result, indent=2), flush=True)
    return 0


__all__ = ["add_parser", "resolve_config", "run"]
