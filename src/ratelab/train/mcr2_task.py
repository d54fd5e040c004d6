"""MCR² training: learn features that maximize the coding rate reduction (Yu et al., NeurIPS 2020).

:class:`MCR2Task` (registered as task ``"mcr2"``) trains any registered model whose *head* outputs ``feature_dim``
numbers: the model is built with ``create_model(cfg.model, num_classes=feature_dim, ...)``, so the classifier head
of a library model acts as the feature projection (as in the official code, where the ResNet's last linear layer
maps to the 128-d feature space). Features are L2-normalized row-wise (the official code's last operation) and the
loss is :func:`ratelab.objectives.rate_reduction.mcr2_loss` (= -gamma2 R + Rc; -Delta R at gamma1 = gamma2 = 1).

Evaluation (every ``eval_every`` epochs): nearest-subspace accuracy on the validation set, with class subspaces
fitted to the (un-augmented) *training* features and training labels -- noisy labels included when the training set
is corrupted, as in the official ``evaluate.py`` -- plus R, Rc and Delta R of the validation features.

The small feature networks used with it on digits (``mcr2_cnn_small``, ``mcr2_mlp_small``) live in
:mod:`ratelab.models.mcr2_nets` and are registered with every other model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ratelab.core.dist import is_dist
from ratelab.core.errors import ConfigError
from ratelab.train.config import TrainConfig
from ratelab.train.tasks import EvalContext, Task, TaskConfig, _dataset_kwargs, register_task

__all__ = ["EPS_OFFICIAL", "MCR2Task", "MCR2TaskConfig", "extract_features"]

# The official training scripts pass eps^2 = 0.5 (their argument named ``eps`` is epsilon squared, design note §1.4);
# ratelab's objectives take epsilon itself, so the same setting is sqrt(0.5).
EPS_OFFICIAL = math.sqrt(0.5)


# ---- features --------------------------------------------------------------------------------------------------


@torch.no_grad()
def extract_features(
    fn: Any, data: Dataset | Any, *, device: str | torch.device = "cpu", batch_size: int = 512,
    normalize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``fn`` (a model or a callable such as ``model.forward_features``) to a whole dataset or loader.

    Args:
        fn: maps (B, C, H, W) images to (B, d) features.
        data: a map-style dataset of ``(image, label, ...)`` items (read in order) or an iterable of batches.
        device: where to compute.
        batch_size: batch size when ``data`` is a dataset.
        normalize: L2-normalize every feature row (MCR² features).

    Returns:
        ``(features (n, d) float32 on CPU, labels (n,) int64 on CPU)``.
    """
    loader = DataLoader(data, batch_size=batch_size, shuffle=False) if isinstance(data, Dataset) else data
    feats, labels = [], []
    for batch in loader:
        z = fn(batch[0].to(device)).float()
        feats.append((F.normalize(z, dim=1) if normalize else z).cpu())
        labels.append(torch.as_tensor(batch[1]).cpu())
    if not feats:
        raise ValueError("extract_features: the data yielded no batch")
    return torch.cat(feats), torch.cat(labels).long()


# ---- the task --------------------------------------------------------------------------------------------------


@dataclass
class MCR2TaskConfig(TaskConfig):
    """Options of the ``mcr2`` task (``--task mcr2 --task.eps 0.5 ...``).

    Attributes:
        feature_dim: output width of the model's head = feature dimension d (official: 128).
        eps: precision epsilon, NOT squared (default sqrt(0.5), the official eps^2 = 0.5).
        gamma1: weight inside R's logdet (official option ``gam1``, 1 = plain MCR²).
        gamma2: weight of R in the loss (official option ``gam2``, 1 = plain MCR²).
        num_classes: number of label classes K; default ``cfg.num_classes``, else the training dataset's.
        n_components: principal directions per class for nearest-subspace evaluation (official default 30).
        centered: nearest subspace with class means subtracted (official reported variant) or not.
        probe: also report a logistic-regression linear probe accuracy (``val_probe_acc``) at each evaluation.
    """

    name: str = "mcr2"
    feature_dim: int = 128
    eps: float = EPS_OFFICIAL
    gamma1: float = 1.0
    gamma2: float = 1.0
    num_classes: int | None = None
    n_components: int = 30
    centered: bool = True
    probe: bool = False

    def check(self) -> None:
        if self.feature_dim < 1:
            raise ValueError(f"feature_dim: must be a positive int, got {self.feature_dim!r}")
        if not (self.eps > 0 and math.isfinite(self.eps)):
            raise ValueError(f"eps: must be a finite positive number (epsilon, not squared), got {self.eps!r}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"num_classes: must be a positive int, got {self.num_classes!r}")
        if self.n_components < 1:
            raise ValueError(f"n_components: must be a positive int, got {self.n_components!r}")


@register_task("mcr2", config=MCR2TaskConfig)
class MCR2Task(Task):
    """Supervised MCR² feature learning (see the module docstring).

    Args:
        config: an :class:`MCR2TaskConfig` (or give its fields as keyword options: ``MCR2Task(feature_dim=32)``).
        train_dataset, val_dataset: datasets to use instead of building ``cfg.dataset`` (items ``(image, label)``).
        fit_dataset: the data the class subspaces (and the probe) are fitted on at evaluation time; default: an
            un-augmented copy of the training split when built from ``cfg``, else ``train_dataset`` itself (pass an
            un-augmented view with the same labels if ``train_dataset`` augments).

    Under DDP (``torch.distributed`` initialized) the training loss all-gathers the features of the global batch
    first, so every rank computes the rates of the whole batch; evaluation runs the (small) fit set on every rank
    and gathers the validation features. The loss is a function of the whole batch, so gradient accumulation over
    micro-batches would change the objective (``supports_accumulation = False``).
    """

    supports_accumulation = False

    def __init__(
        self,
        config: MCR2TaskConfig | None = None,
        *,
        train_dataset: Dataset | None = None,
        val_dataset: Dataset | None = None,
        fit_dataset: Dataset | None = None,
        **options: Any,
    ) -> None:
        try:
            super().__init__(config, **options)
        except ConfigError as e:
            raise ConfigError(f"MCR2Task: {e}") from None
        if (val_dataset is not None or fit_dataset is not None) and train_dataset is None:
            raise ValueError("MCR2Task: val_dataset/fit_dataset were given without train_dataset")
        c = self.config
        self.feature_dim, self.eps, self.gamma1, self.gamma2 = c.feature_dim, float(c.eps), c.gamma1, c.gamma2
        self.n_components, self.centered, self.probe = c.n_components, c.centered, c.probe
        self._given = train_dataset is not None
        self.train_dataset, self.val_dataset = train_dataset, val_dataset
        self.fit_dataset = fit_dataset if fit_dataset is not None else train_dataset
        self._num_classes_arg = c.num_classes
        self.num_classes: int | None = c.num_classes

    # ---- data and model -------------------------------------------------------------------------------------
    def build_datasets(self, cfg: TrainConfig) -> tuple[Dataset, Dataset | None]:
        if not self._given:
            from ratelab.data import build_dataset

            common = _dataset_kwargs(cfg)
            self.train_dataset = build_dataset(cfg.dataset, "train", augment=cfg.augment, **common)
            self.val_dataset = build_dataset(cfg.dataset, "val", **common)
            self.fit_dataset = build_dataset(cfg.dataset, "train", augment=False, **common)
        K = self._num_classes_arg or cfg.num_classes or getattr(self.train_dataset, "num_classes", None)
        if K is None:
            raise ValueError(
                "MCR2Task: cannot tell the number of classes; pass num_classes= to the task or set cfg.num_classes"
            )
        self.num_classes = int(K)
        return self.train_dataset, self.val_dataset

    def model_kwargs(self, cfg: TrainConfig) -> dict[str, Any]:
        """Keyword arguments for ``create_model``: ``num_classes`` is the feature dimension (the head projects)."""
        kw = dict(cfg.model_kwargs)
        if "num_classes" in kw and kw["num_classes"] != self.feature_dim:
            raise ValueError(
                f"model_kwargs: num_classes={kw['num_classes']} conflicts with MCR2Task(feature_dim="
                f"{self.feature_dim}); for MCR² the head width is the feature dimension, set feature_dim instead"
            )
        kw["num_classes"] = self.feature_dim
        ds = self.train_dataset
        for name, value in (("img_size", cfg.img_size), ("in_chans", None)):
            if name not in kw:
                kw[name] = value if value is not None else getattr(ds, name, None)
        return kw

    def build_model(self, cfg: TrainConfig) -> nn.Module:
        from ratelab import create_model

        if self.train_dataset is None:
            raise RuntimeError("MCR2Task.build_model: call build_datasets first")
        return create_model(cfg.model, **self.model_kwargs(cfg))

    # ---- loss -----------------------------------------------------------------------------------------------
    def loss(self, features: torch.Tensor, labels: torch.Tensor, *, distributed: bool = False
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """MCR² loss of raw head outputs (B, d): row-normalize (in float32 at least), then ``mcr2_loss``."""
        from ratelab.objectives.rate_reduction import mcr2_loss

        z = F.normalize(features.float(), dim=1)
        return mcr2_loss(z, labels, self.eps, num_classes=self.num_classes, gamma1=self.gamma1, gamma2=self.gamma2,
                         distributed=distributed)

    def training_step(self, model: nn.Module, batch: Any, cfg: TrainConfig) -> tuple[torch.Tensor, dict[str, Any]]:
        """(B, C, H, W) images, (B,) labels -> (-Delta R of the global batch, {delta_R, R, Rc})."""
        x, y = batch[0], batch[1]
        loss, stats = self.loss(model(x), y, distributed=is_dist())
        return loss, {k: stats[k].detach() for k in ("delta_R", "R", "Rc")}

    # ---- evaluation -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module, ctx: EvalContext) -> dict[str, float]:
        """Nearest-subspace accuracy (``val_acc``), optional probe accuracy, and the rates of the val features."""
        from ratelab.eval.subspace import linear_probe, nearest_subspace_fit, nearest_subspace_predict

        loader, dist = ctx.loader, ctx.dist
        if loader is None:
            return {}
        if self.fit_dataset is None:
            raise RuntimeError("MCR2Task.evaluate: no fit dataset (call build_datasets first)")
        fit_z, fit_y = extract_features(model, self.fit_dataset, device=dist.device, normalize=True)
        val_z, val_y = extract_features(model, loader, device=dist.device, normalize=True)
        if is_dist():
            # Shards can differ in length by one, so gather Python objects rather than equal-shape tensors.
            parts: list[Any] = [None] * dist.world_size
            torch.distributed.all_gather_object(parts, (val_z, val_y))
            val_z, val_y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        fit = nearest_subspace_fit(fit_z, fit_y, self.n_components, num_classes=self.num_classes,
                                   centered=self.centered)
        pred = nearest_subspace_predict(fit, val_z)
        # After the gather every rank holds every validation row, so each computes the same global numbers.
        acc = float((pred == val_y).float().mean()) if len(val_y) else float("nan")
        _, stats = self.loss(val_z, val_y)
        out = {"val_acc": acc, **{f"val_{k}": float(stats[k]) for k in ("delta_R", "R", "Rc")}}
        if self.probe:
            out["val_probe_acc"] = linear_probe(fit_z, fit_y, val_z, val_y)["test_acc"]
        return out
