"""Recipe ``crate-mae``: CRATE-MAE against a ViT-MAE of the same configuration, on digits.

Paper: Pai, Wu, Buchanan, Yu, Ma, "Masked Completion via Structured Diffusion with White-Box Transformers" (ICLR
2024). CRATE-MAE-B has 44.6M parameters against 143.8M for the matched ViT-MAE-B (~30%); its linear-probe accuracy is
below ViT-MAE's (CIFAR-10: 80.9 vs 87.9 at B), and its decoder is built as the inverse of its encoder. Re-measured
here at toy scale: ``crate_mae_pico_patch4_16`` and ``mae_vit_pico_patch4_16`` (same width, depth, heads, patch 4;
the ViT-MAE decoder as wide and deep as its encoder, like the paper's ViT-MAE-B twin), trained with the ``mae`` task
on sklearn's digits at 16x16 (16 patches, 75% masked), the same masks for both in evaluation.

Measured per model: parameters; the held-out masked-patch reconstruction loss (fixed mask per validation image,
pixels normalized as the dataset is); a linear probe of the frozen encoder's [CLS] and mean-pooled features (fitted on
the 1438 un-augmented training images, scored on the 359 validation images) against the same probe on the randomly
initialized encoder; reconstructions. For CRATE-MAE also the per-layer coding rate R^c of the encoder and of the
decoder on unmasked validation images: the decoder is meant to undo the encoder's compression.

Both models: AdamW lr 1e-3, weight decay 0.05, grad clip 1, batch 128, 2 warm-up epochs (without clipping, CRATE-MAE at
lr 3e-3 collapsed to predicting the mean: held-out loss 0.99 where ViT-MAE reached 0.48).

Commands (scales in ``SCALES``)::

    ratelab reproduce crate-mae --scale quick --out runs/crate-mae       # 2 seeds, 25 epochs
    ratelab reproduce crate-mae --scale full --out runs/crate-mae-full   # nano size, 3 seeds, 100 epochs

Measured (quick, 2 seeds, 1 thread, 66 s; docs/records/demo_quick.json): parameters 109,712 vs 407,184 (0.27; at
B/16 44.64M vs 143.79M = 0.310, the paper's ~30%); held-out masked-patch loss CRATE-MAE 0.491 vs ViT-MAE 0.477
(+3%); linear probe (best of [CLS] / mean-pool) CRATE-MAE 0.822 vs ViT-MAE 0.904 (ViT-MAE ahead, beyond 2 SE, as in
the paper) -- but a randomly initialized CRATE-MAE encoder probes 0.826, so at this scale CRATE-MAE's pre-training
adds nothing a linear probe can see. Per-layer R^c falls through the encoder (76.7 -> 62.4 nats) and keeps falling
through the decoder (57.4 -> 41.8): the decoder does not undo the encoder's compression here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ratelab.eval.report import Report
from ratelab.recipes import RecipeResult, check, register_recipe
from ratelab.recipes._common import accuracy_difference, add_figure, logger, resolve_device, spearman, train_arm

IMG = 16
FAMILIES = {"crate_mae": "CRATE-MAE", "mae_vit": "ViT-MAE"}
BASE_PAIR = ("crate_mae_base_patch16_224", "mae_vit_base_patch16_224")


@dataclass(frozen=True)
class Scale:
    """Settings of one scale.

    Attributes:
        size: the registered size of both models (``pico``/``nano``/``test``).
        epochs: training epochs per model and seed.
        seeds: training seeds.
        mask_ratio: fraction of patches masked in training and evaluation.
        max_steps: cap on optimizer steps (smoke only).
    """

    size: str
    epochs: int
    seeds: int
    mask_ratio: float = 0.75
    max_steps: int | None = None


SCALES = {
    "smoke": Scale("test", epochs=1, seeds=1, max_steps=3),
    "quick": Scale("pico", epochs=25, seeds=2),
    "full": Scale("nano", epochs=100, seeds=3),
}


def _name(family: str, size: str) -> str:
    return f"test_{family}" if size == "test" else f"{family}_{size}_patch4_16"


def _n_params(name: str, **kw: Any) -> int:
    import ratelab

    with torch.device("meta"):
        return sum(p.numel() for p in ratelab.create_model(name, **kw).parameters())


def _depth_spearman(y: list[float]) -> float:
    return spearman(np.arange(len(y)), y)


@register_recipe(
    "crate-mae",
    paper="CRATE-MAE (Pai et al., ICLR 2024)",
    description="CRATE-MAE vs a same-configuration ViT-MAE on digits: parameters, held-out masked-patch loss, linear "
                "probe of frozen features, reconstructions, per-layer rates of encoder and decoder",
    scales=SCALES,
    quick_seconds=70,
)
def run(out_dir: Path, *, scale: str, seed: int, device: str, progress: bool) -> RecipeResult:
    import ratelab
    from ratelab.analysis.layer_rates import measure_layers
    from ratelab.data import build_dataset
    from ratelab.eval.probe import probe_encoder
    from ratelab.eval.reconstruction import reconstruct, reconstruction_figure
    from ratelab.train import MAETask
    from ratelab.train.mae_task import eval_noise

    row = SCALES[scale]
    log = logger(progress, "crate-mae")
    dev = resolve_device(device)
    common = dict(img_size=IMG, in_chans=1)
    train = build_dataset("digits", "train", img_size=IMG, seed=0)
    fit = build_dataset("digits", "train", img_size=IMG, seed=0, augment=False)
    val = build_dataset("digits", "val", img_size=IMG, seed=0)
    n_val = len(val)
    seeds = [seed + i for i in range(row.seeds)]
    task = {"name": "mae", "mask_ratio": row.mask_ratio, "probe": True, "n_recon": 0}
    runs: dict[str, list[dict[str, Any]]] = {f: [] for f in FAMILIES}
    random_probe: dict[str, list[dict[str, float]]] = {f: [] for f in FAMILIES}
    models: dict[str, torch.nn.Module] = {}
    for fam in FAMILIES:
        name = _name(fam, row.size)
        for s in seeds:
            torch.manual_seed(s)
            random_probe[fam].append(probe_encoder(ratelab.create_model(name, **common).to(dev), fit, val,
                                                    device=dev))
            r = train_arm(name, lambda name=name: ratelab.create_model(name, **common), train_dataset=train,
                          val_dataset=val, out_dir=out_dir, seed=s, device=device, progress=False,
                          task_cls=MAETask, task_kwargs={"fit_dataset": fit}, task=task, dataset="digits",
                          img_size=IMG, epochs=row.epochs, max_steps=row.max_steps, batch_size=128,
                          optimizer="adamw", lr=1e-3, weight_decay=0.05, warmup_epochs=min(2.0, row.epochs / 5),
                          min_lr=1e-5, grad_clip=1.0, eval_every=0)
            f = r["final"]
            runs[fam].append({"seed": s, "val_loss": float(f["val_loss"]),
                              "probe_cls": float(f["val_probe_acc_cls"]), "probe_mean": float(f["val_probe_acc_mean"]),
                              "time_s": float(f["time_s"]), "params": sum(p.numel() for p in r["model"].parameters())})
            if s == seeds[0]:
                models[fam] = r["model"]
            log(f"{name} seed {s}: held-out loss {f['val_loss']:.4f}, probe [CLS] {f['val_probe_acc_cls']:.4f} / mean "
                f"{f['val_probe_acc_mean']:.4f} (random init {random_probe[fam][-1]['probe_acc_cls']:.4f})")

    def col(fam: str, key: str) -> list[float]:
        return [r[key] for r in runs[fam]]

    # ---- per-layer rates of CRATE-MAE (seed 0), unmasked validation images -----------------------------------
    images = torch.stack([val[i][0] for i in range(min(n_val, 256))]).to(dev)
    cm = models["crate_mae"]
    enc = measure_layers(cm, images)
    dec = measure_layers(cm.layer_stack("decoder"), images)
    enc_rc = [la["compression"] for la in enc["layers"]]
    dec_rc = [la["compression"] for la in dec["layers"]]

    # ---- claims ---------------------------------------------------------------------------------------------
    p_small = {f: runs[f][0]["params"] for f in FAMILIES}
    p_base = {f: _n_params(n) for f, n in zip(FAMILIES, BASE_PAIR)}
    loss = {f: float(np.mean(col(f, "val_loss"))) for f in FAMILIES}
    best = {f: max(float(np.mean(col(f, "probe_cls"))), float(np.mean(col(f, "probe_mean")))) for f in FAMILIES}
    best_key = {f: "probe_cls" if np.mean(col(f, "probe_cls")) >= np.mean(col(f, "probe_mean")) else "probe_mean"
                for f in FAMILIES}
    rand_best = {f: [max(r["probe_acc_cls"], r["probe_acc_mean"]) for r in random_probe[f]] for f in FAMILIES}
    crate_vs_rand = accuracy_difference(col("crate_mae", best_key["crate_mae"]), rand_best["crate_mae"], n_val)
    vit_vs_crate = accuracy_difference(col("mae_vit", best_key["mae_vit"]), col("crate_mae", best_key["crate_mae"]),
                                       n_val)
    ratio_base = p_base["crate_mae"] / p_base["mae_vit"]
    checks = [
        check("CRATE-MAE has about 30% of the matched ViT-MAE's parameters (B: 44.6M vs 143.8M)",
              0.25 <= ratio_base <= 0.35,
              f"B: {p_base['crate_mae'] / 1e6:.2f}M vs {p_base['mae_vit'] / 1e6:.2f}M = {ratio_base:.3f}; recipe size "
              f"{p_small['crate_mae']:,} vs {p_small['mae_vit']:,} = {p_small['crate_mae'] / p_small['mae_vit']:.3f}"),
        check("CRATE-MAE reconstructs held-out masked patches about as well as ViT-MAE (loss within 10%)",
              loss["crate_mae"] <= 1.10 * loss["mae_vit"],
              f"CRATE-MAE {loss['crate_mae']:.4f} vs ViT-MAE {loss['mae_vit']:.4f} "
              f"({100 * (loss['crate_mae'] / loss['mae_vit'] - 1):+.1f}%)"),
        check("CRATE-MAE's frozen features probe better than its random-init encoder's, beyond 2 SE",
              bool(crate_vs_rand["better"]),
              f"{best['crate_mae']:.4f} vs {np.mean(rand_best['crate_mae']):.4f}: "
              f"{100 * crate_vs_rand['diff']:+.2f} points (2 SE = {100 * crate_vs_rand['two_se']:.2f})"),
        check("ViT-MAE's frozen features probe better than CRATE-MAE's (paper, B on CIFAR-10: 87.9 vs 80.9), "
              "beyond 2 SE", bool(vit_vs_crate["better"]),
              f"{best['mae_vit']:.4f} vs {best['crate_mae']:.4f}: {100 * vit_vs_crate['diff']:+.2f} points "
              f"(2 SE = {100 * vit_vs_crate['two_se']:.2f})"),
        check("the decoder undoes the encoder's compression: encoder R^c falls with depth, decoder R^c rises",
              _depth_spearman(enc_rc) < 0 < _depth_spearman(dec_rc),
              f"Spearman(depth, R^c) encoder {_depth_spearman(enc_rc):+.2f} ({enc_rc[0]:.1f} -> {enc_rc[-1]:.1f}), "
              f"decoder {_depth_spearman(dec_rc):+.2f} ({dec_rc[0]:.1f} -> {dec_rc[-1]:.1f})"),
    ]
    summary = {
        **{f"params {FAMILIES[f]}": p_small[f] for f in FAMILIES},
        **{f"params {FAMILIES[f]}-B": p_base[f] for f in FAMILIES},
        **{f"held-out loss {FAMILIES[f]}": loss[f] for f in FAMILIES},
        **{f"probe [CLS] {FAMILIES[f]}": float(np.mean(col(f, "probe_cls"))) for f in FAMILIES},
        **{f"probe mean-pool {FAMILIES[f]}": float(np.mean(col(f, "probe_mean"))) for f in FAMILIES},
        **{f"probe random init {FAMILIES[f]}": float(np.mean(rand_best[f])) for f in FAMILIES},
        "encoder R^c per layer": enc_rc,
        "decoder R^c per layer": dec_rc,
        "train_time_s": float(sum(r["time_s"] for f in FAMILIES for r in runs[f])),
    }
    results = {"summary": summary, "checks": checks, "runs": runs, "random_init_probe": random_probe,
               "layer_rates": {"encoder": enc, "decoder": dec}}

    # ---- report ---------------------------------------------------------------------------------------------
    report = Report("CRATE-MAE vs ViT-MAE on digits")
    report.text(
        f"Scale {scale}: {_name('crate_mae', row.size)} and {_name('mae_vit', row.size)}, {row.epochs} epochs, "
        f"{row.seeds} seed(s), {int(100 * row.mask_ratio)}% of the 16 patches masked; {n_val} validation images "
        "with a fixed mask each (the same for both models). Probe: logistic regression (C = 1) on standardized "
        "frozen features."
    )
    report.heading("Claims")
    report.checks(checks)
    report.heading("Reconstruction and probes")
    report.table([[FAMILIES[f], p_small[f], p_base[f], loss[f], float(np.mean(col(f, "probe_cls"))),
                   float(np.mean(col(f, "probe_mean"))), float(np.mean(rand_best[f]))] for f in FAMILIES],
                 headers=["model", "params (recipe)", "params (B/16)", "held-out loss", "probe [CLS]",
                          "probe mean-pool", "probe, random init"])
    report.heading("Per-layer rates of CRATE-MAE")
    report.table([[i + 1, enc_rc[i], dec_rc[i] if i < len(dec_rc) else float("nan")]
                  for i in range(max(len(enc_rc), len(dec_rc)))],
                 headers=["layer (1 = first)", "encoder R^c", "decoder R^c"])
    report.heading("Reconstructions")
    x = images[:6]
    noise = eval_noise(list(range(6)), models["crate_mae"].patchify(x[:1]).shape[1], seeds[0]).to(x.device)
    for fam, m in models.items():
        parts = reconstruct(m, x, mask_ratio=row.mask_ratio, noise=noise)
        add_figure(report, reconstruction_figure(parts, title=f"{FAMILIES[fam]}, held-out digits"), out_dir,
                   f"reconstructions_{fam}.png", f"{FAMILIES[fam]}: original, masked input, reconstruction, "
                   "reconstruction with the visible patches pasted back (same masks for both models)")
    add_figure(report, _rates_figure(enc_rc, dec_rc), out_dir, "layer_rates.png",
               "coding rate R^c per layer of CRATE-MAE's encoder and decoder (unmasked validation images)")
    return RecipeResult(results, report)


def _rates_figure(enc: list[float], dec: list[float]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.4))
    ax = fig.subplots()
    ax.plot(range(1, len(enc) + 1), enc, "-o", label="encoder")
    ax.plot(range(len(enc) + 1, len(enc) + len(dec) + 1), dec, "-s", label="decoder")
    ax.set(xlabel="layer (encoder, then decoder)", ylabel="R^c (nats, sum over heads)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
