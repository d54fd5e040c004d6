"""torchrun worker for the emergency-checkpoint test: one rank raises in a training step, the others do not.

``python -m torch.distributed.run ... tests/_emergency_worker.py --config-json '{...}' --rank R --at K``
"""

from __future__ import annotations

import argparse
import os

import torch

from ratelab.train import ClassificationTask, TrainConfig, Trainer


class CrashOnRank(ClassificationTask):
    def __init__(self, rank: int, at: int) -> None:
        super().__init__()
        self.rank, self.at, self.calls = rank, at, 0

    def training_step(self, model, batch, cfg):
        self.calls += 1
        if self.calls == self.at and int(os.environ.get("RANK", "0")) == self.rank:
            raise RuntimeError(f"crash on rank {self.rank}")
        return super().training_step(model, batch, cfg)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config-json", required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--at", type=int, required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    Trainer(TrainConfig.from_json(args.config_json), CrashOnRank(args.rank, args.at)).fit()
    return 0


if __name__ == "__main__":
    from ratelab.core.dist import exit_process

    exit_process(main())
