"""Training: one :class:`Trainer` for every task, a typed :class:`TrainConfig`, and the :class:`Task` protocol.

Example:
    >>> from ratelab.train import ClassificationTask, TrainConfig, Trainer
    >>> cfg = TrainConfig(model="crate_nano_patch4_16", dataset="digits", epochs=60, out_dir="runs/x")
    >>> result = Trainer(cfg, ClassificationTask()).fit()   # {"val_acc": ..., "val_loss": ..., ...}
"""

from ratelab.train.config import TrainConfig, add_config_args, config_from_args
from ratelab.train.ema import ModelEma
from ratelab.train.icl_task import ICLTask as ICLTask  # registers the "icl" task
from ratelab.train.mcr2_task import MCR2Task as MCR2Task  # registers the "mcr2" task
from ratelab.train.optim import build_optimizer, weight_decay_groups
from ratelab.train.schedule import WarmupCosine, warmup_cosine_lr
from ratelab.train.tasks import TASKS, ClassificationTask, Task, build_task, register_task
from ratelab.train.trainer import Trainer, TrainingDiverged

__all__ = [
    "TASKS",
    "ClassificationTask",
    "ICLTask",
    "ModelEma",
    "Task",
    "TrainConfig",
    "Trainer",
    "TrainingDiverged",
    "WarmupCosine",
    "add_config_args",
    "build_optimizer",
    "build_task",
    "config_from_args",
    "register_task",
    "warmup_cosine_lr",
    "weight_decay_groups",
]
