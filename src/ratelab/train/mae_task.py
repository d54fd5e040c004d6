"""Masked-autoencoder pre-training (MAE, He et al. 2022; CRATE-MAE, Pai et al. ICLR 2024).

:class:`MAETask` (task ``"mae"``) trains any registered model of the MAE convention -- ``model(imgs, mask_ratio,
noise=None) -> (loss, pred, mask)`` with the loss a mean over masked patches, ``patchify``/``unpatchify`` and
``forward_features`` for the encoder -- such as ``crate_mae_*`` and the matched ``mae_vit_*``. Labels are not used
for training.

Evaluation (every ``eval_every`` epochs):

* ``val_loss``: the reconstruction loss on held-out images with a fixed mask per image (the noise of image ``i``
  is drawn from a generator seeded by ``(seed, i)``), so every evaluation of a run, and two models evaluated with
  the same seed, see the same masks regardless of batch size or world size;
* ``val_probe_acc_cls`` / ``val_probe_acc_mean``: a linear probe of the frozen encoder's [CLS] and mean-pooled
  patch features, fitted on the un-augmented training split (:func:`ratelab.eval.probe.probe_encoder`);
* a reconstruction grid of the first ``n_recon`` validation images, ``out_dir/reconstructions/step{step}.png``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from ratelab.core.dist import all_reduce_sum
from ratelab.core.seeding import derive_seed
from ratelab.train.tasks import EvalContext, Task, TaskConfig, _dataset_kwargs, register_task

__all__ = ["IndexedDataset", "MAETask", "MAETaskConfig", "eval_noise"]

_EVAL_STREAM = 7919  # separates the evaluation masks' seeds from every other derived seed of a run


@dataclass
class MAETaskConfig(TaskConfig):
    """Options of the ``mae`` task (``--task mae --task.mask_ratio 0.75 ...``).

    Attributes:
        mask_ratio: fraction of patches masked per image (MAE and CRATE-MAE: 0.75).
        norm_pix_loss: regress per-patch normalized pixels (MAE's option; off in CRATE-MAE's code).
        probe: linear-probe the frozen encoder at every evaluation.
        probe_C: inverse L2 strength of the probe (scikit-learn convention).
        probe_max_fit: fit the probe on at most this many training images (None = all).
        n_recon: validation images in the reconstruction grid (0 = no grid).
    """

    name: str = "mae"
    mask_ratio: float = 0.75
    norm_pix_loss: bool = False
    probe: bool = True
    probe_C: float = 1.0
    probe_max_fit: int | None = None
    n_recon: int = 8

    def check(self) -> None:
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio: must be in [0, 1), got {self.mask_ratio!r}")
        if not self.probe_C > 0:
            raise ValueError(f"probe_C: must be > 0, got {self.probe_C!r}")
        if self.probe_max_fit is not None and self.probe_max_fit < 2:
            raise ValueError(f"probe_max_fit: must be >= 2 or None, got {self.probe_max_fit!r}")
        if self.n_recon < 0:
            raise ValueError(f"n_recon: must be >= 0, got {self.n_recon!r}")


class IndexedDataset(Dataset):
    """``dataset``'s items with their index appended: ``(*item, index)``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple:
        item = self.dataset[i]
        return (*item, i) if isinstance(item, tuple) else (item, i)

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.dataset, name)


def eval_noise(indices: torch.Tensor | list[int], num_patches: int, seed: int) -> torch.Tensor:
    """(B, num_patches) masking noise for the images ``indices``: each row from its own generator seeded by
    ``(seed, index)``, so an image's mask does not depend on the batch it is in."""
    rows = [torch.rand(num_patches, generator=torch.Generator().manual_seed(derive_seed(seed, _EVAL_STREAM, int(i))))
            for i in indices]
    return torch.stack(rows)


@register_task("mae", config=MAETaskConfig)
class MAETask(Task):
    """Masked-autoencoder pre-training (see the module docstring).

    Args:
        config: an :class:`MAETaskConfig` (or its fields as keyword options: ``MAETask(mask_ratio=0.5)``).
        train_dataset, val_dataset: datasets to use instead of building ``cfg.dataset`` (items ``(image, label)``).
        fit_dataset: the probe's fitting set; default the un-augmented training split when built from ``cfg``,
            else ``train_dataset``.
    """

    def __init__(self, config: MAETaskConfig | None = None, *, train_dataset: Dataset | None = None,
                 val_dataset: Dataset | None = None, fit_dataset: Dataset | None = None, **options: Any) -> None:
        super().__init__(config, **options)
        if (val_dataset is not None or fit_dataset is not None) and train_dataset is None:
            raise ValueError("MAETask: val_dataset/fit_dataset were given without train_dataset")
        self._given = train_dataset is not None
        self.train_dataset = train_dataset
        self.val_dataset = IndexedDataset(val_dataset) if val_dataset is not None else None
        self.fit_dataset = fit_dataset if fit_dataset is not None else train_dataset
        self.seed = 0

    # ---- data and model -------------------------------------------------------------------------------------
    def build_datasets(self, cfg: Any) -> tuple[Dataset, Dataset | None]:
        self.seed = cfg.seed
        if not self._given:
            from ratelab.data import build_dataset

            common = _dataset_kwargs(cfg)
            self.train_dataset = build_dataset(cfg.dataset, "train", augment=cfg.augment, **common)
            self.val_dataset = IndexedDataset(build_dataset(cfg.dataset, "val", **common))
            self.fit_dataset = build_dataset(cfg.dataset, "train", augment=False, **common)
        return self.train_dataset, self.val_dataset

    def model_kwargs(self, cfg: Any) -> dict[str, Any]:
        """``create_model`` keyword arguments: ``img_size``/``in_chans`` from the config or the dataset, and the
        task's ``norm_pix_loss`` when on (a model option in the MAE convention, off by default)."""
        kw = dict(cfg.model_kwargs)
        if "norm_pix_loss" in kw and bool(kw["norm_pix_loss"]) != self.config.norm_pix_loss:
            raise ValueError(f"model_kwargs: norm_pix_loss={kw['norm_pix_loss']} conflicts with the task's "
                             f"norm_pix_loss={self.config.norm_pix_loss}; set task.norm_pix_loss")
        if self.config.norm_pix_loss:  # only when on: the models' default is off, and a classifier has no such option
            kw["norm_pix_loss"] = True
        ds = self.train_dataset
        for name, value in (("img_size", cfg.img_size), ("in_chans", None)):
            if name not in kw:
                kw[name] = value if value is not None else getattr(ds, name, None)
        return kw

    def build_model(self, cfg: Any) -> nn.Module:
        from ratelab import create_model

        if self.train_dataset is None:
            raise RuntimeError("MAETask.build_model: call build_datasets first")
        model = create_model(cfg.model, **self.model_kwargs(cfg))
        if not (hasattr(model, "patchify") and hasattr(model, "forward_encoder")):
            from ratelab.core.errors import ConfigError

            raise ConfigError(f"model: {cfg.model!r} is not a masked autoencoder (no patchify/forward_encoder); the "
                              "mae task trains crate_mae_* and mae_vit_* models")
        return model

    # ---- training and evaluation ----------------------------------------------------------------------------
    def training_step(self, model: nn.Module, batch: Any, cfg: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        """Images -> the model's masked-patch reconstruction loss (a fresh random mask per image; the noise comes
        from torch's global generator, which the trainer seeds and checkpoints)."""
        loss, _, mask = model(batch[0], mask_ratio=self.config.mask_ratio)
        return loss, {"mask_frac": mask.detach().float().mean()}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, ctx: EvalContext) -> dict[str, float]:
        from ratelab.core.checkpoint import unwrap_model

        c = self.config
        out: dict[str, float] = {}
        net = unwrap_model(model)
        first = None
        if ctx.loader is not None:
            sums = torch.zeros(2, dtype=torch.float64, device=ctx.device)
            for b, batch in enumerate(ctx.loader):
                x = batch[0]
                n_patch = net.patchify(x[:1]).shape[1]
                if len(batch) >= 3:  # IndexedDataset: a mask per image, independent of batching
                    noise = eval_noise(batch[-1].tolist(), n_patch, self.seed)
                else:
                    g = torch.Generator().manual_seed(derive_seed(self.seed, _EVAL_STREAM, -1 - b))
                    noise = torch.rand(x.shape[0], n_patch, generator=g)
                noise = noise.to(x.device)
                loss, _, _ = model(x, mask_ratio=c.mask_ratio, noise=noise)
                sums += torch.stack([loss.double() * x.shape[0], torch.tensor(float(x.shape[0]), device=x.device,
                                                                               dtype=torch.float64)])
                if first is None:
                    first = (x[: c.n_recon], noise[: c.n_recon])
            loss_sum, n = all_reduce_sum(sums).tolist()
            if n:
                out["val_loss"] = loss_sum / n
        if c.n_recon and first is not None and ctx.dist.is_main and ctx.out_dir is not None:
            self._write_grid(net, first, ctx)
        if c.probe and self.fit_dataset is not None and self.val_dataset is not None:
            from ratelab.eval.probe import probe_encoder

            # Every rank probes the whole (small) sets, so the metric is the same everywhere without a gather.
            res = probe_encoder(net, self.fit_dataset, self.val_dataset, C=c.probe_C, device=ctx.device,
                                max_fit=c.probe_max_fit)
            out.update({f"val_{k}": v for k, v in res.items() if k.startswith("probe_acc")})
        return out

    def _write_grid(self, net: nn.Module, first: tuple[torch.Tensor, torch.Tensor], ctx: EvalContext) -> None:
        from pathlib import Path

        from ratelab.eval.reconstruction import reconstruct, reconstruction_figure

        parts = reconstruct(net, first[0], mask_ratio=self.config.mask_ratio, noise=first[1])
        fig = reconstruction_figure(parts, title=f"step {ctx.step}: held-out images, "
                                                 f"{self.config.mask_ratio:.0%} of patches masked")
        d = Path(ctx.out_dir) / "reconstructions"
        d.mkdir(parents=True, exist_ok=True)
        fig.savefig(d / f"step{ctx.step}{'_' + ctx.tag if ctx.tag else ''}.png", dpi=110, bbox_inches="tight")
