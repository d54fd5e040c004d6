"""Recipe ``icl-calibration``: calibration of in-context learning vs shots and model size, with no external LM.

Paper: Zhang et al., "A Study on the Calibration of In-context Learning" (NAACL 2024; trust.md §3). Its readings:
accuracy rises with the number of demonstrations while ECE jumps at 1-2 shots and then decays (e.g. LLaMA-30B on
SST-2: ECE 0.083 / 0.163 / 0.139 at 0 / 1 / 2 shots, 0.080 at 8), and Kumar et al.'s scaling-binning "reduces
calibration errors consistently" where temperature scaling helps less.

Here the LM is replaced by ``icl_gpt_{tiny,small,base}`` (:mod:`ratelab.models.icl_gpt`), causal transformers
trained from scratch (task ``"icl"``, :mod:`ratelab.train.icl_task`) on synthetic few-shot sequences
(:mod:`ratelab.data.fewshot`: Gaussian clusters in R^8, K in 2..5 classes, a fresh random assignment of K out of 8
label words per sequence), so the label names can only be inferred from the demonstrations.

Evaluation protocol (:func:`ratelab.icl.collect_records`, which documents it in full). An *evaluation task* is one
fixed draw of class centers and label words -- the analogue of a dataset such as SST-2 in the paper; several are
drawn and every number is averaged over them. Each task has test and disjoint calibration queries and several
demonstration sets (the paper's demonstration seeds; k-shot prompts use the first k of a set's 16 demonstrations),
plus extra sets used only for shot-specific calibration. Records of different tasks are never mixed: recalibration
(:func:`ratelab.icl.recalibration.evaluate_regimes`) runs per task, then rows are averaged over tasks and seeds.
Probabilities are the softmax of the model's logits restricted to the task's K label words (the LM harness's
restricted, renormalized label probabilities). ECE: top-label, 10 equal-width bins, (l, u] edges.

Commands (scales in ``SCALES``)::

    ratelab reproduce icl-calibration --scale quick --out runs/icl-cal   # tiny + small, 1 seed, 300 steps, 3 tasks
    ratelab reproduce icl-calibration --scale full --out runs/icl-cal-full   # tiny + small + base, 3 seeds, 1500 steps

Measured (quick, seed 0; 213 s on a shared, overloaded 2-core machine, of which 173 s training; rerun after the v2
trainer rebuild on a quiet 2-core machine, torch 2.14.1, OMP_NUM_THREADS=2, in 22 s of which 15 s training, with the
same figures to 3 decimals, every ECE within 2e-4): test accuracy at 0/1/2/4/8/16 shots, tiny
0.27/0.24/0.41/0.62/0.78/0.83, small 0.33/0.34/0.44/0.65/0.81/0.89 (0 shots = chance: the label words are unknown);
ECE tiny 0.098/0.278/0.219/0.146/0.091/0.080, small 0.113/0.229/0.220/0.165/0.078/0.049. So the paper's low-shot spike
appears for both sizes (ECE at 1-2 shots above both 0 and 16 shots) and the larger model is more accurate and better
calibrated at 16 shots. Recalibration (mean ECE over sizes and shots >= 1, uncalibrated 0.155): scaling-binning 0.298
/ 0.147 / 0.087 and temperature scaling 0.281 / 0.136 / 0.114 for 0-shot / shot-specific / prompt-specific fits; only
prompt-specific fitting lowers ECE in every (size, shots) cell (both methods), shot-specific fitting in 6/10
(scaling-binning) and 7/10 (temperature) cells, and 0-shot fitting makes calibration worse. So "scaling-binning
reduces ECE consistently" holds here only with prompt-specific calibration data, where it also beats temperature
scaling. A rerun of the same quick run took 110 s (less load) with identical numbers. Quick with seed 1 (other
evaluation tasks too; 98 s): the spike again (ECE at 0/1/16 shots tiny 0.201/0.247/0.052, small 0.131/0.215/0.025);
prompt-specific scaling-binning 0.116 -> 0.063 (9/10 cells), temperature 0.094 (9/10), shot-specific fits no better
than uncalibrated. Full (3 sizes x 3 seeds, 1500 steps, 1 thread, 38 min; measured before the v2 rebuild): ECE at
0/1/2/4/8/16 shots tiny .105/.181/.160/.126/.073/.032, small .110/.148/.154/.124/.067/.031, base
.093/.154/.148/.124/.067/.029 — the low-shot spike again for every size; accuracy at 16 shots .906/.918/.919 (grows
with size, barely). Recalibration (mean ECE over sizes and shots >= 1, uncalibrated 0.108): scaling-binning 0.388 /
0.104 / 0.059 and temperature 0.335 / 0.090 / 0.072 for 0-shot / shot-specific / prompt-specific fits; prompt-specific
temperature scaling lowers ECE in 15/15 cells, prompt-specific scaling-binning in 12/15 (lowest mean ECE),
shot-specific 8/15 and 12/15, 0-shot fits 0/15. Each run's ``checks`` record what it measures.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ratelab.data.fewshot import FewShotConfig
from ratelab.eval.report import Report
from ratelab.icl.synthetic import DEFAULT_SHOTS, PROMPT_STRIDE, collect_records
from ratelab.recipes import RecipeResult, check, register_recipe
from ratelab.recipes._common import add_figure, fresh_run_dir, limit_threads, resolve_device

__all__ = ["FEWSHOT", "PROMPT_STRIDE", "SCALES", "SHOTS", "Scale", "collect_records", "run"]

SHOTS = DEFAULT_SHOTS
# Cluster noise 0.8 (centers ~ N(0, I_8)) leaves ~10% Bayes error at K = 5 even with known centers, so accuracy
# stays below 1 and calibration has something to measure.
FEWSHOT = FewShotConfig(input_dim=8, vocab_size=8, min_classes=2, max_classes=5, noise_std=0.8, n_pairs=17)


@dataclass(frozen=True)
class Scale:
    """Settings of one scale.

    Recalibration dominates the evaluation time: shot-specific and prompt-specific calibrators are refitted per
    (shots, demonstration set) group, 2 * (len(shots) - 1) * n_prompts + 1 fits per method, task, model and seed.

    Attributes:
        sizes: ``icl_gpt_<size>`` models trained.
        seeds: training seeds per size (``seed``, ``seed + 1``, ...).
        steps, batch: training length and batch (sequences).
        shots: numbers of demonstrations evaluated.
        n_tasks, n_prompts, n_extra_prompts, n_test, n_calib: evaluation protocol
            (:func:`ratelab.icl.collect_records`).
    """

    sizes: tuple[str, ...]
    seeds: int
    steps: int
    batch: int
    shots: tuple[int, ...]
    n_tasks: int
    n_prompts: int
    n_extra_prompts: int
    n_test: int
    n_calib: int


SCALES = {
    "smoke": Scale(sizes=("tiny",), seeds=1, steps=3, batch=16, shots=(0, 1, 2, 16), n_tasks=1, n_prompts=1,
                   n_extra_prompts=1, n_test=40, n_calib=40),
    "quick": Scale(sizes=("tiny", "small"), seeds=1, steps=300, batch=64, shots=SHOTS, n_tasks=3, n_prompts=3,
                   n_extra_prompts=2, n_test=200, n_calib=200),
    "full": Scale(sizes=("tiny", "small", "base"), seeds=3, steps=1500, batch=64, shots=SHOTS, n_tasks=6,
                  n_prompts=5, n_extra_prompts=5, n_test=300, n_calib=300),
}


def _train(size: str, seed: int, run_dir: Path, *, steps: int, batch: int, device: str, progress: bool
           ) -> tuple[torch.nn.Module, dict[str, Any]]:
    from ratelab.train import TrainConfig, Trainer
    from ratelab.train.icl_task import ICLTask

    cfg = TrainConfig(
        task="icl", model=f"icl_gpt_{size}", max_steps=steps, batch_size=batch, optimizer="adamw",
        lr=3e-3 if size == "tiny" else 2e-3, weight_decay=0.01, warmup_steps=max(1, steps // 10),
        min_lr=1e-5, grad_clip=1.0, seed=seed, out_dir=str(run_dir), ckpt_every=0, eval_every=0,
        log_every=max(1, steps // 4), device=device, progress=progress,
    )
    trainer = Trainer(cfg, ICLTask(FEWSHOT, train_sequences=max(steps * batch, batch), val_sequences=256))
    final = trainer.fit()
    return trainer.model.eval(), final


def _mean_over(rows_list: list[list[dict]], keys: tuple[str, ...], value_keys: list[str]) -> list[dict]:
    """Average rows with equal ``keys`` over a list of row lists (tasks / seeds); adds ``<v>_sd`` across lists."""
    groups: dict[tuple, list[dict]] = {}
    for rows in rows_list:
        for r in rows:
            groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    out = []
    for key, rs in groups.items():
        row = dict(zip(keys, key))
        for v in value_keys:
            a = np.array([r[v] for r in rs], dtype=np.float64)
            row[v] = float(a.mean())
            row[f"{v}_sd"] = float(a.std(ddof=1)) if a.size > 1 else 0.0
        out.append(row)
    return out


def _figures(out_dir: Path, sizes: list[str], shots: tuple[int, ...], summ: dict[str, list[dict]],
             recal: dict[str, list[dict]], report: Report) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.8))
    ax_acc, ax_ece = fig.subplots(1, 2)
    for size in sizes:
        rs = sorted(summ[size], key=lambda r: r["shots"])
        x = [r["shots"] for r in rs]
        for ax, m in ((ax_acc, "acc_mean"), (ax_ece, "ece_mean")):
            y, s = np.array([r[m] for r in rs]), np.array([r[f"{m}_sd"] for r in rs])
            (ln,) = ax.plot(x, y, "-o", label=f"icl_gpt_{size}")
            ax.fill_between(x, y - s, y + s, color=ln.get_color(), alpha=0.15, linewidth=0)
    for ax, name in ((ax_acc, "accuracy"), (ax_ece, "ECE (10 equal-width bins)")):
        ax.set(xlabel="shots", ylabel=name, xscale="symlog", xticks=list(shots), xticklabels=[str(k) for k in shots])
        ax.legend(fontsize=8, loc="best")
    ax_acc.set_title("test accuracy vs shots")
    ax_ece.set_title("uncalibrated ECE vs shots")
    fig.tight_layout()
    add_figure(report, fig, out_dir, "acc_ece_vs_shots.png",
               "accuracy and ECE vs shots per model size (mean over evaluation tasks and seeds; band = std over "
               "training seeds, zero with one seed)")

    fig = Figure(figsize=(4.2 * len(sizes), 3.8))
    axes = np.atleast_1d(fig.subplots(1, len(sizes), sharey=True))
    for ax, size in zip(axes, sizes):
        lines: dict[tuple, list[dict]] = {}
        for r in recal[size]:
            lines.setdefault((r["method"], r["regime"]), []).append(r)
        for (method, regime), rs in lines.items():
            rs = sorted(rs, key=lambda r: r["shots"])
            style = "k-o" if method == "none" else ("-s" if method == "scaling_binning" else "--^")
            label = "uncalibrated" if method == "none" else f"{method} / {regime}"
            ax.plot([r["shots"] for r in rs], [r["ece_after_mean"] for r in rs], style, label=label, markersize=4)
        ax.set(title=f"icl_gpt_{size}", xlabel="shots", xscale="symlog", xticks=list(shots),
               xticklabels=[str(k) for k in shots])
    axes[0].set_ylabel("test ECE")
    # One legend below the panels: inside an axis it covered the low-shot curves, where the spike is.
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 * ((len(labels) + 3) // 4), 1, 1))
    add_figure(report, fig, out_dir, "ece_recalibration.png",
               "ECE before and after recalibration (temperature scaling, scaling-binning) under the three fitting "
               "regimes (0-shot, shot-specific, prompt-specific)")


@register_recipe(
    "icl-calibration",
    paper="A Study on the Calibration of In-context Learning (Zhang et al., NAACL 2024)",
    description="ICL accuracy/ECE vs shots and model size on synthetic few-shot tasks; temperature scaling and "
                "scaling-binning under 0-shot / shot-specific / prompt-specific fitting",
    scales=SCALES,
    quick_seconds=20,
)
def run(out_dir: Path, *, scale: str, seed: int, device: str, progress: bool) -> RecipeResult:
    import ratelab.models.icl_gpt  # noqa: F401  (registers the models)
    from ratelab.icl.recalibration import evaluate_regimes, summarize

    row = SCALES[scale]
    sizes, seeds, steps, batch, shots = list(row.sizes), [seed + i for i in range(row.seeds)], row.steps, row.batch, \
        row.shots
    ev = {"n_tasks": row.n_tasks, "n_prompts": row.n_prompts, "n_extra_prompts": row.n_extra_prompts,
          "n_test": row.n_test, "n_calib": row.n_calib}
    dev = resolve_device(device)

    per_seed_summ: dict[str, list[list[dict]]] = {s: [] for s in sizes}
    per_seed_recal: dict[str, list[list[dict]]] = {s: [] for s in sizes}
    runs: list[dict[str, Any]] = []
    # One intra-op thread for these tiny models on CPU: on a shared 2-core machine extra threads only add contention.
    with limit_threads(1, device=dev):
        for size in sizes:
            for s in seeds:
                model, final = _train(size, s, fresh_run_dir(out_dir, "runs", f"{size}_seed{s}"), steps=steps,
                                      batch=batch, device=device, progress=progress)
                # Evaluation tasks depend on the recipe seed only: every model and training seed sees the same ones.
                recs = collect_records(model, FEWSHOT, shots=shots, seed=seed + 7919, device=dev, **ev)
                summ = [summarize(r["test"]) for r in recs]
                recal = [evaluate_regimes(r["test"], r["calib"]) for r in recs]
                per_seed_summ[size].append(_mean_over(summ, ("shots",), ["acc_mean", "ece_mean", "conf_mean"]))
                per_seed_recal[size].append(_mean_over(recal, ("shots", "method", "regime"),
                                                       ["acc_after_mean", "ece_before_mean", "ece_after_mean"]))
                runs.append({"size": size, "seed": s, "params": sum(p.numel() for p in model.parameters()),
                             "train_time_s": final.get("time_s"), "train_loss": final.get("train_loss"),
                             "val_acc_16shot": final.get("val_acc_16shot"),
                             "K_per_task": [r["task"].num_classes for r in recs]})

    # Average over seeds (each seed's rows are already averaged over evaluation tasks); ``*_sd`` is across seeds.
    summ_rows = {sz: _mean_over(per_seed_summ[sz], ("shots",), ["acc_mean", "ece_mean", "conf_mean"]) for sz in sizes}
    recal_rows = {sz: _mean_over(per_seed_recal[sz], ("shots", "method", "regime"),
                                 ["acc_after_mean", "ece_before_mean", "ece_after_mean"]) for sz in sizes}

    def at(rows: list[dict], k: int, **match: str) -> dict:
        return next(r for r in rows if r["shots"] == k and all(r[a] == b for a, b in match.items()))

    checks = []
    summary: dict[str, Any] = {"sizes": [f"icl_gpt_{s}" for s in sizes], "seeds": len(seeds), "steps": steps,
                               "eval_tasks": ev["n_tasks"], "demo_sets": ev["n_prompts"], "test_queries": ev["n_test"]}
    for sz in sizes:
        sr = summ_rows[sz]
        for k in shots:
            summary[f"{sz} acc@{k}"] = at(sr, k)["acc_mean"]
            summary[f"{sz} ece@{k}"] = at(sr, k)["ece_mean"]
        acc0, acc16 = at(sr, 0)["acc_mean"], at(sr, 16)["acc_mean"]
        checks.append(check(f"icl_gpt_{sz} learns in context: accuracy at 16 shots exceeds 0-shot by > 0.2",
                            acc16 - acc0 > 0.2, f"{acc0:.3f} -> {acc16:.3f}"))
        e = {k: at(sr, k)["ece_mean"] for k in shots}
        low = max(e[1], e[2])
        checks.append(check(f"icl_gpt_{sz}: low-shot miscalibration spike (max ECE at 1-2 shots > ECE at 0 and at 16 "
                            "shots)", low > e[0] and low > e[16],
                            f"ECE at shots {shots} = {' / '.join(f'{e[k]:.3f}' for k in shots)}"))
    for method in ("scaling_binning", "temperature"):
        for regime in ("zero_shot", "shot_specific", "prompt_specific"):
            gains = {(sz, k): at(recal_rows[sz], k, method=method, regime=regime) for sz in sizes for k in shots
                     if k > 0}
            reduced = [g["ece_after_mean"] < g["ece_before_mean"] for g in gains.values()]
            before = np.mean([g["ece_before_mean"] for g in gains.values()])
            after = np.mean([g["ece_after_mean"] for g in gains.values()])
            summary[f"ece {method}/{regime} (mean over sizes, shots>=1)"] = float(after)
            checks.append(check(f"{method} ({regime} fit) reduces ECE in every (model size, shots >= 1) cell",
                                all(reduced), f"{sum(reduced)}/{len(reduced)} cells; mean ECE {before:.3f} -> "
                                f"{after:.3f}"))
    summary["ece uncalibrated (mean over sizes, shots>=1)"] = float(np.mean(
        [at(summ_rows[sz], k)["ece_mean"] for sz in sizes for k in shots if k > 0]))
    if len(sizes) > 1:
        accs = [at(summ_rows[sz], 16)["acc_mean"] for sz in sizes]
        checks.append(check("16-shot accuracy grows with model size", all(np.diff(accs) > 0),
                            " / ".join(f"{sz} {a:.3f}" for sz, a in zip(sizes, accs))))
    summary["train_time_s"] = float(np.sum([r["train_time_s"] or 0.0 for r in runs]))
    results = {"summary": summary, "checks": checks, "runs": runs, "fewshot": FEWSHOT.to_dict(),
               "vs_shots": summ_rows, "recalibration": recal_rows}

    report = Report("Calibration of in-context learning (synthetic few-shot tasks)")
    report.text(
        f"Causal transformers {', '.join(f'icl_gpt_{s}' for s in sizes)} trained from scratch for {steps} steps "
        f"(batch {batch} sequences of {FEWSHOT.n_pairs} pairs, {len(seeds)} seed(s)) on Gaussian-cluster few-shot "
        f"tasks (d = {FEWSHOT.input_dim}, K in {FEWSHOT.min_classes}..{FEWSHOT.max_classes}, noise std "
        f"{FEWSHOT.noise_std}, a fresh assignment of K of {FEWSHOT.vocab_size} label words per sequence). Evaluated "
        f"on {ev['n_tasks']} fixed tasks x {ev['n_prompts']} demonstration sets x {ev['n_test']} test queries; "
        f"calibrators fitted on {ev['n_calib']} disjoint calibration queries (plus {ev['n_extra_prompts']} extra "
        "demonstration sets for shot-specific fits). Probabilities are restricted to the task's label words and "
        "renormalized; ECE uses 10 equal-width (l, u] bins."
    )
    report.heading("Claims")
    report.checks(checks)
    report.heading("Accuracy and ECE vs shots")
    report.table([[f"icl_gpt_{sz}", k, at(summ_rows[sz], k)["acc_mean"], at(summ_rows[sz], k)["ece_mean"],
                   at(summ_rows[sz], k)["conf_mean"]] for sz in sizes for k in shots],
                 headers=["model", "shots", "accuracy", "ECE", "mean confidence"])
    _figures(out_dir, sizes, shots, summ_rows, recal_rows, report)
    report.heading("Recalibration")
    for sz in sizes:
        arms = list(dict.fromkeys((r["method"], r["regime"]) for r in recal_rows[sz]))
        cell = {(r["shots"], r["method"], r["regime"]): r["ece_after_mean"] for r in recal_rows[sz]}
        report.table([[k] + [cell.get((k, m, g), float("nan")) for m, g in arms] for k in shots],
                     headers=["shots"] + ["uncalibrated" if m == "none" else f"{m} / {g}" for m, g in arms],
                     digits=3, caption=f"icl_gpt_{sz}: test ECE after recalibration (mean over tasks and seeds; "
                                       "every row in results.json with its std and accuracy)")
    return RecipeResult(results, report)
