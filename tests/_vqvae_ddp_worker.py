"""Worker for tests/test_var_vqvae_ddp.py, launched by torchrun with 2 gloo processes: the ``vqvae`` task with the
patch-GAN and dead-code restarts, trained by the Trainer. Every rank writes its tokenizer, usage buffer and
discriminator to ``<out>/rank<r>.pt``, so the test can check that the ranks stayed identical."""

from __future__ import annotations

import argparse
import json
import os

import torch

from ratelab.train import TrainConfig, Trainer, build_task


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config-json", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = TrainConfig.from_dict(json.loads(args.config_json))
    task = build_task(cfg)
    trainer = Trainer(cfg, task)
    res = trainer.fit()
    rank = int(os.environ.get("RANK", "0"))
    torch.save({"model": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
                "disc": {k: v.detach().clone() for k, v in task.disc.state_dict().items()},
                "restarted": res.get("train_restarted"), "ema_updates": task.ema_updates},
               f"{args.out}/rank{rank}.pt")
    return 0


if __name__ == "__main__":
    from ratelab.core.dist import exit_process

    exit_process(main())
