"""Training: one :class:`Trainer` for every task, a typed :class:`TrainConfig`, the :class:`Task` base class with its
hooks, trainer :class:`Plugin` s and data-parallel strategies.

Example:
    >>> from ratelab.train import ClassificationTask, TrainConfig, Trainer
    >>> cfg = TrainConfig(model="crate_nano_patch4_16", dataset="digits", epochs=60, out_dir="runs/x")
    >>> result = Trainer(cfg, ClassificationTask()).fit()   # {"val_acc": ..., "val_loss": ..., ...}
"""

from ratelab.core.errors import TrainingDiverged
from ratelab.train.caption_task import CaptionTask as CaptionTask  # registers the "caption" task
from ratelab.train.caption_task import CaptionTaskConfig
from ratelab.train.config import TrainConfig, add_config_args, config_from_args
from ratelab.train.ema import ModelEma
from ratelab.train.icl_task import ICLTask as ICLTask  # registers the "icl" task
from ratelab.train.icl_task import ICLTaskConfig
from ratelab.train.mae_task import MAETask as MAETask  # registers the "mae" task
from ratelab.train.mae_task import MAETaskConfig
from ratelab.train.mcr2_task import MCR2Task as MCR2Task  # registers the "mcr2" task
from ratelab.train.mcr2_task import MCR2TaskConfig
from ratelab.train.optim import build_optimizer, weight_decay_groups
from ratelab.train.plugins import PLUGINS, Plugin, register_plugin
from ratelab.train.privacy_plugin import PrivacyPlugin as PrivacyPlugin  # registers the "privacy" plugin
from ratelab.train.schedule import WarmupCosine, warmup_cosine_lr
from ratelab.train.tasks import (
    TASKS,
    ClassificationConfig,
    ClassificationTask,
    EvalContext,
    OptimizerSpec,
    Task,
    TaskConfig,
    build_task,
    register_task,
)
from ratelab.train.trainer import Trainer
from ratelab.train.var_task import VARTask as VARTask  # registers the "var" task
from ratelab.train.var_task import VARTaskConfig
from ratelab.train.vqvae_task import VQVAETask as VQVAETask  # registers the "vqvae" task
from ratelab.train.vqvae_task import VQVAETaskConfig

__all__ = [
    "CaptionTask",
    "CaptionTaskConfig",
    "PLUGINS",
    "TASKS",
    "ClassificationConfig",
    "ClassificationTask",
    "EvalContext",
    "ICLTask",
    "ICLTaskConfig",
    "MAETask",
    "MAETaskConfig",
    "MCR2Task",
    "MCR2TaskConfig",
    "ModelEma",
    "OptimizerSpec",
    "Plugin",
    "PrivacyPlugin",
    "Task",
    "TaskConfig",
    "TrainConfig",
    "Trainer",
    "TrainingDiverged",
    "VQVAETask",
    "VQVAETaskConfig",
    "VARTask",
    "VARTaskConfig",
    "WarmupCosine",
    "add_config_args",
    "build_optimizer",
    "build_task",
    "config_from_args",
    "register_plugin",
    "register_task",
    "warmup_cosine_lr",
    "weight_decay_groups",
]
