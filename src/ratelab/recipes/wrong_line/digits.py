"""Real-image part of the ``wrong-line`` recipe: digits with a label-correlated nuisance cue, with and without noise.

Accuracy on the wrong line (Sanyal et al., AISTATS 2025; research note ``wrong_line.md``) claims that label noise
plus nuisance / shortcut features can make in-distribution (ID) and out-of-distribution (OOD) accuracy negatively
correlated across models, where clean data keep them on a positive line. The paper's real-data experiment (Colored
MNIST) could not be recovered in detail (note §1.3), so this is ratelab's own small analogue:

* images: scikit-learn's digits (``build_dataset("digits")``, its fixed stratified 80/20 split), 8x8 by default;
* nuisance cue: every image is drawn in one of 10 colours (or carries one of 10 border patterns). In training and
  in the ID test the cue equals the image's clean class with probability ``cue_p`` and is one of the other nine
  classes, uniformly, otherwise; in the OOD test the cue is drawn uniformly, independently of the class (the
  correlation is broken, not reversed). ID and OOD tests hold the same test images; only the cue differs, so any
  ID-OOD gap is caused by the model's use of the cue;
* label noise ("noisy" condition): a fixed fraction ``noise`` of the training labels is moved to a uniformly drawn
  *other* class (so exactly that fraction is wrong). Test labels are clean. By default the cue follows the clean
  class (``cue_follows="clean"``): flipped labels disagree with both the digit and, mostly, the cue, so fitting them
  means memorising. With ``cue_follows="observed"`` the cue is drawn from the (noisy) training label instead,
  as in Arjovsky et al.'s Colored MNIST, so the cue *explains* part of the noise;
* models: networks of the library (``mcr2_mlp_small`` at several widths, ``mcr2_cnn_small``; the full sweep adds
  ``crate_pico_patch4_16`` with 2-pixel patches), trained by the library's Trainer (AdamW at a constant learning
  rate, cross-entropy, no augmentation, no weight decay so that they can memorise, fp32, batch 128 with the ragged
  tail of each epoch dropped), on nested training subsets of several sizes, and evaluated at several epochs: every
  (architecture, training size, epoch) is one point of the scatter, as in accuracy-on-the-line studies.

``digits_sweep`` runs both conditions and returns the per-model table; the recipe (``recipe.py``) fits the probit
lines. :func:`cue_only_accuracy` (the best classifier that sees only the cue) is reported as a sanity column.

Measured (quick: mlp-64, mlp-512, cnn-8 x n in {360, 1437} x epochs {5, 15, 40} = 18 models per condition; seed 0;
colour cue, cue_p = 0.9, noise 0.3; trained by the Trainer, 19 s with one thread on a loaded 2-core machine; rerun on
the current code on a quiet 2-core machine, torch 2.14.1: 14 s, the same figures -- the sweep trains without
augmentation, so the trainer's per-sample augmentation seeding does not reach it). Cue-only classifier: ID 0.894, OOD
0.092. Clean: ID 0.20-0.97, OOD 0.12-0.83, probit Pearson r = +0.83 (+0.89 without the one barely trained point,
cnn-8/n360/e5 at ID 0.20), Spearman +0.98. Noisy: r = +0.62 (bootstrap 95% [-0.16, 0.86]; +0.16 without that point),
Spearman +0.38. So label noise flattens the line but does not make it negative here. Memorising the flipped labels
(share fitted 0.57-1.0 by epoch 40) costs ID 0.05-0.25 below each run's best checkpoint while OOD moves by -0.09 to
+0.22 from epoch 5 to 40: in this low-dimensional image space memorisation is not benign (it hurts ID too), unlike the
note's d_n >> n linear model (§3) where ID keeps improving while OOD falls. The sweep's first version trained with its
own loop (the ragged tail of each epoch kept as a smaller batch, so 3 instead of 2 steps per epoch at n = 360): clean
+0.82, noisy +0.56 [-0.15, +0.84]; the per-model accuracies moved by 0.02-0.03 on average (at most 0.14, the early n =
360 checkpoints), the correlations within their intervals. Variations tried with that loop (same quick grid, pooled r
clean / noisy): noise 0.4 with cue_p 0.95: +0.66 / +0.43; border cue: +0.84 / +0.69; cue_p 0.75: +0.95 / +0.85; cue
drawn from the noisy label (``cue_follows="observed"``, Colored-MNIST style, noisy only): +0.09, every model close to
the cue-only rule (ID ~0.90, OOD 0.13-0.31). None gave a negative correlation; the defaults stay the simplest design.

Full (6 architectures incl. crate-pico x n in {180, 360, 720, 1437} x epochs {5, 10, 20, 40} = 96 models per
condition; seed 0; 361 s with one thread on a loaded machine; measured with the first version's own loop): clean
r = +0.76 (Spearman +0.96), noisy r = +0.19 (Spearman +0.10; the recipe's bootstrap interval [-0.03, +0.38]). Again
noise destroys the line without reversing it.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ratelab.analysis.accuracy_line import probit_pearson
from ratelab.data.noise import symmetric_noise
from ratelab.recipes._common import fresh_run_dir, limit_threads

__all__ = [
    "PALETTE",
    "SCALES",
    "DigitsCueConfig",
    "apply_cue",
    "assign_cues",
    "cue_label_agreement",
    "cue_only_accuracy",
    "digits_sweep",
    "make_cue_data",
    "run_condition",
    "train_tracked",
    "with_overrides",
]

NUM_CLASSES = 10
PROBIT_CLIP = 1e-3  # finite test sets (a few hundred images x cue draws): a perfect score maps to probit 3.09

# Ten well separated RGB colours (one per class); every channel is > 0 somewhere so no digit becomes invisible.
PALETTE = torch.tensor([
    [1.00, 0.10, 0.10], [0.10, 1.00, 0.10], [0.15, 0.30, 1.00], [1.00, 1.00, 0.10], [1.00, 0.10, 1.00],
    [0.10, 1.00, 1.00], [1.00, 0.55, 0.10], [0.55, 0.15, 1.00], [0.60, 0.60, 0.60], [0.10, 0.55, 0.30],
], dtype=torch.float32)


@dataclass(frozen=True)
class DigitsCueConfig:
    """Settings of the digits nuisance-cue experiment.

    Attributes:
        img_size: image side (digits are 8x8 natively; larger sizes are bilinear upsamplings).
        cue: ``"colour"`` (digit drawn in a class colour) or ``"border"`` (a class-specific binary pattern on the
            1-pixel frame, digit in gray).
        cue_p: P(cue = clean class) in training and in the ID test; 0.1 (= 1/K) means no correlation.
        cue_follows: ``"clean"`` (cue drawn from the clean class) or ``"observed"`` (from the noisy training label;
            the test cues always follow the clean test label).
        noise: share of training labels moved to another class in the noisy condition.
        ood_draws: number of independent cue draws of the test images, stacked, for each of ID and OOD (more draws
            average out the cue sampling; the image part is the same 360 test digits).
        archs: (label, registered model name, constructor kwargs) of the swept networks.
        n_train: training subset sizes (nested prefixes of one seeded permutation of the training split).
        checkpoints: epochs at which every run is evaluated (the last one is the run's length).
        lr, batch_size, weight_decay: the one training recipe shared by every model and condition.
    """

    img_size: int = 8
    cue: str = "colour"
    cue_p: float = 0.9
    cue_follows: str = "clean"
    noise: float = 0.3
    ood_draws: int = 3
    archs: tuple[tuple[str, str, dict[str, Any]], ...] = field(default_factory=tuple)
    n_train: tuple[int, ...] = (1437,)
    checkpoints: tuple[int, ...] = (40,)
    lr: float = 2e-3
    batch_size: int = 128
    weight_decay: float = 0.0

    def validate(self) -> None:
        if self.cue not in ("colour", "border"):
            raise ValueError(f"DigitsCueConfig.cue must be 'colour' or 'border', got {self.cue!r}")
        if self.cue_follows not in ("clean", "observed"):
            raise ValueError(f"DigitsCueConfig.cue_follows must be 'clean' or 'observed', got {self.cue_follows!r}")
        if not 0.0 <= self.cue_p <= 1.0:
            raise ValueError(f"DigitsCueConfig.cue_p must be in [0, 1], got {self.cue_p}")
        if not 0.0 <= self.noise < 1.0:
            raise ValueError(f"DigitsCueConfig.noise must be in [0, 1), got {self.noise}")
        if not self.checkpoints or list(self.checkpoints) != sorted(set(self.checkpoints)) or self.checkpoints[0] < 1:
            raise ValueError(f"DigitsCueConfig.checkpoints must be increasing positive epochs, got {self.checkpoints}")
        if not self.n_train or min(self.n_train) < NUM_CLASSES:
            raise ValueError(f"DigitsCueConfig.n_train must be sizes >= {NUM_CLASSES}, got {self.n_train}")


# Architectures (label, registered name, kwargs). Widths chosen so that quick fits the CPU budget. The CRATE (2-pixel
# patches, so an 8x8 image still gives 16 tokens) is in the full sweep only: 40 epochs on 1437 images cost ~35 s on a
# loaded 2-core machine, alone over half of quick's budget.
ARCHS_QUICK: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("mlp-64", "mcr2_mlp_small", {"hidden": 64}),
    ("mlp-512", "mcr2_mlp_small", {"hidden": 512}),
    ("cnn-8", "mcr2_cnn_small", {"width": 8, "hidden": 64}),
)
ARCHS_FULL: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("mlp-32", "mcr2_mlp_small", {"hidden": 32}),
    ("mlp-128", "mcr2_mlp_small", {"hidden": 128}),
    ("mlp-1024", "mcr2_mlp_small", {"hidden": 1024}),
    ("cnn-8", "mcr2_cnn_small", {"width": 8, "hidden": 64}),
    ("cnn-32", "mcr2_cnn_small", {"width": 32, "hidden": 256}),
    ("crate-pico", "crate_pico_patch4_16", {"patch_size": 2}),
)


# Principled variations of the design tried once (quick grid, seed 0, the sweep's first training loop) before settling
# on the defaults; copied into every result's meta as a record, not recomputed. r = pooled probit Pearson over the 18
# models (clean, noisy).
VARIATIONS_TRIED: tuple[dict[str, Any], ...] = (
    {"change": "none (default: colour, cue_p 0.9, noise 0.3, cue follows clean label)", "r_clean": 0.82,
     "r_noisy": 0.56},
    {"change": "noise 0.4, cue_p 0.95 (stronger cue, more noise)", "r_clean": 0.66, "r_noisy": 0.43},
    {"change": "border pattern instead of colour", "r_clean": 0.84, "r_noisy": 0.69},
    {"change": "cue_p 0.75 (weaker cue)", "r_clean": 0.95, "r_noisy": 0.85},
    {"change": "cue drawn from the noisy training label (Colored-MNIST style)", "r_clean": None, "r_noisy": 0.09},
)


# --------------------------------------------------------------------------------------------------- data pieces


def assign_cues(labels: torch.Tensor, p: float, generator: torch.Generator, num_classes: int = NUM_CLASSES
                ) -> torch.Tensor:
    """Cue per sample: the label with probability ``p``, else one of the other classes uniformly.

    With ``p = 1 / num_classes`` the cue is uniform and independent of the label (the OOD setting).

    Args:
        labels: (n,) int64.
        p: agreement probability.
        generator: seeded torch generator (consumed: two draws of n values).
        num_classes: K.

    Returns:
        (n,) int64 cues.
    """
    n = labels.shape[0]
    agree = torch.rand(n, generator=generator) < p
    other = (labels + torch.randint(1, num_classes, (n,), generator=generator)) % num_classes
    return torch.where(agree, labels, other)


def _border_patterns(img_size: int, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    # Fixed (seed-independent) random binary frame patterns, one per class: (K, S, S) with zeros inside the frame.
    g = torch.Generator().manual_seed(1234)
    ring = torch.zeros(img_size, img_size, dtype=torch.bool)
    ring[0, :] = ring[-1, :] = ring[:, 0] = ring[:, -1] = True
    pats = torch.zeros(num_classes, img_size, img_size)
    pats[:, ring] = (torch.rand(num_classes, int(ring.sum()), generator=g) < 0.5).float()
    return pats


def apply_cue(images: torch.Tensor, cues: torch.Tensor, kind: str = "colour") -> torch.Tensor:
    """Draw the cue into gray images.

    Args:
        images: (n, 1, S, S) gray images in [0, 1] (digit bright on black).
        cues: (n,) int64 cue classes.
        kind: ``"colour"``: the digit is drawn in ``PALETTE[cue]``; ``"border"``: gray digit copied to 3 channels and
            the 1-pixel frame set to the cue's binary pattern (all channels).

    Returns:
        (n, 3, S, S) float32 in [0, 1].
    """
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"apply_cue: images must be (n, 1, S, S), got {tuple(images.shape)}")
    if kind == "colour":
        return images * PALETTE[cues].view(-1, 3, 1, 1)
    if kind == "border":
        pats = _border_patterns(images.shape[-1])[cues].unsqueeze(1)  # (n, 1, S, S)
        return torch.maximum(images, pats).expand(-1, 3, -1, -1).contiguous()
    raise ValueError(f"apply_cue: kind must be 'colour' or 'border', got {kind!r}")


def cue_label_agreement(cues: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of samples whose cue equals their label."""
    return float((cues == labels).float().mean())


def cue_only_accuracy(train_cues: torch.Tensor, train_labels: torch.Tensor,
                      test: dict[str, tuple[torch.Tensor, torch.Tensor]], num_classes: int = NUM_CLASSES
                      ) -> dict[str, float]:
    """Accuracy of the best classifier that sees only the cue (majority training label per cue value).

    A sanity column: it shows how much a pure shortcut earns ID and loses OOD.

    Args:
        train_cues, train_labels: (n,) int64 training cues and (possibly noisy) training labels.
        test: name -> ``(cues, labels)`` of a test set.

    Returns:
        name -> accuracy, plus ``"train"`` (on the training labels).
    """
    counts = torch.zeros(num_classes, num_classes)
    counts.index_put_((train_cues, train_labels), torch.ones(len(train_cues)), accumulate=True)
    rule = counts.argmax(dim=1)  # cue value -> predicted class (a never-seen cue maps to class 0)
    out = {"train": float((rule[train_cues] == train_labels).float().mean())}
    for name, (c, y) in test.items():
        out[name] = float((rule[c] == y).float().mean())
    return out


@functools.lru_cache(maxsize=4)  # both conditions share the images; tensors are never modified in place
def _load_gray(img_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from ratelab.data import build_dataset

    tr = build_dataset("digits", "train", img_size=img_size, seed=seed, augment=False)
    te = build_dataset("digits", "val", img_size=img_size, seed=seed, augment=False)
    xtr, ytr = tr.tensors()
    xte, yte = te.tensors()
    # tensors() is normalized; the cue is drawn on the [0, 1] images.
    return tr.denormalize(xtr).clamp(0, 1), ytr, te.denormalize(xte).clamp(0, 1), yte


def make_cue_data(cfg: DigitsCueConfig, *, noisy: bool, seed: int) -> dict[str, torch.Tensor]:
    """Build one condition's tensors.

    Returns a dict of: ``x_train`` (n, 3, S, S) normalized, ``y_train`` (n,) the labels trained on,
    ``y_train_clean``, ``flipped`` (n,) bool, ``cue_train``; ``x_id``/``x_ood`` (m * ood_draws, 3, S, S),
    ``y_test`` (m * ood_draws,), ``cue_id``/``cue_ood``. The training permutation (for nested subsets) is fixed
    by ``seed`` and is the same in both conditions, as are the test cue draws; only the labels (and, with
    ``cue_follows="observed"``, the training cues) differ.
    """
    cfg.validate()
    xtr, ytr, xte, yte = _load_gray(cfg.img_size, seed)
    g = torch.Generator().manual_seed(10_000 + seed)
    perm = torch.randperm(len(ytr), generator=g)
    xtr, ytr = xtr[perm], ytr[perm]  # nested subsets = prefixes
    # Symmetric noise to another class, exactly round(noise * n) labels (every flipped label is wrong).
    y_obs, flipped = symmetric_noise(ytr, cfg.noise if noisy else 0.0, NUM_CLASSES, generator=20_000 + seed)
    source = y_obs if cfg.cue_follows == "observed" else ytr
    cue_tr = assign_cues(source, cfg.cue_p, torch.Generator().manual_seed(30_000 + seed))
    gt = torch.Generator().manual_seed(40_000 + seed)
    y_test = yte.repeat(cfg.ood_draws)
    cue_id = assign_cues(y_test, cfg.cue_p, gt)
    cue_ood = assign_cues(y_test, 1.0 / NUM_CLASSES, gt)
    x_train = apply_cue(xtr, cue_tr, cfg.cue)
    mean, std = x_train.mean(), x_train.std()  # one scalar normalization from the training images
    norm = lambda x: (x - mean) / std  # noqa: E731
    xte_rep = xte.repeat(cfg.ood_draws, 1, 1, 1)
    return {
        "x_train": norm(x_train), "y_train": y_obs, "y_train_clean": ytr, "flipped": flipped, "cue_train": cue_tr,
        "x_id": norm(apply_cue(xte_rep, cue_id, cfg.cue)), "x_ood": norm(apply_cue(xte_rep, cue_ood, cfg.cue)),
        "y_test": y_test, "cue_id": cue_id, "cue_ood": cue_ood,
    }


# ----------------------------------------------------------------------------------------------------- training


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, bs: int = 1024) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(y), bs):
        correct += int((model(x[i:i + bs].to(device)).argmax(1).cpu() == y[i:i + bs]).sum())
    return correct / max(1, len(y))


def _tracked_task(model: nn.Module, train: Any, val: Any, measure: Callable[[nn.Module], dict[str, float]]) -> Any:
    from ratelab.train import ClassificationTask

    class TrackedTask(ClassificationTask):
        """Cross-entropy on the given tensors with a model built beforehand (its seeded initialization stays the
        same in both conditions and at every size); each evaluation is ``measure(model)``, whatever the loader."""

        def build_model(self, cfg: Any) -> nn.Module:
            return model

        def evaluate(self, model: nn.Module, *args: Any, **kwargs: Any) -> dict[str, float]:
            return measure(model)

    # The ID test set stands in as the validation set: the Trainer evaluates only runs that have one.
    return TrackedTask(train_dataset=train, val_dataset=val)


def train_tracked(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, run_dir: str | Path,
                  checkpoints: tuple[int, ...], lr: float, batch_size: int, weight_decay: float, seed: int,
                  device: str | torch.device, measure: Callable[[nn.Module], dict[str, float]],
                  val: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[dict[str, Any]]:
    """Train with the library's Trainer (AdamW at constant ``lr``, cross-entropy, fp32) and measure at checkpoints.

    The Trainer evaluates every ``gcd(checkpoints)`` epochs and logs each evaluation to ``run_dir/metrics.jsonl``
    with its epoch; the rows of the checkpoint epochs are returned. Batches are ``batch_size`` samples in a
    permutation per epoch seeded by ``(seed, epoch)``; the ragged tail of each epoch is dropped.

    Args:
        model: the network (built and seeded by the caller; moved to ``device``).
        x: (n, C, S, S) inputs; y: (n,) int64 labels.
        run_dir: the run directory (emptied first). Its resumable checkpoint is deleted afterwards (the sweep never
            resumes; it is the largest file); config, metrics and final weights stay.
        checkpoints: increasing epochs at which to measure; training stops at the last.
        seed: the run's seed (data order).
        measure: ``fn(model) -> dict of floats`` in eval mode without gradients.
        val: (inputs, labels) the Trainer holds as its validation set (default: the training tensors); ``measure``
            decides what is actually measured.

    Returns:
        ``[{"epochs": e, **measure(model after e epochs)}, ...]`` in checkpoint order.
    """
    from torch.utils.data import TensorDataset

    from ratelab.train import TrainConfig, Trainer

    run_dir = fresh_run_dir(Path(run_dir).parent, Path(run_dir).name)
    every = functools.reduce(math.gcd, checkpoints)
    name = getattr(model, "model_name", None) or type(model).__name__
    cfg = TrainConfig(
        model=name, epochs=checkpoints[-1], batch_size=batch_size, optimizer="adamw", lr=lr, min_lr=lr,
        weight_decay=weight_decay, warmup_steps=0, label_smoothing=0.0, grad_clip=0.0, amp="none", seed=seed,
        out_dir=str(run_dir), ckpt_every=0, eval_every=every, log_every=10_000, device=str(device), progress=False,
    )
    vx, vy = val if val is not None else (x, y)
    task = _tracked_task(model, TensorDataset(x, y), TensorDataset(vx, vy), measure)
    # The Trainer's per-run lines (a header, every evaluation, a footer) would drown the sweep's own for dozens of
    # tiny runs; they are all in the run's metrics.jsonl.
    with contextlib.redirect_stdout(io.StringIO()):
        Trainer(cfg, task).fit()
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    rows = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "eval" and rec["epoch"] + 1 in checkpoints:
            rows[rec["epoch"] + 1] = {k: v for k, v in rec.items() if k not in ("kind", "epoch")}
    missing = [e for e in checkpoints if e not in rows]
    if missing:
        raise RuntimeError(f"train_tracked: {run_dir / 'metrics.jsonl'} has no evaluation at epochs {missing}")
    return [{"epochs": e, **rows[e]} for e in checkpoints]


# ------------------------------------------------------------------------------------------------------- sweep

# One DigitsCueConfig per scale of the wrong-line recipe (its Scale table holds these rows).
SCALES: dict[str, DigitsCueConfig] = {
    "smoke": DigitsCueConfig(archs=(("mlp-16", "mcr2_mlp_small", {"hidden": 16}),
                                    ("cnn-4", "mcr2_cnn_small", {"width": 4, "hidden": 16})),
                             n_train=(200, 400), checkpoints=(1, 2), ood_draws=1),
    "quick": DigitsCueConfig(archs=ARCHS_QUICK, n_train=(360, 1437), checkpoints=(5, 15, 40)),
    "full": DigitsCueConfig(archs=ARCHS_FULL, n_train=(180, 360, 720, 1437), checkpoints=(5, 10, 20, 40)),
}


def run_condition(cfg: DigitsCueConfig, *, noisy: bool, seed: int, device: str, progress: bool,
                  out_dir: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Train every (architecture, training size) of ``cfg`` on one condition; one row per checkpoint.

    Args:
        out_dir: the condition's run directories go to ``out_dir/<arch>_n<size>``.

    Returns:
        ``(rows, info)``: rows with ``model``, ``arch``, ``n_train``, ``epochs``, ``id_acc``, ``ood_acc``,
        ``train_acc`` (on the labels trained on), ``memorized`` (share of flipped labels predicted as given; None
        when clean, so results stay strict JSON), ``train_clean_acc``, ``wall_s``, ``step``; info with the measured
        cue agreement, noise rate, cue-only accuracies and the pooled probit Pearson r (None if undefined).
    """
    from ratelab.core.registry import create_model

    cond = "noisy" if noisy else "clean"
    d = make_cue_data(cfg, noisy=noisy, seed=seed)
    rows: list[dict[str, Any]] = []
    for n in cfg.n_train:
        n_eff = min(n, len(d["y_train"]))
        x, y, yc, fl = d["x_train"][:n_eff], d["y_train"][:n_eff], d["y_train_clean"][:n_eff], d["flipped"][:n_eff]
        for a_idx, (label, name, kw) in enumerate(cfg.archs):
            torch.manual_seed(seed * 1000 + a_idx)  # same init for a given arch in both conditions and all sizes
            model = create_model(name, num_classes=NUM_CLASSES, in_chans=3, img_size=cfg.img_size, **kw)
            t0 = time.perf_counter()

            def measure(m: nn.Module, *, _x=x, _y=y, _yc=yc, _fl=fl, _t0=t0) -> dict[str, float]:
                dev = next(m.parameters()).device
                out = {
                    "id_acc": _accuracy(m, d["x_id"], d["y_test"], dev),
                    "ood_acc": _accuracy(m, d["x_ood"], d["y_test"], dev),
                    "train_acc": _accuracy(m, _x, _y, dev),
                    "train_clean_acc": _accuracy(m, _x, _yc, dev),
                }
                if bool(_fl.any()):
                    out["memorized"] = _accuracy(m, _x[_fl], _y[_fl], dev)
                out["wall_s"] = round(time.perf_counter() - _t0, 2)
                return out

            tracked = train_tracked(model, x, y, run_dir=Path(out_dir) / f"{label}_n{n_eff}",
                                    checkpoints=cfg.checkpoints, lr=cfg.lr, batch_size=cfg.batch_size,
                                    weight_decay=cfg.weight_decay, seed=seed * 1000 + a_idx + 7 * n_eff,
                                    device=device, measure=measure, val=(d["x_id"], d["y_test"]))
            for t in tracked:
                row = {"model": f"{label}/n{n_eff}/e{t['epochs']}", "arch": label, "n_train": n_eff,
                       "epochs": t["epochs"], "id_acc": t["id_acc"], "ood_acc": t["ood_acc"],
                       "train_acc": t["train_acc"], "train_clean_acc": t["train_clean_acc"],
                       "memorized": t.get("memorized"), "wall_s": t["wall_s"], "step": t["step"]}
                rows.append(row)
                if progress:
                    print(f"[wrong-line digits {cond}] {row['model']:>22s}  ID {row['id_acc']:.3f}  "
                          f"OOD {row['ood_acc']:.3f}  train {row['train_acc']:.3f}  ({row['wall_s']:.1f}s)", flush=True)
    n_max = min(max(cfg.n_train), len(d["y_train"]))
    info = {
        "n_train_split": int(len(d["y_train"])),
        "n_test": int(len(d["y_test"]) // cfg.ood_draws),
        "noise_rate_measured": float((d["y_train"] != d["y_train_clean"]).float().mean()),
        "cue_agreement": {
            "train_vs_clean": cue_label_agreement(d["cue_train"], d["y_train_clean"]),
            "train_vs_observed": cue_label_agreement(d["cue_train"], d["y_train"]),
            "id": cue_label_agreement(d["cue_id"], d["y_test"]),
            "ood": cue_label_agreement(d["cue_ood"], d["y_test"]),
        },
        "cue_only_acc": cue_only_accuracy(d["cue_train"][:n_max], d["y_train"][:n_max],
                                          {"id": (d["cue_id"], d["y_test"]), "ood": (d["cue_ood"], d["y_test"])}),
        "probit_r": _none_if_nan(probit_pearson([r["id_acc"] for r in rows], [r["ood_acc"] for r in rows],
                                                clip=PROBIT_CLIP)),
    }
    return rows, info


def _none_if_nan(v: float) -> float | None:
    return None if math.isnan(v) else v


def digits_sweep(out_dir: str | Path | None, config: DigitsCueConfig | str = "quick", *, seed: int = 0,
                 device: str = "cpu", progress: bool = False, threads: int | None = 1) -> dict[str, Any]:
    """Run the clean and the noisy sweep of the digits nuisance-cue experiment.

    Args:
        out_dir: run directories go to ``out_dir/digits_runs/{clean,noisy}/``; None = a temporary directory,
            removed afterwards.
        config: a scale of :data:`SCALES` -- ``"smoke"`` (2 tiny networks x 2 sizes x 2 epochs = 8 points per
            condition), ``"quick"`` (3 x 2 x 3 = 18), ``"full"`` (6 x 4 x 4 = 96) -- or a :class:`DigitsCueConfig`.
        seed: fixes data subsets, cues, noise, initializations and minibatch order.
        device: torch device string.
        progress: print one line per evaluated checkpoint.
        threads: torch intra-op threads on the CPU while the sweep runs (restored afterwards); ``None`` leaves them
            alone. The networks are so small (batch 128, <= 0.6 M parameters) that one thread is as fast as two on
            an idle 2-core machine and several times faster on a loaded one (measured while other jobs ran: quick
            took 22-47 s with one thread and had not finished after 280 s with two).

    Returns:
        ``{"clean": rows, "noisy": rows, "meta": {...}}`` with rows as in :func:`run_condition` (``model``,
        ``id_acc``, ``ood_acc``, ``arch``, ``n_train``, ``epochs``, ...).
    """
    if isinstance(config, str):
        if config not in SCALES:
            raise ValueError(f"digits_sweep: config must be a DigitsCueConfig or one of {sorted(SCALES)}, got "
                             f"{config!r}")
        config = SCALES[config]
    cfg = config
    mode = next((name for name, row in SCALES.items() if row == cfg), "custom")  # recorded in meta
    cfg.validate()
    with contextlib.ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory())) if out_dir is None else Path(out_dir)
        if threads is not None:
            stack.enter_context(limit_threads(threads, device=device))
        t0 = time.perf_counter()
        clean, info_c = run_condition(cfg, noisy=False, seed=seed, device=device, progress=progress,
                                      out_dir=root / "digits_runs" / "clean")
        t1 = time.perf_counter()
        noisy, info_n = run_condition(cfg, noisy=True, seed=seed, device=device, progress=progress,
                                      out_dir=root / "digits_runs" / "noisy")
        t2 = time.perf_counter()
        used_threads = torch.get_num_threads()
    meta = {
        "dataset": "sklearn digits (build_dataset('digits'), stratified 80/20 split fixed by seed)",
        "settings": {**asdict(cfg), "archs": [[a, n, kw] for a, n, kw in cfg.archs]},
        "mode": mode,
        "seed": seed,
        "ood": "same test images, cue drawn uniformly (independent of the class); ID: cue = class w.p. cue_p",
        "training": "ratelab.train.Trainer: AdamW at constant lr, cross-entropy, fp32, ragged epoch tail dropped",
        "clean": info_c,
        "noisy": info_n,
        "wall_s": {"clean": round(t1 - t0, 2), "noisy": round(t2 - t1, 2), "total": round(t2 - t0, 2)},
        "torch_threads": used_threads,
        "variations_tried": list(VARIATIONS_TRIED),
    }
    return {"clean": clean, "noisy": noisy, "meta": meta}


def with_overrides(cfg: DigitsCueConfig, **kw: Any) -> DigitsCueConfig:
    """``dataclasses.replace`` with validation (for the variations tried in the study)."""
    out = replace(cfg, **kw)
    out.validate()
    return out
