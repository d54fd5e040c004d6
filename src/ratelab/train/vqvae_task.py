"""Training VAR's multi-scale residual VQ-VAE tokenizer (task ``"vqvae"``).

FoundationVision/VAR released the tokenizer's weights and its VQ loss but never its training script; the paper and
the maintainers (FoundationVision/Infinity #80) name the terms: reconstruction, VQ, perceptual (LPIPS) and GAN. This
task trains any ``var_vae_*`` model (``ratelab.models.var.VQVAE``) with:

* reconstruction: L1 (default) or L2 between the image in [-1, 1] and the decoder's unclamped output;
* the model's VQ loss (mean over scales of ``beta |sg(f_hat_k) - f|^2 + |f_hat_k - sg(f)|^2``) with straight-through
  gradients to the encoder;
* codebook-usage tracking: the per-scale EMA of code hits in ``quantize.ema_vocab_hit_SV`` (momentum 0 for the
  first update, 0.9 for the next 99, then 0.99; the official quantizer's rates, but its counter advances once per
  *scale* (so it copies only scale 0's first hits and switches to 0.99 after 10 batches) while this one advances
  once per training step and is saved in the task state, so that a resumed run continues exactly), logged as the
  share of codes whose EMA reaches ``0.08 * tokens of that scale / V`` (the official margin takes the latent's
  positions, the last scale's token count, at every scale);
* dead-code restart: every ``restart_every`` steps, codes whose EMA hits (summed over scales) are below
  ``dead_threshold`` are re-initialized to vectors drawn from what the scales quantize in the current batch
  (rank 0's draw, broadcast);
* optional patch-GAN (``gan_weight > 0``): a PatchGAN discriminator (Isola et al. 2017, taming-transformers'
  ``NLayerDiscriminator``) on a second optimizer (``"disc"``, Adam betas (0.5, 0.9)) through
  :meth:`~ratelab.train.tasks.Task.configure_optimizers`; hinge losses; both terms are zero before step
  ``gan_start``. Deviations from taming: a fixed generator weight (no adaptive weight), and real and fake images
  in one discriminator batch (one BatchNorm over both). Under torchrun the task wraps the discriminator in its own
  DDP (tests/test_var_vqvae_ddp.py checks that the ranks stay identical);
* optional perceptual term (``perceptual_weight > 0``): LPIPS-VGG (Zhang et al. 2018) from two files the user has
  locally, torchvision's VGG-16 weights and LPIPS' linear layers (``vgg.pth`` of the ``lpips`` package); nothing is
  downloaded, and a missing file is an error naming it.

Images come from any registered dataset (normalized by its mean/std) and are mapped back to [-1, 1]. The
tokenizer's ``in_channels`` defaults to the dataset's channels. Evaluation: ``val_rec_l1``, ``val_rec_mse``,
``val_psnr`` (of the clamped reconstruction, on [0, 1]), ``val_usage`` (share of codes used on the val set, any
scale) and a grid of originals / reconstructions ``out_dir/reconstructions/step{step}.png``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from ratelab.core.dist import all_reduce_sum, is_dist
from ratelab.core.errors import CheckpointError, ConfigError
from ratelab.train.data import ToPM1
from ratelab.train.tasks import EvalContext, OptimizerSpec, Task, TaskConfig, _dataset_kwargs, register_task

__all__ = ["LPIPS", "PatchDiscriminator", "VQVAETask", "VQVAETaskConfig"]


@dataclass
class VQVAETaskConfig(TaskConfig):
    """Options of the ``vqvae`` task (``--task vqvae --task.gan_weight 0.1 ...``).

    Attributes:
        rec_loss: ``"l1"`` or ``"l2"``.
        rec_weight: weight of the reconstruction term.
        vq_weight: weight of the model's VQ loss (beta is the model's ``beta``).
        restart_every: dead-code restart period in steps (0 = never).
        dead_threshold: a code is dead when its EMA hits summed over scales are below this.
        gan_weight: weight of the generator's hinge term (0 = no discriminator, one optimizer).
        gan_start: step from which the GAN terms are on.
        disc_lr: discriminator learning rate (None = the run's ``lr``).
        disc_ndf: discriminator base width.
        disc_layers: stride-2 stages of the discriminator.
        perceptual_weight: weight of the LPIPS term (0 = off).
        lpips_weights: local file of LPIPS' linear layers (``lin{0..4}.model.1.weight``; the lpips package's
            ``weights/v0.1/vgg.pth``).
        vgg_weights: local file of torchvision's VGG-16 weights (``vgg16-397923af.pth``; only ``features.*`` used).
        n_recon: validation images in the reconstruction grid (0 = none).
    """

    name: str = "vqvae"
    rec_loss: str = "l1"
    rec_weight: float = 1.0
    vq_weight: float = 1.0
    restart_every: int = 0
    dead_threshold: float = 0.03
    gan_weight: float = 0.0
    gan_start: int = 0
    disc_lr: float | None = None
    disc_ndf: int = 64
    disc_layers: int = 3
    perceptual_weight: float = 0.0
    lpips_weights: str | None = None
    vgg_weights: str | None = None
    n_recon: int = 8

    def check(self) -> None:
        if self.rec_loss not in ("l1", "l2"):
            raise ConfigError(f"task.rec_loss: must be 'l1' or 'l2', got {self.rec_loss!r}")
        for k in ("rec_weight", "vq_weight", "gan_weight", "perceptual_weight", "dead_threshold"):
            if getattr(self, k) < 0:
                raise ConfigError(f"task.{k}: must be >= 0, got {getattr(self, k)!r}")
        for k in ("restart_every", "gan_start", "n_recon"):
            if getattr(self, k) < 0:
                raise ConfigError(f"task.{k}: must be >= 0, got {getattr(self, k)!r}")
        if self.disc_layers < 1 or self.disc_ndf < 1:
            raise ConfigError("task.disc_layers and task.disc_ndf must be >= 1")
        if self.perceptual_weight > 0:
            for k in ("lpips_weights", "vgg_weights"):
                path = getattr(self, k)
                if path is None:
                    raise ConfigError(f"task.{k}: perceptual_weight > 0 needs the local {k} file (ratelab "
                                      "downloads nothing); see the vqvae task's docstring")
                if not os.path.isfile(path):
                    raise ConfigError(f"task.{k}: file {path!r} does not exist")


# ---- auxiliary networks -----------------------------------------------------------------------------------------


class PatchDiscriminator(nn.Module):
    """PatchGAN: a 4x4 stride-2 conv + LeakyReLU(0.2), ``n_layers - 1`` more stride-2 conv-BN-LeakyReLU stages
    (width doubling up to 8x), a stride-1 stage, and a 1-channel 4x4 conv: one logit per overlapping patch."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False), nn.BatchNorm2d(ndf * mult),
                       nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():  # the DCGAN init taming uses
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def min_size(self) -> int:
        """Smallest input side with at least one output patch."""
        n = sum(1 for m in self.main if isinstance(m, nn.Conv2d) and m.stride[0] == 2)
        return 2 ** n * 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


_VGG_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in torchvision's vgg16().features
_VGG_WIDTHS = (64, 128, 256, 512, 512)


class LPIPS(nn.Module):
    """LPIPS-VGG distance of images in [-1, 1], (B,) per pair, from local weight files only.

    The input is shifted and scaled (LPIPS' ScalingLayer), VGG-16 features at the five ReLU taps are unit-normalized
    over channels, their squared differences weighted per channel by the linear layers, averaged over space and
    summed over taps.

    Raises:
        ConfigError: a missing file or one without the expected keys (named).
    """

    def __init__(self, lpips_weights: str | os.PathLike, vgg_weights: str | os.PathLike) -> None:
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers

        self.features = make_layers(cfgs["D"])[: _VGG_TAPS[-1] + 1]
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.lins = nn.ModuleList([nn.Conv2d(c, 1, 1, bias=False) for c in _VGG_WIDTHS])
        vgg = _load_file(vgg_weights, "vgg_weights")
        feats = {k[len("features."):]: v for k, v in vgg.items() if k.startswith("features.")}
        own = self.features.state_dict()
        missing = sorted(set(own) - set(feats))
        if missing:
            raise ConfigError(f"vgg_weights: {vgg_weights} lacks VGG-16 keys features.{missing[0]} ... (expected "
                              "torchvision's vgg16 state dict)")
        self.features.load_state_dict({k: feats[k] for k in own})
        lin = _load_file(lpips_weights, "lpips_weights")
        for i, conv in enumerate(self.lins):
            key = f"lin{i}.model.1.weight"
            if key not in lin or lin[key].shape != conv.weight.shape:
                raise ConfigError(f"lpips_weights: {lpips_weights} has no {key} of shape {tuple(conv.weight.shape)} "
                                  "(expected the lpips package's vgg.pth)")
            conv.weight.data.copy_(lin[key])
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # a fixed metric: never dropout/BN-train behaviour

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:  # gray images: the metric is defined on RGB
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        hx, hy = (x - self.shift) / self.scale, (y - self.shift) / self.scale
        total = x.new_zeros(x.shape[0])
        tap = 0
        for i, layer in enumerate(self.features):
            hx, hy = layer(hx), layer(hy)
            if i == _VGG_TAPS[tap]:
                nx = hx / (hx.norm(dim=1, keepdim=True) + 1e-10)
                ny = hy / (hy.norm(dim=1, keepdim=True) + 1e-10)
                total = total + self.lins[tap]((nx - ny).square()).mean(dim=(1, 2, 3))
                tap += 1
        return total


def _load_file(path: str | os.PathLike, option: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise ConfigError(f"{option}: file {str(path)!r} does not exist (ratelab downloads nothing)")
    from ratelab.core.checkpoint import load_torch_file

    try:  # the one weights-only loader (a code-running pickle is refused, saying why)
        sd = load_torch_file(path, what=f"{option} state dict")
    except CheckpointError as e:
        raise ConfigError(f"{option}: {e}") from e
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ConfigError(f"{option}: {str(path)!r} is not a state dict")
    return sd


# ---- the task ---------------------------------------------------------------------------------------------------


@register_task("vqvae", config=VQVAETaskConfig)
class VQVAETask(Task):
    """Tokenizer training (see the module docstring).

    Args:
        config: a :class:`VQVAETaskConfig` (or its fields as keyword options).
        train_dataset, val_dataset: datasets to use instead of building ``cfg.dataset`` (items ``(image, ...)``
            normalized with the dataset's ``mean``/``std`` attributes; without them images must be in [-1, 1]).
    """

    def __init__(self, config: VQVAETaskConfig | None = None, *, train_dataset: Dataset | None = None,
                 val_dataset: Dataset | None = None, **options: Any) -> None:
        super().__init__(config, **options)
        self.config.check()
        if val_dataset is not None and train_dataset is None:
            raise ValueError("VQVAETask: val_dataset was given without train_dataset")
        self._given = train_dataset is not None
        self.train_dataset, self.val_dataset = train_dataset, val_dataset
        self.disc: PatchDiscriminator | None = None
        self.lpips: LPIPS | None = None
        self.ema_updates = 0   # EMA updates of the usage buffer so far (its momentum depends on it)
        self.vae_calls = 0     # generator training_step calls (micro-batches)
        self._cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._pm1 = ToPM1()
        self._disc_train: nn.Module | None = None

    # ---- data and model -------------------------------------------------------------------------------------
    def build_datasets(self, cfg: Any) -> tuple[Dataset, Dataset | None]:
        if not self._given:
            from ratelab.data import build_dataset

            common = _dataset_kwargs(cfg)
            self.train_dataset = build_dataset(cfg.dataset, "train", augment=cfg.augment, **common)
            self.val_dataset = build_dataset(cfg.dataset, "val", **common)
        self._pm1 = ToPM1(self.train_dataset)
        return self.train_dataset, self.val_dataset

    def build_model(self, cfg: Any) -> nn.Module:
        from ratelab import create_model

        if self.train_dataset is None:
            raise RuntimeError("VQVAETask.build_model: call build_datasets first")
        kw = dict(cfg.model_kwargs)
        chans = getattr(self.train_dataset, "in_chans", None)
        if "in_channels" not in kw and chans is not None:
            kw["in_channels"] = chans
        model = create_model(cfg.model, **kw)
        if not (hasattr(model, "quantize") and hasattr(model, "img_to_idx")):
            raise ConfigError(f"model: {cfg.model!r} is not a multi-scale VQ tokenizer; the vqvae task trains "
                              "var_vae_* models")
        side = getattr(self.train_dataset, "img_size", None)
        if side is not None and side != model.img_size:
            raise ConfigError(f"model: {cfg.model} with patch_nums={model.patch_nums} codes {model.img_size}px "
                              f"images, the dataset gives {side}px; set img_size={model.img_size} or patch_nums "
                              f"ending at {side // model.downsample} (model_kwargs)")
        c = self.config
        if c.restart_every and getattr(cfg, "strategy", "ddp") == "fsdp":
            raise ConfigError("task.restart_every: dead-code restarts write codebook rows in place, which sharded "
                              "(fsdp) weights do not allow; use strategy ddp or restart_every=0")
        if c.gan_weight > 0:
            self.disc = PatchDiscriminator(model.in_chans, c.disc_ndf, c.disc_layers)
            if model.img_size < self.disc.min_size():
                raise ConfigError(f"disc_layers={c.disc_layers}: the discriminator needs images of at least "
                                  f"{self.disc.min_size()}px, these are {model.img_size}px")
        if c.perceptual_weight > 0:
            self.lpips = LPIPS(c.lpips_weights, c.vgg_weights)
        return model

    def setup(self, device: torch.device, dist: Any) -> None:
        for name in ("disc", "lpips"):
            mod = getattr(self, name)
            if mod is not None:
                setattr(self, name, mod.to(device))
        self._disc_train = self.disc
        if self.disc is not None and getattr(dist, "world_size", 1) > 1:
            # The discriminator is not part of the trainer's (DDP-wrapped) model: its own DDP wrapper averages its
            # gradients over the ranks in the disc step's backward. The generator step calls the bare module.
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            self._disc_train = DistributedDataParallel(self.disc, device_ids=ids)
        self._pm1.to(device)

    def configure_optimizers(self, model: nn.Module, cfg: Any) -> list[OptimizerSpec] | None:
        if self.disc is None:
            return None
        from ratelab.train.optim import build_optimizer

        main = build_optimizer(model, name=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas)
        lr = self.config.disc_lr if self.config.disc_lr is not None else cfg.lr
        disc = torch.optim.Adam(self.disc.parameters(), lr=lr, betas=(0.5, 0.9))
        return [OptimizerSpec("vae", main), OptimizerSpec("disc", disc)]

    # ---- helpers --------------------------------------------------------------------------------------------
    def to_pm1(self, x: torch.Tensor) -> torch.Tensor:
        """Dataset-normalized images -> [-1, 1]."""
        return self._pm1(x)

    def _step(self, cfg: Any) -> int:
        return self.vae_calls // max(1, int(getattr(cfg, "accum_steps", 1)))

    @torch.no_grad()
    def _update_usage(self, quant: nn.Module, hits: torch.Tensor) -> None:
        hits = all_reduce_sum(hits.detach().float())
        ema = quant.ema_vocab_hit_SV
        if self.ema_updates == 0:
            ema.copy_(hits)
        elif self.ema_updates < 100:
            ema.mul_(0.9).add_(hits, alpha=0.1)
        else:
            ema.mul_(0.99).add_(hits, alpha=0.01)
        self.ema_updates += 1

    @torch.no_grad()
    def _restart_dead(self, net: nn.Module, x: torch.Tensor) -> int:
        quant = net.quantize
        dead = (quant.ema_vocab_hit_SV.sum(0) < self.config.dead_threshold).nonzero().flatten()
        if dead.numel() == 0:
            return 0
        pool = torch.cat(quant.scale_inputs(net.img_to_f(x)), dim=0)
        pick = torch.randint(pool.shape[0], (dead.numel(),), device=pool.device)
        new = pool[pick].to(quant.embedding.weight.dtype)
        if is_dist():  # every rank restarts the same codes with rank 0's vectors
            torch.distributed.broadcast(new, src=0)
        quant.embedding.weight[dead] = new
        # a restarted code starts at the threshold, so it is not restarted again before it had a chance
        quant.ema_vocab_hit_SV[:, dead] = self.config.dead_threshold / quant.num_scales
        return int(dead.numel())

    @staticmethod
    def usage_pct(quant: nn.Module, tokens_per_scale: list[int]) -> list[float]:
        """Per scale, % of codes whose EMA hits reach ``0.08 * tokens_per_scale[si] / V`` (the official margin uses
        the last scale's token count for every scale)."""
        v = quant.vocab_size
        return [float((quant.ema_vocab_hit_SV[si] >= 0.08 * n / v).float().mean()) * 100
                for si, n in enumerate(tokens_per_scale)]

    # ---- training and evaluation ----------------------------------------------------------------------------
    def training_step(self, model: nn.Module, batch: Any, cfg: Any, optimizer: str = "vae"
                      ) -> tuple[torch.Tensor, dict[str, Any]]:
        from ratelab.core.checkpoint import unwrap_model

        x = self.to_pm1(batch[0] if isinstance(batch, (list, tuple)) else batch)
        if optimizer == "disc":
            return self._disc_step(x, cfg)
        c = self.config
        net = unwrap_model(model)
        metrics: dict[str, Any] = {}
        step = self._step(cfg)
        first_micro = self.vae_calls % max(1, int(getattr(cfg, "accum_steps", 1))) == 0
        if first_micro:
            self._cache.clear()
            if c.restart_every and step > 0 and step % c.restart_every == 0:
                metrics["restarted"] = float(self._restart_dead(net, x))
        self.vae_calls += 1
        rec, vq_loss, hits = model(x)
        rec = rec.float()
        rec_loss = (rec - x).abs().mean() if c.rec_loss == "l1" else (rec - x).square().mean()
        loss = c.rec_weight * rec_loss + c.vq_weight * vq_loss
        metrics.update(rec_loss=rec_loss.detach(), vq_loss=vq_loss.detach())
        if self.lpips is not None:
            p = self.lpips(rec, x).mean()
            loss = loss + c.perceptual_weight * p
            metrics["lpips"] = p.detach()
        if self.disc is not None:
            if step >= c.gan_start:
                self.disc.requires_grad_(False)
                g = -self.disc(rec).mean()
                self.disc.requires_grad_(True)
                loss = loss + c.gan_weight * g
                metrics["g_loss"] = g.detach()
            self._cache.append((x.detach(), rec.detach()))
        if model.training:
            self._update_usage(net.quantize, hits)
            n = [x.shape[0] * p * p for p in net.patch_nums]
            if is_dist():
                n = [v * torch.distributed.get_world_size() for v in n]
            usage = self.usage_pct(net.quantize, n)
            metrics["usage"] = sum(usage) / len(usage)
        return loss, metrics

    def _disc_step(self, x: torch.Tensor, cfg: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        assert self.disc is not None
        # the generator step of this optimizer step ran on the same micro-batches, in the same order
        rec = None
        if self._cache:
            cx, crec = self._cache.pop(0)
            rec = crec if cx.shape == x.shape and torch.equal(cx, x) else None
        if self._step(cfg) - 1 < self.config.gan_start:
            # keep the optimizer's step structure identical before the GAN starts: zero gradients, no update (Adam
            # without weight decay moves nothing on a zero gradient)
            return sum(p.sum() for p in self.disc.parameters()) * 0.0, {}
        if rec is None:
            raise RuntimeError("vqvae task: the discriminator step found no reconstruction of its batch (the "
                               "generator step must run first on the same micro-batches)")
        # one forward over real and fake together (a DDP module takes one forward per backward); BatchNorm then
        # normalizes over both halves, where taming's two calls normalize each half separately
        logits = (self._disc_train or self.disc)(torch.cat([x, rec]))
        real, fake = logits[: x.shape[0]], logits[x.shape[0]:]
        d_loss = 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())
        return d_loss, {"d_real": real.detach().mean(), "d_fake": fake.detach().mean()}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, ctx: EvalContext) -> dict[str, float]:
        from ratelab.core.checkpoint import unwrap_model

        net = unwrap_model(model)
        if ctx.loader is None:
            return {}
        sums = torch.zeros(3, dtype=torch.float64, device=ctx.device)
        used = torch.zeros(net.quantize.vocab_size, dtype=torch.float64, device=ctx.device)
        first = None
        for batch in ctx.loader:
            x = self.to_pm1(batch[0] if isinstance(batch, (list, tuple)) else batch)
            idx = net.img_to_idx(x)
            rec = net.idx_to_img(idx).float()
            d = rec - x
            sums += torch.stack([d.abs().flatten(1).mean(1).sum().double(), d.square().flatten(1).mean(1).sum()
                                 .double(), torch.tensor(float(x.shape[0]), device=x.device, dtype=torch.float64)])
            for i in idx:
                used += torch.bincount(i.flatten(), minlength=used.numel()).double()
            if first is None:
                first = (x[: self.config.n_recon], rec[: self.config.n_recon])
        l1, mse_pm1, n = all_reduce_sum(sums).tolist()
        used = all_reduce_sum(used)
        if not n:
            return {}
        mse01 = mse_pm1 / n / 4  # [-1, 1] -> [0, 1] scales squared errors by 1/4
        out = {"val_rec_l1": l1 / n, "val_rec_mse": mse_pm1 / n,
               "val_psnr": 10 * math.log10(1.0 / max(mse01, 1e-12)), "val_usage": float((used > 0).double().mean())}
        if self.config.n_recon and first is not None and ctx.dist.is_main and ctx.out_dir is not None:
            from torchvision.utils import save_image

            d = Path(ctx.out_dir) / "reconstructions"
            d.mkdir(parents=True, exist_ok=True)
            grid = torch.cat([first[0], first[1]]).add(1).div(2).clamp(0, 1).cpu()
            save_image(grid, d / f"step{ctx.step}{'_' + ctx.tag if ctx.tag else ''}.png", nrow=first[0].shape[0])
        return out

    # ---- resume ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"ema_updates": self.ema_updates, "vae_calls": self.vae_calls}
        if self.disc is not None:
            state["disc"] = {k: v.detach().cpu().clone() for k, v in self.disc.state_dict().items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.ema_updates, self.vae_calls = int(state["ema_updates"]), int(state["vae_calls"])
        if "disc" in state:
            if self.disc is None:
                raise ConfigError("task.gan_weight: the checkpoint has a discriminator but gan_weight is 0")
            self.disc.load_state_dict(state["disc"])
        elif self.disc is not None:
            raise ConfigError("task.gan_weight: gan_weight > 0 but the checkpoint has no discriminator")
