"""Training VAR / M-VAR on the tokens of a frozen multi-scale tokenizer (task ``"var"``).

The recipe of FoundationVision/VAR (``train.py``, ``trainer.py``, ``utils/lr_control.py``, ``utils/arg_util.py``;
M-VAR's README: the same settings), re-written:

* images -> the frozen tokenizer's ``img_to_idx`` (K token maps) -> ``idx_to_var_input`` (the teacher-forcing input)
  and the target ``cat(idx_k)``; the tokenizer is loaded by the task and moved to the device in ``setup`` (every
  rank holds a copy; it is never trained, never sharded and never saved with the model);
* loss: cross-entropy over all L tokens, each weighted 1/L, averaged over the batch (the run's
  ``label_smoothing``, 0 in VAR); label dropout to the null class with probability ``label_dropout`` (0.1), done by
  the model in train mode (``cond_drop_rate``);
* AdamW with betas (0.9, 0.95), peak lr = ``tblr * global_batch / 256`` (tblr 1e-4 by default; the README's d24 /
  d30 commands set 8e-5, and d30 ``twde`` 0.08: not chosen by model name, set them), weight decay ``twd`` annealed by
  a cosine to ``twde`` over the run, no decay on 1-D tensors, biases and the names of :data:`NO_DECAY_KEYS`;
  gradient clip ``grad_clip`` (2.0). These task options replace the run's ``lr`` (unless ``tblr=None``),
  ``weight_decay``, ``betas``, ``grad_clip`` and warmup settings, which this task does not read;
* schedule ``lin0``: warmup over ``wp`` of the run (1/50: VAR's ``ep / 50`` epochs) from ``wp0`` (0.005) of the peak,
  the peak held for 5 % of the remaining steps, then linear to ``wpe`` (0.01; the README uses 0.1 for d12-d20) of
  the peak at the last step (:class:`VARSchedule`, also the official ``lin`` / ``cos`` shapes).

Evaluation: ``val_loss`` and ``val_acc`` (teacher-forced token accuracy, the label kept), and, unless the model is
sharded (``--strategy fsdp``: sampling needs the whole model on one rank), a grid of ``n_samples`` generated
images per class for the first ``n_sample_classes`` classes, ``out_dir/samples/step{step}.png``, drawn with
``cfg``/``top_k``/``top_p`` from a fixed seed.

Works with ``--strategy ddp`` and ``--strategy fsdp`` (the models' ``blocks`` are the FSDP units).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from ratelab.core.dist import all_reduce_sum
from ratelab.core.errors import ConfigError
from ratelab.train.data import ToPM1
from ratelab.train.tasks import EvalContext, OptimizerSpec, Task, TaskConfig, _dataset_kwargs, register_task

__all__ = ["NO_DECAY_KEYS", "VARSchedule", "VARTask", "VARTaskConfig", "var_lr_factor", "var_param_groups"]

# Official nowd_keys (train.py) in ratelab's names: pos_1LC -> pos_embed, scale_mul_1H11 -> logit_scale; the others
# (gamma, beta, ada_gss) have no tensor in ratelab's models but are kept so that user subclasses behave the same.
NO_DECAY_KEYS = ("cls_token", "start_token", "task_token", "cfg_token", "pos_start", "pos_embed", "pos_1LC",
                 "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias", "scale_mul", "logit_scale")
SCHEDULES = ("lin0", "lin", "cos")


@dataclass
class VARTaskConfig(TaskConfig):
    """Options of the ``var`` task (``--task var --task.tokenizer PATH ...``).

    Attributes:
        tokenizer: the frozen tokenizer: a ratelab model directory / run directory (a ``vqvae`` task run) or a
            registry name loaded with its pretrained weights (``var_vae_ch160v4096z32``, from the local weights
            directory).
        tokenizer_kwargs: extra ``create_model`` options for a registry-name tokenizer.
        label_dropout: probability of the null class per training example (the model's ``cond_drop_rate``).
        tblr: base lr; peak lr = tblr * global batch / 256 (None: the run's ``lr`` as it is).
        twd: initial weight decay; twde: final (None = twd).
        wp: warmup fraction of the run (VAR: ep / 50 epochs, i.e. 0.02).
        wp0: lr at the first step, as a fraction of the peak.
        wpe: lr at the last step, as a fraction of the peak.
        sche: ``lin0`` (VAR's default), ``lin`` (hold 15 %) or ``cos``.
        betas: AdamW betas.
        grad_clip: gradient clipping norm (VAR: 2.0).
        n_samples: images per class in the evaluation grid (0 = no sampling).
        n_sample_classes: classes in the grid (the first ones).
        cfg: guidance of the grid's samples; top_k, top_p: its filters.
    """

    name: str = "var"
    tokenizer: str = "var_vae_ch160v4096z32"
    tokenizer_kwargs: dict[str, Any] = field(default_factory=dict)
    label_dropout: float = 0.1
    tblr: float | None = 1e-4
    twd: float = 0.05
    twde: float | None = None
    wp: float = 0.02
    wp0: float = 0.005
    wpe: float = 0.01
    sche: str = "lin0"
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 2.0
    n_samples: int = 4
    n_sample_classes: int = 10
    cfg: float = 1.5
    top_k: int = 900
    top_p: float = 0.96

    def check(self) -> None:
        if not 0 <= self.label_dropout < 1:
            raise ConfigError(f"task.label_dropout: must be in [0, 1), got {self.label_dropout!r}")
        if self.sche not in SCHEDULES:
            raise ConfigError(f"task.sche: must be one of {SCHEDULES}, got {self.sche!r}")
        if not 0 <= self.wp < 1:
            raise ConfigError(f"task.wp: must be in [0, 1), got {self.wp!r}")
        if self.tblr is not None and not self.tblr > 0:
            raise ConfigError(f"task.tblr: must be > 0 or None, got {self.tblr!r}")
        if self.n_samples < 0 or self.n_sample_classes < 0:
            raise ConfigError("task.n_samples and task.n_sample_classes must be >= 0")


def var_lr_factor(step: int, *, total_steps: int, warmup_steps: int, sche: str = "lin0", wp0: float = 0.005,
                  wpe: float = 0.01) -> float:
    """lr / peak at 0-based ``step`` of ``total_steps`` (``lr_wd_annealing`` of VAR's ``utils/lr_control.py``)."""
    if step < warmup_steps:
        return wp0 + (1 - wp0) * step / warmup_steps
    t = min((step - warmup_steps) / max(total_steps - 1 - warmup_steps, 1), 1.0)  # 0 -> 1 after the warmup
    if sche == "cos":
        return wpe + (1 - wpe) * (0.5 + 0.5 * math.cos(math.pi * t))
    hold = 0.05 if sche == "lin0" else 0.15
    if t < hold:
        return 1.0
    return wpe + (1 - wpe) * (1 - t) / (1 - hold)


class VARSchedule:
    """Sets lr (by :func:`var_lr_factor`) and the weight decay (cosine from ``twd`` to ``twde``) of every group;
    groups without decay keep 0. Call :meth:`step` after every optimizer step; the state is the step count."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, peak_lr: float, total_steps: int, warmup_steps: int,
                 sche: str, wp0: float, wpe: float, twd: float, twde: float) -> None:
        self.optimizer = optimizer
        self.peak_lr, self.total_steps, self.warmup_steps = peak_lr, int(total_steps), int(warmup_steps)
        self.sche, self.wp0, self.wpe, self.twd, self.twde = sche, wp0, wpe, twd, twde
        self.last_step = 0
        self._apply()

    def _apply(self) -> None:
        s = self.last_step
        lr = self.peak_lr * var_lr_factor(s, total_steps=self.total_steps, warmup_steps=self.warmup_steps,
                                          sche=self.sche, wp0=self.wp0, wpe=self.wpe)
        t = min(s / max(self.total_steps - 1, 1), 1.0)
        wd = self.twde + (self.twd - self.twde) * (0.5 + 0.5 * math.cos(math.pi * t))
        for g in self.optimizer.param_groups:
            g["lr"] = lr
            g["weight_decay"] = wd * g.get("wd_scale", 1.0)

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_step = int(state["last_step"])
        self._apply()


def var_param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """VAR's ``filter_params``: no decay for 1-D tensors, ``*bias`` and names containing :data:`NO_DECAY_KEYS`."""
    decay, no_decay, dn, nn_ = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith("bias") or any(k in name for k in NO_DECAY_KEYS):
            no_decay.append(p)
            nn_.append(name)
        else:
            decay.append(p)
            dn.append(name)
    groups = [{"params": decay, "param_names": dn, "wd_scale": 1.0},
              {"params": no_decay, "param_names": nn_, "wd_scale": 0.0}]
    return [g for g in groups if g["params"]]


@register_task("var", config=VARTaskConfig)
class VARTask(Task):
    """Next-scale prediction on a frozen tokenizer's token pyramid (see the module docstring).

    Args:
        config: a :class:`VARTaskConfig` (or its fields as keyword options).
        train_dataset, val_dataset: datasets instead of ``cfg.dataset`` (items ``(image, label)`` normalized by the
            dataset's ``mean``/``std`` attributes; without them images must already be in [-1, 1]).
        tokenizer: a tokenizer module to use instead of loading ``config.tokenizer``.
    """

    def __init__(self, config: VARTaskConfig | None = None, *, train_dataset: Dataset | None = None,
                 val_dataset: Dataset | None = None, tokenizer: nn.Module | None = None, **options: Any) -> None:
        super().__init__(config, **options)
        self.config.check()
        if val_dataset is not None and train_dataset is None:
            raise ValueError("VARTask: val_dataset was given without train_dataset")
        self._given = train_dataset is not None
        self.train_dataset, self.val_dataset = train_dataset, val_dataset
        self.tokenizer = tokenizer
        self._pm1 = ToPM1()
        self.sample_seed = 0

    # ---- data, tokenizer, model -----------------------------------------------------------------------------
    def build_datasets(self, cfg: Any) -> tuple[Dataset, Dataset | None]:
        if not self._given:
            from ratelab.data import build_dataset

            common = _dataset_kwargs(cfg)
            self.train_dataset = build_dataset(cfg.dataset, "train", augment=cfg.augment, **common)
            self.val_dataset = build_dataset(cfg.dataset, "val", **common)
        self._pm1 = ToPM1(self.train_dataset)
        self.sample_seed = cfg.seed
        return self.train_dataset, self.val_dataset

    def load_tokenizer(self) -> nn.Module:
        """The frozen tokenizer of ``config.tokenizer`` (a path, or a registry name with pretrained weights)."""
        if self.tokenizer is None:
            from ratelab import create_model
            from ratelab.models._factory import load_model

            spec = self.config.tokenizer
            if Path(spec).exists():
                tok = load_model(spec, **self.config.tokenizer_kwargs)
            else:
                tok = create_model(spec, pretrained=True, **self.config.tokenizer_kwargs)
            self.tokenizer = tok
        tok = self.tokenizer
        if not all(hasattr(tok, a) for a in ("img_to_idx", "idx_to_var_input", "quantize")):
            raise ConfigError(f"task.tokenizer: {type(tok).__name__} is not a multi-scale VQ tokenizer (needs "
                              "img_to_idx, idx_to_var_input and quantize)")
        tok.eval().requires_grad_(False)
        return tok

    def build_model(self, cfg: Any) -> nn.Module:
        from ratelab import create_model
        from ratelab.models.var.var import ScaleAR

        if self.train_dataset is None:
            raise RuntimeError("VARTask.build_model: call build_datasets first")
        from ratelab.models._factory import is_model, model_family

        arch = cfg.model.split(".")[0]
        if is_model(arch) and (model_family(arch) != "var" or arch.startswith("var_vae")):
            raise ConfigError(f"model: {cfg.model!r} is not a next-scale model; the var task trains var_d* and "
                              "mvar_d* models")
        tok = self.load_tokenizer()
        q = tok.quantize
        kw = {"patch_nums": list(tok.patch_nums), "vocab_size": q.vocab_size, "c_vae": q.channels,
              "cond_drop_rate": self.config.label_dropout, **dict(cfg.model_kwargs)}
        ncls = cfg.num_classes if cfg.num_classes is not None else getattr(self.train_dataset, "num_classes", None)
        if "num_classes" not in kw and ncls is not None:
            kw["num_classes"] = ncls
        model = create_model(cfg.model, **kw)
        if not isinstance(model, ScaleAR):
            raise ConfigError(f"model: {cfg.model!r} is not a next-scale model; the var task trains var_d* and "
                              "mvar_d* models")
        if tuple(model.patch_nums) != tuple(tok.patch_nums) or model.vocab_size != q.vocab_size:
            raise ConfigError(f"model_kwargs: patch_nums {model.patch_nums} / vocab_size {model.vocab_size} differ "
                              f"from the tokenizer's {tuple(tok.patch_nums)} / {q.vocab_size}")
        side = getattr(self.train_dataset, "img_size", None)
        if side is not None and getattr(tok, "img_size", side) != side:
            raise ConfigError(f"img_size: the tokenizer codes {tok.img_size}px images, the dataset gives {side}px")
        return model

    def setup(self, device: torch.device, dist: Any) -> None:
        self.tokenizer = self.load_tokenizer().to(device)
        self._pm1.to(device)

    def configure_optimizers(self, model: nn.Module, cfg: Any) -> list[OptimizerSpec]:
        c = self.config
        peak = c.tblr * cfg.batch_size / 256 if c.tblr is not None else cfg.lr
        opt = torch.optim.AdamW(var_param_groups(model), lr=peak, betas=tuple(c.betas), weight_decay=c.twd)
        total = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * self._steps_per_epoch(cfg)
        sched = VARSchedule(opt, peak_lr=peak, total_steps=total, warmup_steps=round(c.wp * total), sche=c.sche,
                            wp0=c.wp0, wpe=c.wpe, twd=c.twd, twde=c.twde if c.twde is not None else c.twd)
        return [OptimizerSpec("main", opt, scheduler=sched, grad_clip=c.grad_clip)]

    def _steps_per_epoch(self, cfg: Any) -> int:
        # The trainer's ShardedBatchSampler drops the ragged tail: len // global batch steps per epoch.
        return max(len(self.train_dataset) // cfg.batch_size, 1)

    # ---- training and evaluation ----------------------------------------------------------------------------
    def to_pm1(self, x: torch.Tensor) -> torch.Tensor:
        """Dataset-normalized images -> [-1, 1]."""
        return self._pm1(x)

    @torch.no_grad()
    def tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images -> (teacher-forcing input (B, L - p_1^2, C_vae), targets (B, L)).

        The frozen tokenizer runs in fp32 even inside the trainer's autocast (the official trainer calls it outside
        its amp context): a bf16/fp16 encoder moves the latent enough to change nearest codes, i.e. the targets.
        """
        tok = self.tokenizer
        with torch.autocast(device_type=images.device.type, enabled=False):
            idx = tok.img_to_idx(self.to_pm1(images.float()))
            return tok.idx_to_var_input(idx), torch.cat(idx, dim=1)

    def training_step(self, model: nn.Module, batch: Any, cfg: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        x, target = self.tokens(batch[0])
        logits = model(batch[1], x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), label_smoothing=cfg.label_smoothing)
        acc = (logits.detach().argmax(-1) == target).float().mean()
        return loss, {"acc": acc}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, ctx: EvalContext) -> dict[str, float]:
        from ratelab.core.checkpoint import unwrap_model

        out: dict[str, float] = {}
        if ctx.loader is not None:
            sums = torch.zeros(3, dtype=torch.float64, device=ctx.device)
            for batch in ctx.loader:
                x, target = self.tokens(batch[0])
                logits = model(batch[1], x).float()
                sums += torch.stack([
                    F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum").double(),
                    (logits.argmax(-1) == target).sum().double(),
                    torch.tensor(float(target.numel()), dtype=torch.float64, device=ctx.device),
                ])  # fmt: skip
            loss_sum, correct, n = all_reduce_sum(sums).tolist()
            if n:
                out.update(val_loss=loss_sum / n, val_acc=correct / n)
        net = unwrap_model(model)
        sharded = any(type(p).__name__ == "DTensor" for p in net.parameters())
        if self.config.n_samples and self.config.n_sample_classes and not sharded and ctx.dist.is_main \
                and ctx.out_dir is not None:
            self._write_samples(net, ctx)
        return out

    def _write_samples(self, net: nn.Module, ctx: EvalContext) -> None:
        c = self.config
        ncls = min(c.n_sample_classes, net.num_classes)
        labels = torch.arange(ncls, device=ctx.device).repeat_interleave(c.n_samples)
        gen = net.generate(labels, cfg=c.cfg, top_k=c.top_k, top_p=c.top_p, seed=self.sample_seed,
                           tokenizer=self.tokenizer)
        save_grid(gen.images, Path(ctx.out_dir) / "samples" / f"step{ctx.step}{'_' + ctx.tag if ctx.tag else ''}.png",
                  nrow=c.n_samples)


def save_grid(images: torch.Tensor, path: Path, *, nrow: int) -> None:
    """(N, C, H, W) images in [0, 1] -> one PNG, ``nrow`` images per row (one row per class here)."""
    from PIL import Image

    n, ch, h, w = images.shape
    rows = math.ceil(n / nrow)
    grid = torch.ones(ch, rows * (h + 1), nrow * (w + 1))
    for i, img in enumerate(images.float().clamp(0, 1).cpu()):
        r, col = divmod(i, nrow)
        grid[:, r * (h + 1): r * (h + 1) + h, col * (w + 1): col * (w + 1) + w] = img
    arr = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    Image.fromarray(arr[..., 0] if ch == 1 else arr).save(tmp)
    tmp.replace(path)
