"""Recipe ``crate-alpha``: what each of CRATE-α's three changes buys, how the two families scale with width, and
the light recipe, on digits (and shapes and CIFAR-10 at full scale).

Paper: Yang, Li, Pai, Zhou, Ma, Yu, Xie, "Scaling White-Box Transformers for Vision" (NeurIPS 2024). Three claims
are re-measured at toy scale, on sklearn's digits upsampled to 16x16 (1438 train / 359 val, patch 4 = 16 tokens):

(a) the ablation of the paper's Fig. 1, in small: CRATE, then + overcomplete dictionary (D in R^{d x 4d}, two
    proximal steps from zero, output D A), + decoupled (output D_hat A), + residual (= CRATE-α), at equal width,
    depth and training budget (the paper: B/32 on ImageNet-21K -> 1K, ending at 76.5%);
(b) scaling: accuracy against width for CRATE and CRATE-α (the paper: CRATE saturates, L only 0.5 points above B,
    while CRATE-α keeps improving);
(c) the light recipe: train at patch 8 (4 tokens), then fine-tune at patch 4 from it (patch embedding
    re-initialized, position embedding resampled: ``ratelab train --init-from``), against training patch 4 from
    scratch at equal compute, compute counted as tokens x steps.

The full scale repeats the study on ``shapes`` (32 px RGB, patch 8 / 16) and on CIFAR-10 (10k training / 2k test
images, same patching) when its pickles are under ``$RATELAB_DATA`` (nothing is downloaded; a missing CIFAR-10 is
named in ``results.json["datasets_not_found"]`` and in the report). Claims and summary keys of every dataset after
the first carry its name (``"cifar10: CRATE-α beats CRATE ..."``).

CRATE is ``crate_pico_patch4_16`` at the same width/depth/heads (its own stem: LN-Linear-LN patch embedding); the
CRATE-α arms are ``crate_alpha_pico_patch4_16`` with ``decoupled``/``residual`` switched (conv stem, learned
positions, final LayerNorm in every arm). All arms: AdamW, lr 3e-3, weight decay 0.05 (CRATE-α: kernels only),
label smoothing 0.1, grad clip 1, batch 64, no augmentation. (With the digits dataset's 2-pixel shifts, half a patch
here, every conv-stem arm fell to 0.42-0.50 validation accuracy at lr 1e-3 while CRATE kept 0.905; without them
CRATE-α reached 0.74 at lr 1e-3 and 0.89 at lr 3e-3, seed 0.) An arm "beats" another only when
the difference of mean validation accuracies exceeds twice its standard error (binomial error of 359 images plus
the spread over seeds: ``ratelab.recipes._common.accuracy_difference``).

Commands (scales in ``SCALES``)::

    ratelab reproduce crate-alpha --scale quick --out runs/crate-alpha    # 2 seeds, 15 epochs
    ratelab reproduce crate-alpha --scale full --out runs/crate-alpha-full  # 5 seeds, 40 epochs, wider sweep

Measured (quick, seed 0, 2 seeds, 1 thread, 118 s; docs/records/demo_quick.json): validation accuracy CRATE 0.9875,
+ overcomplete 0.8858, + decoupled 0.8593, + residual (CRATE-α) 0.8760 (2 SE about 5 points): at 15 epochs on
digits vanilla CRATE is best and none of the three steps helps beyond noise, the opposite of Fig. 1 (which is at
ImageNet-21K scale). Width 64 -> 128: CRATE +0.14 points (saturated near 0.99), CRATE-α +6.8 points (0.876 ->
0.944), so CRATE-α keeps improving where CRATE has stopped, as the paper says, though from lower. Light recipe
(17 epochs at patch 8, then 10 at patch 4) 0.8969 vs 0.8760 from scratch at equal token-epochs: no worse.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ratelab.eval.report import Report
from ratelab.recipes import RecipeResult, check, register_recipe
from ratelab.recipes._common import accuracy_difference, add_figure, logger, train_arm

ARMS = ("crate", "+ overcomplete", "+ decoupled", "+ residual (CRATE-α)")
ALPHA_FLAGS = {"+ overcomplete": dict(decoupled=False, residual=False),
               "+ decoupled": dict(decoupled=True, residual=False),
               "+ residual (CRATE-α)": dict(decoupled=True, residual=True)}


@dataclass(frozen=True)
class DataSpec:
    """One dataset of the study: its size and patching (``patch`` for every arm, ``big_patch`` for the light
    recipe's pre-training), and caps on its splits (a random subset, fixed by seed 0; None = the whole split)."""

    name: str
    img: int
    chans: int
    classes: int
    patch: int
    big_patch: int
    train_size: int | None = None
    val_size: int | None = None


# Every dataset gets 16 tokens (+ [CLS]) per image at ``patch`` and 4 at ``big_patch``, so the compute per image is
# the same on each. CIFAR-10 is capped at 10k / 2k images: the full scale trains ~35 models per dataset on a CPU.
DATA = {
    "digits": DataSpec("digits", 16, 1, 10, 4, 8),
    "shapes": DataSpec("shapes", 32, 3, 6, 8, 16),
    "cifar10": DataSpec("cifar10", 32, 3, 10, 8, 16, train_size=10_000, val_size=2_000),
}


@dataclass(frozen=True)
class Scale:
    """Settings of one scale.

    Attributes:
        width, depth, heads: the ablation's shape (every arm).
        epochs: training epochs of every from-scratch arm (the budget).
        seeds: seeds per ablation arm.
        widths: the scaling sweep (one seed per width beyond the ablation's).
        light_ft_frac: the light recipe's fine-tuning epochs as a fraction of ``epochs``; its pre-training epochs
            at the big patch fill the rest of the compute budget.
        datasets: keys of :data:`DATA`, each studied in turn. ``cifar10`` runs when its pickles are under
            ``$RATELAB_DATA`` (or ``./data``); otherwise the results and the report say it was not found.
        max_steps: cap on optimizer steps per run (smoke only).
    """

    width: int
    depth: int
    heads: int
    epochs: int
    seeds: int
    widths: tuple[int, ...]
    light_ft_frac: float
    datasets: tuple[str, ...] = ("digits",)
    max_steps: int | None = None


SCALES = {
    "smoke": Scale(width=16, depth=1, heads=2, epochs=1, seeds=1, widths=(8, 16), light_ft_frac=0.5, max_steps=3),
    "quick": Scale(width=64, depth=4, heads=4, epochs=15, seeds=2, widths=(32, 64, 128), light_ft_frac=0.7),
    "full": Scale(width=64, depth=4, heads=4, epochs=40, seeds=5, widths=(32, 64, 128, 256), light_ft_frac=0.7,
                  datasets=("digits", "shapes", "cifar10")),
}


def _factory(arm: str, width: int, depth: int, heads: int, ds: DataSpec, patch: int):
    import ratelab

    common = dict(embed_dim=width, depth=depth, num_heads=heads, patch_size=patch, img_size=ds.img,
                  in_chans=ds.chans, num_classes=ds.classes)
    if arm == "crate":
        return lambda: ratelab.create_model("crate_pico_patch4_16", **common)
    return lambda: ratelab.create_model("crate_alpha_pico_patch4_16", **common, **ALPHA_FLAGS[arm])


def _tokens(ds: DataSpec, patch: int) -> int:
    return (ds.img // patch) ** 2 + 1


def _settings(row: Scale, ds: DataSpec, epochs: int) -> dict[str, Any]:
    return dict(dataset=ds.name, img_size=ds.img, epochs=epochs, max_steps=row.max_steps, batch_size=64,
                optimizer="adamw", lr=3e-3, weight_decay=0.05, warmup_epochs=min(2.0, max(epochs / 10, 0.5)),
                min_lr=1e-5, label_smoothing=0.1, grad_clip=1.0, eval_every=0)


def _subset(dataset: Any, size: int | None) -> Any:
    from torch.utils.data import Subset

    if size is None or size >= len(dataset):
        return dataset
    return Subset(dataset, np.random.default_rng(0).permutation(len(dataset))[:size].tolist())


def _load(ds: DataSpec) -> tuple[Any, Any]:
    """(train, val) without augmentation. No random shifts: 2 pixels are half a patch on digits, and with them the
    conv-stem arms fell to 0.42-0.50 while CRATE (LN-Linear-LN stem) kept 0.905 (quick, lr 1e-3) -- a property of
    the stem, not of the ODL block."""
    from ratelab.data import build_dataset

    train = build_dataset(ds.name, "train", img_size=ds.img, seed=0, augment=False)
    val = build_dataset(ds.name, "val", img_size=ds.img, seed=0)
    return _subset(train, ds.train_size), _subset(val, ds.val_size)


@register_recipe(
    "crate-alpha",
    paper="CRATE-α (Yang et al., NeurIPS 2024)",
    description="CRATE -> +overcomplete -> +decoupled -> +residual ablation, accuracy vs width for CRATE and "
                "CRATE-α, and the light recipe (big patch -> small) vs scratch at equal compute, on digits (full "
                "scale: also shapes, and CIFAR-10 when its pickles are present)",
    scales=SCALES,
    quick_seconds=120,
)
def run(out_dir: Path, *, scale: str, seed: int, device: str, progress: bool) -> RecipeResult:
    from ratelab.core.errors import DatasetNotFound

    row = SCALES[scale]
    log = logger(progress, "crate-alpha")
    studies, skipped = [], {}
    for i, key in enumerate(row.datasets):
        ds = DATA[key]
        try:
            train, val = _load(ds)
        except DatasetNotFound as e:
            skipped[key] = str(e)
            log(f"{key}: not run ({e})")
            continue
        studies.append(_study(ds, train, val, row, out_dir / key if i else out_dir, seed, device, log,
                              prefix=f"{key}: " if i else ""))
    if not studies:
        raise DatasetNotFound(f"crate-alpha: none of the datasets {list(row.datasets)} could be loaded: {skipped}")
    first = studies[0]
    results = {"summary": {k: v for s in studies for k, v in s["summary"].items()},
               "checks": [c for s in studies for c in s["checks"]],
               "runs": [r for s in studies for r in s["runs"]],
               "compute_token_epochs": first["compute"],
               "datasets": [s["dataset"] for s in studies], "datasets_not_found": skipped}
    if len(studies) > 1:
        results["compute_token_epochs_by_dataset"] = {s["dataset"]: s["compute"] for s in studies}

    names = " and ".join(s["dataset"] for s in studies)
    report = Report(f"CRATE-α on {names}: ablation, width scaling, light recipe")
    for key, why in skipped.items():
        report.text(f"{key}: not run -- {why}")
    report.heading("Claims")
    report.checks(results["checks"])
    for s in studies:
        if len(studies) > 1:
            report.heading(f"{s['dataset']}")
        s["report"](report, scale)
    return RecipeResult(results, report)


def _study(ds: DataSpec, train: Any, val: Any, row: Scale, out_dir: Path, seed: int, device: str, log: Any, *,
           prefix: str) -> dict[str, Any]:
    """The three measurements on one dataset: claims (each prefixed with ``prefix``), summary, runs, and a function
    adding this dataset's tables and figure to a report."""
    n_val = len(val)
    patch, big = ds.patch, ds.big_patch
    data = dict(train_dataset=train, val_dataset=val, out_dir=out_dir, device=device, progress=False)
    seeds = [seed + i for i in range(row.seeds)]
    runs: list[dict[str, Any]] = []

    def fit(arm: str, width: int, s: int, *, patch: int = patch, epochs: int | None = None, tag: str = "",
            **extra: Any) -> dict[str, Any]:
        name = f"{tag or arm} w{width} p{patch}"
        r = train_arm(name, extra.pop("factory", None) or _factory(arm, width, row.depth, row.heads, ds, patch),
                      seed=s, **data, **_settings(row, ds, epochs or row.epochs), **extra)
        n_params = sum(p.numel() for p in r["model"].parameters())
        rec = {"dataset": ds.name, "arm": tag or arm, "width": width, "patch": patch, "seed": s,
               "val_acc": float(r["final"]["val_acc"]), "steps": int(r["final"]["steps"]),
               "time_s": float(r["final"]["time_s"]), "params": n_params, "run_dir": str(r["run_dir"])}
        runs.append(rec)
        log(f"{prefix}{name} seed {s}: val acc {rec['val_acc']:.4f} ({n_params / 1e3:.1f}k params, "
            f"{rec['time_s']:.1f} s)")
        return rec

    # (a) ablation at the scale's width, every seed
    abl = {arm: [fit(arm, row.width, s) for s in seeds] for arm in ARMS}
    acc = {arm: [r["val_acc"] for r in rs] for arm, rs in abl.items()}
    # (b) width sweep: CRATE and CRATE-α, the ablation's runs reused at its width
    sweep: dict[str, dict[int, list[float]]] = {"crate": {}, "+ residual (CRATE-α)": {}}
    for arm in sweep:
        for w in row.widths:
            sweep[arm][w] = acc[arm] if w == row.width else [fit(arm, w, seeds[0])["val_acc"]]
    # (c) light recipe at equal compute (tokens x steps): big-patch pre-training then small-patch fine-tuning
    ft_epochs = max(1, round(row.light_ft_frac * row.epochs))
    pre_epochs = max(1, round((row.epochs - ft_epochs) * _tokens(ds, patch) / _tokens(ds, big)))
    light = []
    for s in seeds:
        pre = fit("+ residual (CRATE-α)", row.width, s, patch=big, epochs=pre_epochs, tag="light pre-train")
        from ratelab.core.init_from import init_from

        base = _factory("+ residual (CRATE-α)", row.width, row.depth, row.heads, ds, patch)

        def start_from_big(base=base, src=pre["run_dir"]):
            m = base()
            init_from(m, src, reinit=("patch_embed",))
            return m

        ft = fit("+ residual (CRATE-α)", row.width, s, epochs=ft_epochs, tag="light fine-tune", factory=start_from_big)
        light.append({"pre": pre, "ft": ft})
    light_acc = [x["ft"]["val_acc"] for x in light]
    compute = {"scratch": row.epochs * _tokens(ds, patch),
               "light": pre_epochs * _tokens(ds, big) + ft_epochs * _tokens(ds, patch)}

    # ---- claims ---------------------------------------------------------------------------------------------
    def step(a: str, b: str) -> tuple[bool, str]:
        d = accuracy_difference(acc[a], acc[b], n_val)
        return bool(d["better"]), (f"{np.mean(acc[a]):.4f} vs {np.mean(acc[b]):.4f}: {100 * d['diff']:+.2f} points "
                                   f"(2 SE = {100 * d['two_se']:.2f})")

    full_ok, full_txt = step(ARMS[3], ARMS[0])
    steps = [step(ARMS[i + 1], ARMS[i]) for i in range(3)]
    w_mid, w_hi = row.widths[len(row.widths) // 2], row.widths[-1]

    def gain(arm: str) -> dict[str, Any]:
        return accuracy_difference(sweep[arm][w_hi], sweep[arm][w_mid], n_val)

    g_crate, g_alpha = gain("crate"), gain("+ residual (CRATE-α)")
    keeps = bool(g_alpha["better"] and not g_crate["better"])
    light_d = accuracy_difference(light_acc, acc[ARMS[3]], n_val)
    checks = [
        check(f"{prefix}CRATE-α beats CRATE at equal width, depth and budget (Fig. 1: the three changes together)",
              full_ok, full_txt),
        *[check(f"{prefix}{ARMS[i + 1]} improves on the arm before it (Fig. 1, step by step)", ok, txt)
          for i, (ok, txt) in enumerate(steps)],
        check(f"{prefix}CRATE-α keeps improving with width where CRATE saturates (width {w_mid} -> {w_hi})", keeps,
              f"CRATE {100 * g_crate['diff']:+.2f} points, CRATE-α {100 * g_alpha['diff']:+.2f} points "
              f"(2 SE {100 * g_crate['two_se']:.2f} / {100 * g_alpha['two_se']:.2f})"),
        check(f"{prefix}light recipe (patch {big} -> {patch}) is at least as accurate as patch {patch} from scratch "
              "at equal compute",
              light_d["diff"] >= -light_d["two_se"],
              f"{np.mean(light_acc):.4f} vs {np.mean(acc[ARMS[3]]):.4f}: {100 * light_d['diff']:+.2f} points "
              f"(2 SE = {100 * light_d['two_se']:.2f}); compute {compute['light']} vs {compute['scratch']} "
              "token-epochs"),
    ]
    params = {arm: abl[arm][0]["params"] for arm in ARMS}
    summary = {
        **{f"{prefix}acc {arm}": float(np.mean(v)) for arm, v in acc.items()},
        **{f"{prefix}params {arm}": params[arm] for arm in ARMS},
        **{f"{prefix}acc crate w{w}": float(np.mean(v)) for w, v in sweep["crate"].items()},
        **{f"{prefix}acc crate-alpha w{w}": float(np.mean(v)) for w, v in sweep["+ residual (CRATE-α)"].items()},
        f"{prefix}acc light recipe": float(np.mean(light_acc)),
        f"{prefix}light epochs (pre-train p{big}, fine-tune p{patch})": [pre_epochs, ft_epochs],
        f"{prefix}train_time_s": float(sum(r["time_s"] for r in runs)),
    }

    def add_report(report: Report, scale: str) -> None:
        report.text(
            f"Scale {scale}: width {row.width}, depth {row.depth}, {row.heads} heads, {row.epochs} epochs per "
            f"from-scratch arm, {row.seeds} seed(s); {ds.name} {ds.img}x{ds.img} at patch {patch} "
            f"({_tokens(ds, patch)} tokens with [CLS]); {len(train)} training and {n_val} validation images. Light "
            f"recipe: {pre_epochs} epochs at patch {big} ({_tokens(ds, big)} tokens), then {ft_epochs} epochs at "
            f"patch {patch} from it (patch embedding re-initialized, positions resampled)."
        )
        report.heading("Ablation (Fig. 1 in small)")
        report.table([[arm, params[arm], float(np.mean(acc[arm])), float(np.std(acc[arm])), len(acc[arm])]
                      for arm in ARMS], headers=["arm", "params", "val acc (mean)", "std over seeds", "seeds"])
        report.heading("Accuracy vs width")
        report.table([[w, float(np.mean(sweep["crate"][w])), float(np.mean(sweep["+ residual (CRATE-α)"][w]))]
                      for w in row.widths], headers=["width", "CRATE val acc", "CRATE-α val acc"])
        report.heading("Light recipe vs scratch")
        report.table([[f"light (p{big} pre-train + p{patch} fine-tune)", compute["light"], float(np.mean(light_acc)),
                       float(sum(x["pre"]["time_s"] + x["ft"]["time_s"] for x in light) / len(light))],
                      [f"scratch (p{patch})", compute["scratch"], float(np.mean(acc[ARMS[3]])),
                       float(np.mean([r["time_s"] for r in abl[ARMS[3]]]))]],
                     headers=["arm", "compute (token-epochs)", "val acc", "train time (s)"])
        report.heading("Figures")
        add_figure(report, _figure(acc, sweep, row.widths, light_acc), out_dir, f"crate_alpha_{ds.name}.png"
                   if prefix else "crate_alpha.png",
                   "left: the ablation arms (dots: seeds); right: validation accuracy against width")

    return {"dataset": ds.name, "checks": checks, "summary": summary, "runs": runs, "compute": compute,
            "report": add_report}


def _figure(acc: dict[str, list[float]], sweep: dict[str, dict[int, list[float]]], widths: tuple[int, ...],
            light: list[float]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6))
    ax1, ax2 = fig.subplots(1, 2)
    names = [*ARMS, "light recipe"]
    vals = [acc[a] for a in ARMS] + [light]
    ax1.bar(range(len(names)), [np.mean(v) for v in vals], color=["#888"] + ["#4a90d9"] * 3 + ["#e8a33d"])
    for i, v in enumerate(vals):
        ax1.plot([i] * len(v), v, "k.", ms=4)
    lo = min(min(v) for v in vals)
    ax1.set(ylim=(max(0.0, lo - 0.05), 1.0), ylabel="validation accuracy", xticks=range(len(names)))
    ax1.set_xticklabels([n.replace(" (CRATE-α)", "\n(CRATE-α)") for n in names], fontsize=7, rotation=15)
    for arm, label in (("crate", "CRATE"), ("+ residual (CRATE-α)", "CRATE-α")):
        ax2.plot(widths, [np.mean(sweep[arm][w]) for w in widths], "-o", label=label)
    ax2.set(xscale="log", xticks=list(widths), xticklabels=[str(w) for w in widths], xlabel="width",
            ylabel="validation accuracy")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return fig
