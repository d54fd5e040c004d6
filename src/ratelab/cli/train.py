"""``ratelab train``: train a model with the one Trainer; every TrainConfig field is an option.

Single process: ``ratelab train --model crate_nano_patch4_16 --dataset digits --epochs 60 --out-dir runs/x``.
Several processes: ``torchrun --nproc_per_node=N -m ratelab train ...`` (``--batch-size`` stays the global batch).
"""

from __future__ import annotations

import argparse
import json
import os


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ratelab.train.config import TrainConfig, add_config_args

    p = sub.add_parser(
        "train",
        help="train a model (classification and other tasks)",
        description="Train a registered model on a registered dataset. Options map one-to-one onto "
        "ratelab.train.TrainConfig fields; --config FILE (JSON or YAML) supplies a base, explicit options override "
        "it. Writes OUT_DIR/config.json, metrics.jsonl, checkpoints/last.pt, model.safetensors and "
        "final_metrics.json. Under torchrun the same command trains data-parallel; --batch-size is global.",
    )
    add_config_args(p, TrainConfig)
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.set_defaults(func=run)


def _is_rank0() -> bool:
    # The process group does not exist yet when the config is printed; torchrun's RANK says who we are.
    return os.environ.get("RANK", "0") == "0"


def run(args: argparse.Namespace) -> int:
    from ratelab.train import Trainer, build_task, config_from_args

    cfg = config_from_args(args)
    if _is_rank0():
        print("[train] config:\n" + cfg.to_json(), flush=True)
    if args.print_config:
        return 0
    # TrainingDiverged (a RuntimeError) propagates: `ratelab` prints it on one line and exits with status 1.
    result = Trainer(cfg, build_task(cfg.task)).fit()
    if _is_rank0():
        print("[train] final metrics:\n" + json.dumps(result, indent=2), flush=True)
    return 0
