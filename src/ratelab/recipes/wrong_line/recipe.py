"""Recipe ``wrong-line``: accuracy on the line vs on the wrong line, synthetic and on digits.

Paper: Sanyal, Hu, Yu, Ma, Wang, Schölkopf, "Accuracy on the wrong line: On the pitfalls of noisy data for
out-of-distribution generalisation" (AISTATS 2025). Claims (abstract): noisy labels plus nuisance features can turn
the usual positive probit-probit correlation of ID and OOD accuracy across models (Miller et al., ICML 2021)
negative; scaling the dataset does not help; a lower bound on OOD error of linear interpolating classifiers.

Synthetic part (:mod:`ratelab.analysis.wrong_line`, design note ``wrong_line.md`` §2-§4): halfspace teacher on 16
core features, 800 000 nearly constant nuisance features (energy 0.1), label noise η, OOD = nuisance std x10, hard-
margin linear SVM (interpolating), one model per training-set size n ∈ [400, 4000] (12 sizes, nested prefixes),
20 learning curves per η. The 20-seed sweeps use the d_n -> ∞ reduction (squared-hinge SVM on the core features);
the exact finite-d_n model (Wishart-sampled nuisance Gram, exact hard-margin dual) is fitted on the same data
streams for a subset (quick: 1 seed, n <= 1404; full: 3 seeds at the note's sizes) and must agree to 0.005.
Also: the long learning curve (n = 100 ... 40 000), the per-curve r as a function of the OOD multiplier s, the
interpolation lower bound of note §3 against the exact models' OOD error, and the literal reading of the paper's
300-d task (note §1.4: it stays on the line).

Digits part (:mod:`ratelab.recipes.wrong_line.digits`): networks of the library trained on digits with a colour cue
correlated with the label in training and ID test and random in the OOD test, with and without label noise.

``corr_clean`` / ``corr_noisy`` (top level of results.json) are the mean over the 20 synthetic learning curves of the
Pearson r of probit(ID) vs probit(OOD) accuracy across the 12 models of each curve, for η = 0 and η = 0.2 (the note's
main noisy setting), each with a 95 % bootstrap interval over curves. Pooled fits over all models of an η are in
``synthetic.by_noise``.

Commands (scales in ``SCALES``)::

    ratelab reproduce wrong-line --scale quick --out runs/wrong-line        # synthetic (~10 s) + digits quick
    ratelab reproduce wrong-line --scale full --out runs/wrong-line-full    # + η/s grids, independent sets, exact x3

Measured (seed 0, 2 shared and busy CPU cores). Quick: corr_clean = +0.9996 [+0.9994, +0.9997], corr_noisy = -0.870
[-0.901, -0.838] with 20/20 curves negative (η = 0.05: -0.82; pooled over 240 models: +0.999 / -0.73), mean OOD
accuracy 0.844 -> 0.714 while ID rises 0.884 -> 0.945 (η = 0.2, n = 400 -> 4000), per-curve r vs s = 1/2/3/5/10/20:
+1.00/+0.87/+0.26/-0.61/-0.87/-0.92, exact vs reduced accuracies within 8e-4, the bound below every exact model's OOD
error, literal reading r = +0.99 — all as in note §2.2-§2.3; synthetic part 8 s, digits part 43 s, 58 s in all (rerun
on the current code on a quiet 2-core machine, torch 2.14.1, OMP_NUM_THREADS=2: the same figures, 2.3 s + 14 s, 18 s
in all). Full synthetic part (~70 s): exact model, 3 seeds at the note's sizes, r = +0.999 / -0.79 / -0.92 for η = 0 /
0.05 / 0.2; η grid 0.05/0.1/0.2/0.3/0.4: -0.82/-0.82/-0.87/-0.77/-0.52 (18/20 negative at 0.4); independent training
sets per n: -0.73 ± 0.12 at η = 0.2. Digits (quick, trained by the Trainer, no augmentation): probit r clean +0.83
[+0.78, +0.99], noisy +0.62 [-0.16, +0.86] (the sweep's first, hand-written loop: +0.82 / +0.56 [-0.15, +0.84]); full
(96 models per condition, 5.5 min, first loop, before the v2 rebuild): clean +0.76 [+0.71, +0.87], noisy +0.19 [-0.03,
+0.38]: lower with noise, but not negative. Full run in all: 7 min.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ratelab.analysis.accuracy_line import fit_line, plot_accuracy_line
from ratelab.analysis.wrong_line import (
    LiteralConfig,
    WrongLineConfig,
    literal_sweep,
    ood_error_lower_bound_approx,
    rescore,
    summarize_sweep,
    wrong_line_sweep,
)
from ratelab.eval.report import Report
from ratelab.recipes import RecipeResult, check, register_recipe
from ratelab.recipes._common import add_figure, limit_threads, logger
from ratelab.recipes.wrong_line import digits as digits_part

__all__ = ["SCALES", "Scale", "run", "settings"]

ETA_NOISY = 0.2  # the note's headline noisy setting; corr_noisy refers to it
DIGITS_CLIP = digits_part.PROBIT_CLIP  # finite test sets: a perfect score maps to probit 3.09
S_GRID = (1.0, 2.0, 3.0, 5.0, 7.0, 10.0, 20.0)


def _geom(lo: int, hi: int, n: int) -> tuple[int, ...]:
    """``n`` geometrically spaced integer sizes from ``lo`` to ``hi``."""
    return tuple(int(v) for v in np.geomspace(lo, hi, n).round())


@dataclass(frozen=True)
class Scale:
    """Settings of one scale.

    Attributes:
        main_seeds, main_sizes: learning curves per η and their training-set sizes in the main sweep (d_n -> ∞
            reduction; η ∈ {0, 0.05, 0.2}, the note's §4 defaults otherwise).
        exact_seeds, exact_sizes, exact_noise_rates: the exact finite-d_n cross-check on the same data streams.
        long_sizes, long_seeds: the long learning curve at η = 0.2.
        literal_seeds: seeds of the literal reading of the paper's 300-d task.
        n_boot: bootstrap resamples of every interval.
        grids: also the η grid and the independent-training-set sweep.
        digits: settings of the digits nuisance-cue variant (:data:`ratelab.recipes.wrong_line.digits.SCALES`).
    """

    main_seeds: int
    main_sizes: tuple[int, ...]
    exact_seeds: int
    exact_sizes: tuple[int, ...]
    exact_noise_rates: tuple[float, ...]
    long_sizes: tuple[int, ...]
    long_seeds: int
    literal_seeds: int
    n_boot: int
    grids: bool
    digits: digits_part.DigitsCueConfig


SCALES = {
    "smoke": Scale(main_seeds=3, main_sizes=_geom(400, 4000, 6), exact_seeds=1, exact_sizes=(200, 300, 400),
                   exact_noise_rates=(0.0, ETA_NOISY), long_sizes=_geom(100, 40_000, 6), long_seeds=2,
                   literal_seeds=3, n_boot=200, grids=False, digits=digits_part.SCALES["smoke"]),
    "quick": Scale(main_seeds=20, main_sizes=_geom(400, 4000, 12), exact_seeds=1, exact_sizes=(400, 608, 924, 1404),
                   exact_noise_rates=(0.0, 0.05, ETA_NOISY), long_sizes=_geom(100, 40_000, 14), long_seeds=5,
                   literal_seeds=10, n_boot=1000, grids=False, digits=digits_part.SCALES["quick"]),
    "full": Scale(main_seeds=20, main_sizes=_geom(400, 4000, 12), exact_seeds=3, exact_sizes=_geom(400, 4000, 12),
                  exact_noise_rates=(0.0, 0.05, ETA_NOISY), long_sizes=_geom(100, 40_000, 14), long_seeds=10,
                  literal_seeds=20, n_boot=1000, grids=True, digits=digits_part.SCALES["full"]),
}


def settings(scale: str | Scale) -> dict[str, Any]:
    """The synthetic-model configurations of one scale (a name of ``SCALES`` or a row)."""
    row = SCALES[scale] if isinstance(scale, str) else scale
    main = WrongLineConfig(mode="reduced", n_seeds=row.main_seeds, sizes=row.main_sizes)
    exact = replace(main, mode="exact", n_seeds=row.exact_seeds, noise_rates=row.exact_noise_rates,
                    sizes=row.exact_sizes)
    long = replace(main, noise_rates=(ETA_NOISY,), sizes=row.long_sizes, n_seeds=row.long_seeds)
    out: dict[str, Any] = {"main": main, "exact": exact, "long": long,
                           "literal": LiteralConfig(n_seeds=row.literal_seeds), "n_boot": row.n_boot}
    if row.grids:
        out["eta_grid"] = replace(main, noise_rates=(0.0, 0.05, 0.1, 0.2, 0.3, 0.4))
        out["independent"] = replace(main, nested=False, sizes=_geom(400, 4000, 8))
    return out


def _curve_means(models: list[dict[str, Any]], eta: float) -> dict[str, list[float]]:
    ms = [m for m in models if m["eta"] == eta]
    ns = sorted({m["n"] for m in ms})
    return {
        "n": ns,
        "id_acc": [float(np.mean([m["id_acc"] for m in ms if m["n"] == n])) for n in ns],
        "ood_acc": [float(np.mean([m["ood_acc"] for m in ms if m["n"] == n])) for n in ns],
        "ood_error_lb": [float(np.mean([m["ood_error_lb"] for m in ms if m["n"] == n])) for n in ns],
    }


def _s_sweep(sweep: dict[str, Any], eta: float) -> dict[str, Any]:
    """Per-curve r of the already fitted η-models re-scored under other OOD multipliers s."""
    from ratelab.analysis.wrong_line import curve_statistics

    out = {}
    ms = [m for m in sweep["models"] if m["eta"] == eta]
    seeds = sorted({m["seed"] for m in ms})
    for s in S_GRID:
        rs = []
        for sd in seeds:
            cm = [m for m in ms if m["seed"] == sd]
            rs.append(curve_statistics([m["id_acc"] for m in cm], rescore(cm, ood_scale=s))["pearson"])
        out[str(s)] = {"r_mean": float(np.nanmean(rs)), "r_sd": float(np.nanstd(rs))}
    return out


def _exact_vs_reduced(exact: dict[str, Any], seed: int) -> dict[str, Any]:
    """Refit the exact sweep's streams with the reduction and compare accuracies model by model."""
    ecfg = WrongLineConfig(**{**exact["config"], "mode": "reduced"})
    red = wrong_line_sweep(ecfg, seed=seed)
    d_id = [abs(a["id_acc"] - b["id_acc"]) for a, b in zip(exact["models"], red["models"])]
    d_ood = [abs(a["ood_acc"] - b["ood_acc"]) for a, b in zip(exact["models"], red["models"])]
    gap = [(1 - m["ood_acc"]) - m["ood_error_lb"] for m in exact["models"]]
    return {
        "n_models": len(d_id), "max_abs_diff_id": float(max(d_id)), "max_abs_diff_ood": float(max(d_ood)),
        "min_train_margin": float(min(m["min_train_margin"] for m in exact["models"])),
        "bound_min_slack": float(min(gap)), "bound_holds_all": bool(min(gap) >= -1e-12),
        "curves_exact": exact["curves"], "curves_reduced": red["curves"], "time_s": exact["time_s"],
    }


def _fig_scatter(sweep: dict[str, Any], fits: dict[float, Any], title: str):
    from matplotlib.figure import Figure

    etas = sorted(fits)
    fig = Figure(figsize=(5.2 * 2, 5))
    ax_all, ax_one = fig.subplots(1, 2)
    colors = {e: c for e, c in zip(etas, ("tab:blue", "tab:orange", "tab:red", "tab:purple", "tab:green",
                                           "tab:brown"))}
    for eta in etas:
        ms = [m for m in sweep["models"] if m["eta"] == eta]
        plot_accuracy_line([m["id_acc"] for m in ms], [m["ood_acc"] for m in ms], fit=fits[eta], ax=ax_all,
                           color=colors[eta], label=f"η = {eta:g}" + (" (clean)" if eta == 0 else ""))
        seed0 = min(m["seed"] for m in ms)
        cm = [m for m in ms if m["seed"] == seed0]
        cfit = fit_line([m["id_acc"] for m in cm], [m["ood_acc"] for m in cm], n_boot=0)
        plot_accuracy_line([m["id_acc"] for m in cm], [m["ood_acc"] for m in cm], fit=cfit, ax=ax_one,
                           color=colors[eta], label=f"η = {eta:g}")
    ax_all.set_title(f"{title}: all models (pooled fit)", fontsize=9)
    ax_one.set_title("one learning curve per η (n = 400 → 4000)", fontsize=9)
    for ax in (ax_all, ax_one):
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _fig_size(sweep: dict[str, Any], long: dict[str, Any], etas: list[float]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    ax1, ax2 = fig.subplots(1, 2)
    for eta, c in zip(etas, ("tab:blue", "tab:orange", "tab:red")):
        cm = _curve_means(sweep["models"], eta)
        ax1.plot(cm["n"], cm["id_acc"], "-o", ms=3, color=c, label=f"ID, η = {eta:g}")
        ax1.plot(cm["n"], cm["ood_acc"], "--s", ms=3, color=c, label=f"OOD, η = {eta:g}")
    ax1.set(xscale="log", xlabel="training-set size n", ylabel="accuracy (mean over curves)",
            title="effect of dataset size (reduced model)")
    ax1.legend(fontsize=7)
    cm = _curve_means(long["models"], ETA_NOISY)
    ax2.plot(cm["n"], cm["id_acc"], "-o", ms=3, label="ID")
    ax2.plot(cm["n"], cm["ood_acc"], "--s", ms=3, label="OOD")
    ax2.plot(cm["n"], [1 - b for b in cm["ood_error_lb"]], ":", color="k",
             label="1 - OOD error bound (MP-edge estimate)")
    ax2.set(xscale="log", xlabel="training-set size n", ylabel="accuracy",
            title=f"long learning curve, η = {ETA_NOISY:g}")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _fig_s(s_sweep: dict[str, Any]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5, 3.5))
    ax = fig.subplots()
    s = [float(k) for k in s_sweep]
    ax.errorbar(s, [v["r_mean"] for v in s_sweep.values()], yerr=[v["r_sd"] for v in s_sweep.values()], fmt="-o",
                capsize=3)
    ax.axhline(0, color="0.5", lw=0.8)
    ax.set(xscale="log", xlabel="OOD nuisance std multiplier s", ylabel="per-curve probit Pearson r",
           title=f"η = {ETA_NOISY:g}: r vs shift size")
    fig.tight_layout()
    return fig


def _fig_pair(rows_a: list[dict], rows_b: list[dict], fit_a: Any, fit_b: Any, names: tuple[str, str], title: str,
              clip: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 5))
    ax = fig.subplots()
    for rows, fit, name, c in ((rows_a, fit_a, names[0], "tab:blue"), (rows_b, fit_b, names[1], "tab:red")):
        plot_accuracy_line([r["id_acc"] for r in rows], [r["ood_acc"] for r in rows], fit=fit, ax=ax, color=c,
                           label=name, clip=clip)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _ci(t: tuple[float, float]) -> list[float]:
    return [float(t[0]), float(t[1])]


@register_recipe(
    "wrong-line",
    paper="Accuracy on the wrong line (Sanyal et al., AISTATS 2025)",
    description="ID-OOD probit correlation with/without label noise: synthetic nuisance model, bound, digits cue",
    scales=SCALES,
    quick_seconds=20,
)
def run(out_dir: Path, *, scale: str, seed: int, device: str, progress: bool) -> RecipeResult:
    out_dir = Path(out_dir)
    st = settings(scale)
    n_boot = st["n_boot"]
    log = logger(progress, "wrong-line")
    t0 = time.time()
    # Multi-threaded BLAS on a shared 2-core machine made the exact solver ~10x slower (measured: 11.9 s vs 1.3 s for
    # the same fits), so the dense linear algebra of the synthetic part runs single-threaded.
    with limit_threads(1, device="cpu", blas=True):
        main = wrong_line_sweep(st["main"], seed=seed, progress=progress)
        by_noise = summarize_sweep(main, n_boot=n_boot, seed=seed)
        exact = wrong_line_sweep(st["exact"], seed=seed, progress=progress)
        exact_cmp = _exact_vs_reduced(exact, seed)
        long = wrong_line_sweep(st["long"], seed=seed)
        s_sweep = _s_sweep(main, ETA_NOISY)
        literal = {}
        for name, lcfg in (("noisy", st["literal"]), ("clean", replace(st["literal"], majority_weight=1.0)),
                           ("noisy_svm_one_minus_y", replace(st["literal"], learner="svm",
                                                             minority_center="one_minus_y"))):
            ls = literal_sweep(lcfg, seed=seed)
            literal[name] = {k: ls[k] for k in ("r_mean", "r_min", "r_max", "config")}
        extra: dict[str, Any] = {}
        if "eta_grid" in st:
            g = wrong_line_sweep(st["eta_grid"], seed=seed, progress=progress)
            extra["eta_grid"] = {str(k): {kk: v[kk] for kk in ("r_mean", "r_sd", "n_negative", "n_curves")}
                                 for k, v in summarize_sweep(g, n_boot=n_boot, seed=seed).items()}
            ind = wrong_line_sweep(st["independent"], seed=seed)
            extra["independent_sets"] = {str(k): {kk: v[kk] for kk in ("r_mean", "r_sd", "r_mean_ci", "n_negative")}
                                         for k, v in summarize_sweep(ind, n_boot=n_boot, seed=seed).items()}
    synth_s = time.time() - t0
    log(f"synthetic part done in {synth_s:.1f}s")

    clean, noisy = by_noise[0.0], by_noise[ETA_NOISY]
    cfg = st["main"]
    long_means = _curve_means(long["models"], ETA_NOISY)
    i_best = int(np.argmax(long_means["ood_acc"]))
    synthetic = {
        "config": main["config"], "by_noise": {str(k): v for k, v in by_noise.items()}, "curves": main["curves"],
        "models": main["models"], "exact_check": exact_cmp, "exact_models": exact["models"],
        "long_curve": {**long_means, "config": long["config"]}, "s_sweep": s_sweep, "literal": literal,
        "bound_approx": {"n": list(cfg.sizes), "ood_error_lb": ood_error_lower_bound_approx(
            np.array(cfg.sizes), ETA_NOISY, cfg.d_nuis, cfg.ood_scale).tolist()},
        "time_s": synth_s, **extra,
    }

    # ---- digits variant (networks of the library, colour cue + label noise; one CPU thread inside the sweep)
    t1 = time.time()
    dg = digits_part.digits_sweep(out_dir, SCALES[scale].digits, seed=seed, device=device, progress=progress)
    digits_s = time.time() - t1
    dfit = {}
    for cond in ("clean", "noisy"):
        rows = dg[cond]
        if len(rows) < 3:
            raise RuntimeError(f"wrong-line: the digits sweep returned {len(rows)} {cond} models; need >= 3")
        dfit[cond] = fit_line([r["id_acc"] for r in rows], [r["ood_acc"] for r in rows], n_boot=n_boot, seed=seed,
                              clip=DIGITS_CLIP)

    checks = [
        check("clean labels: accuracy on the line (mean per-curve probit r > 0.9)", clean["r_mean"] > 0.9,
              f"r = {clean['r_mean']:+.4f} [{clean['r_mean_ci'][0]:+.4f}, {clean['r_mean_ci'][1]:+.4f}]"),
        check(f"noisy labels (η = {ETA_NOISY:g}) + nuisance features: accuracy on the wrong line (95% interval of the "
              "mean per-curve r below 0)", noisy["r_mean_ci"][1] < 0,
              f"r = {noisy['r_mean']:+.3f} [{noisy['r_mean_ci'][0]:+.3f}, {noisy['r_mean_ci'][1]:+.3f}], "
              f"{noisy['n_negative']}/{noisy['n_curves']} curves negative"),
        check("more data does not fix OOD: with noise, mean OOD accuracy falls from the smallest to the largest n "
              "while ID rises", noisy["ood_last"] < noisy["ood_first"] and noisy["id_last"] > noisy["id_first"],
              f"ID {noisy['id_first']:.3f} -> {noisy['id_last']:.3f}, OOD {noisy['ood_first']:.3f} -> "
              f"{noisy['ood_last']:.3f}"),
        check("literal reading of the paper's 300-d task stays on the line (note §1.4: r > 0)",
              min(v["r_mean"] for v in literal.values()) > 0,
              ", ".join(f"{k} r = {v['r_mean']:+.3f}" for k, v in literal.items())),
        check("interpolation lower bound (note §3) holds for every exact model", exact_cmp["bound_holds_all"],
              f"min (OOD error - bound) = {exact_cmp['bound_min_slack']:+.4f} over {exact_cmp['n_models']} models"),
        check("d_n -> ∞ reduction matches the exact Wishart model (|Δacc| <= 0.005)",
              max(exact_cmp["max_abs_diff_id"], exact_cmp["max_abs_diff_ood"]) <= 0.005,
              f"max |Δ| ID {exact_cmp['max_abs_diff_id']:.2e}, OOD {exact_cmp['max_abs_diff_ood']:.2e}"),
        check("digits: the noisy sweep's probit r is below the clean sweep's", dfit["noisy"].pearson
              < dfit["clean"].pearson, f"clean {dfit['clean'].pearson:+.3f}, noisy {dfit['noisy'].pearson:+.3f}"),
        check("digits with label noise: negative ID-OOD correlation (95% interval below 0)",
              dfit["noisy"].pearson_ci[1] < 0,
              f"r = {dfit['noisy'].pearson:+.3f} [{dfit['noisy'].pearson_ci[0]:+.3f}, "
              f"{dfit['noisy'].pearson_ci[1]:+.3f}]"),
    ]

    summary = {
        "corr_clean": clean["r_mean"], "corr_clean_ci": _ci(clean["r_mean_ci"]),
        "corr_noisy": noisy["r_mean"], "corr_noisy_ci": _ci(noisy["r_mean_ci"]), "eta_noisy": ETA_NOISY,
        "corr_clean_pooled": clean["pooled"]["pearson"], "corr_noisy_pooled": noisy["pooled"]["pearson"],
        "slope_noisy_mean": noisy["slope_mean"], "spearman_noisy_mean": noisy["spearman_mean"],
        "noisy_curves_negative": f"{noisy['n_negative']}/{noisy['n_curves']}",
        **{f"corr_eta_{k:g}": v["r_mean"] for k, v in by_noise.items()},
        "long_curve_best_ood_n": long_means["n"][i_best],
        "literal_r_noisy": literal["noisy"]["r_mean"], "literal_r_clean": literal["clean"]["r_mean"],
        "exact_vs_reduced_max_diff": max(exact_cmp["max_abs_diff_id"], exact_cmp["max_abs_diff_ood"]),
        "corr_digits_clean": dfit["clean"].pearson, "corr_digits_clean_ci": _ci(dfit["clean"].pearson_ci),
        "corr_digits_noisy": dfit["noisy"].pearson, "corr_digits_noisy_ci": _ci(dfit["noisy"].pearson_ci),
        "digits_models_per_condition": len(dg["clean"]),
        "synthetic_time_s": round(synth_s, 2), "digits_time_s": round(digits_s, 2),
    }
    results: dict[str, Any] = {
        **{k: summary[k] for k in ("corr_clean", "corr_clean_ci", "corr_noisy", "corr_noisy_ci", "corr_digits_clean",
                                   "corr_digits_clean_ci", "corr_digits_noisy", "corr_digits_noisy_ci")},
        "corr_definition": ("mean over learning curves of the Pearson r of probit(ID acc) vs probit(OOD acc) across "
                            f"the models (training-set sizes) of each curve; clean: η = 0, noisy: η = {ETA_NOISY:g}; "
                            "interval: 95% percentile bootstrap over curves. Digits: Pearson r over all models of a "
                            "condition, bootstrap over models."),
        "summary": summary, "checks": checks, "synthetic": synthetic,
        "digits": {"fits": {k: v.to_dict() for k, v in dfit.items()}, "clean": dg["clean"], "noisy": dg["noisy"],
                   "meta": dg["meta"]},
    }

    # ---- report
    report = Report("Accuracy on the wrong line: label noise + nuisance features")
    report.text(
        f"Synthetic model (note §2): d_s = {cfg.d_core} core features with the teacher y = sign(x[0]); d_n = "
        f"{cfg.d_nuis} nuisance features of total energy {cfg.nuis_energy}; training labels flipped with rate η; "
        f"OOD multiplies the nuisance std by s = {cfg.ood_scale:g}; bias-free hard-margin SVM (interpolates); "
        f"{cfg.n_seeds} learning curves of {len(cfg.sizes)} sizes n = {cfg.sizes[0]}..{cfg.sizes[-1]} per η, "
        "fitted with the d_n -> ∞ reduction (squared-hinge SVM); exact accuracies for Gaussian test inputs. "
        "Statistics on probit-transformed accuracies."
    )
    report.heading("Claims")
    report.checks(checks)
    report.heading("Per-curve correlation by label noise")
    report.table(
        [[f"{k:g}", v["r_mean"], f"[{v['r_mean_ci'][0]:+.3f}, {v['r_mean_ci'][1]:+.3f}]", v["r_sd"], v["slope_mean"],
          v["spearman_mean"], v["pooled"]["pearson"], f"{v['n_negative']}/{v['n_curves']}",
          f"{v['id_first']:.3f} -> {v['id_last']:.3f}", f"{v['ood_first']:.3f} -> {v['ood_last']:.3f}"]
         for k, v in by_noise.items()],
        headers=["η", "per-curve r (mean)", "95% CI", "sd", "slope", "Spearman", "pooled r", "negative",
                 "ID n_min -> n_max", "OOD n_min -> n_max"],
    )
    fits_all = {eta: fit_line([m["id_acc"] for m in main["models"] if m["eta"] == eta],
                              [m["ood_acc"] for m in main["models"] if m["eta"] == eta], n_boot=0)
                for eta in cfg.noise_rates}
    figs = [
        (_fig_scatter(main, fits_all, "synthetic"), "scatter.png",
         "probit-scaled ID vs OOD accuracy; left: all models with the pooled fit per η; right: one learning curve "
         "per η. Dashed: y = x."),
        (_fig_size(main, long, list(cfg.noise_rates)), "dataset_size.png",
         "ID and OOD accuracy against training-set size; right: the long learning curve with the interpolation "
         "bound (Marchenko-Pastur estimate of λ_max in the reduced model)."),
        (_fig_s(s_sweep), "r_vs_shift.png", "per-curve r when the same models are scored under other shifts s"),
        (_fig_pair(dg["clean"], dg["noisy"], dfit["clean"], dfit["noisy"], ("digits, clean labels",
                   "digits, noisy labels"), "digits with a colour cue: clean vs noisy training labels", DIGITS_CLIP),
         "digits_scatter.png", "each point: one (network, training size, epoch); OOD = cue independent of the class"),
    ]
    report.heading("Synthetic model")
    for fig, name, cap in figs[:3]:
        add_figure(report, fig, out_dir, name, cap)
    report.table([[k, v["r_mean"], v["r_min"], v["r_max"]] for k, v in literal.items()],
                 headers=["literal reading (300-d, 1-D signal)", "mean r", "min r", "max r"])
    report.table([[s, v["r_mean"], v["r_sd"]] for s, v in s_sweep.items()],
                 headers=["s", "per-curve r (mean)", "sd"])
    for key, what in (("eta_grid", "label-noise grid"), ("independent_sets", "independent training set per n")):
        if key in extra:
            report.table([[k, v["r_mean"], v.get("r_sd"), v["n_negative"]] for k, v in extra[key].items()],
                         headers=[f"η ({what})", "per-curve r (mean)", "sd", "negative curves"])
    report.text(
        f"Exact model check ({exact_cmp['n_models']} models, Wishart-sampled nuisance Gram, exact hard-margin dual): "
        f"max |Δ accuracy| vs the reduction {summary['exact_vs_reduced_max_diff']:.2e}; smallest training margin "
        f"{exact_cmp['min_train_margin']:.6f} (interpolation); lower bound of note §3 below the OOD error in every "
        f"model (min slack {exact_cmp['bound_min_slack']:+.4f})."
    )
    report.heading("Digits with a nuisance cue")
    fig, name, cap = figs[3]
    add_figure(report, fig, out_dir, name, cap)
    report.table([[k, v.pearson, f"[{v.pearson_ci[0]:+.3f}, {v.pearson_ci[1]:+.3f}]", v.slope, v.spearman, v.n]
                  for k, v in dfit.items()], headers=["condition", "probit r", "95% CI", "slope", "Spearman", "models"])
    if not all(math.isfinite(v) for v in (clean["r_mean"], noisy["r_mean"])):
        raise RuntimeError("wrong-line: a synthetic correlation is not finite")
    return RecipeResult(results, report)
