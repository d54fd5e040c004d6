"""``ratelab demo``: the quick version of every recipe, combined into one report."""

from __future__ import annotations

import argparse

from ratelab.cli.reproduce import add_scale_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the quick suite of all recipes and write one combined report",
        description="Run every recipe at --scale quick into OUT/<recipe>/, then write OUT/report.html "
        "(self-contained, opening with one summary row per recipe) and OUT/summary.json, and end with the summary "
        "table of every claim checked (holds / does not hold, and the measured figure).",
    )
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--recipes", default=None, help="comma-separated subset of recipes (default: all)")
    add_scale_args(p, default="quick")
    p.add_argument("--seed", type=int, default=0, help="base random seed (default 0)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--no-progress", action="store_true", help="disable progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import platform
    import time
    from pathlib import Path

    import torch

    from ratelab import __version__
    from ratelab.cli.reproduce import print_claims, print_figures
    from ratelab.eval.report import Report, SummaryRow, write_json
    from ratelab.recipes import get_recipe, list_recipes, run_recipe

    specs = [get_recipe(n.strip()) for n in args.recipes.split(",")] if args.recipes else list_recipes()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    combined = Report("ratelab demo")
    combined.text(
        f"ratelab {__version__}, torch {torch.__version__}, {platform.machine()}, "
        f"{args.threads} thread(s) per recipe, "
        f"seed {args.seed}. Each section is one recipe run at scale {args.scale}; its own files are in "
        f"{out}/<recipe>/."
    )
    all_results, rows = {}, []
    for spec in specs:
        print(f"[demo] {spec.name}: {spec.description}", flush=True)
        res = run_recipe(spec.name, out / spec.name, args.scale, seed=args.seed, device=args.device,
                         progress=not args.no_progress, threads=args.threads)
        all_results[spec.name] = res.results
        anchor = combined.include(res.report, f"{spec.name} — {spec.paper}", anchor=spec.name)
        rows.append(SummaryRow(spec.name, spec.paper, anchor, res.results.get("checks", [])))
    combined.summary(rows)
    summary = {
        "ratelab_version": __version__,
        "torch_version": torch.__version__,
        "scale": args.scale,
        "seed": args.seed,
        "wall_time_s": round(time.time() - t0, 1),
        "recipes": {
            n: {"paper": r.get("paper", ""), "wall_time_s": r.get("wall_time_s"), "threads": r.get("threads"),
                "summary": r.get("summary", {}), "checks": r.get("checks", [])}
            for n, r in all_results.items()
        },
    }
    write_json(summary, out / "summary.json")
    combined.save(out / "report.html")
    print_figures(all_results)
    print(f"\nwrote {out}/report.html and {out}/summary.json in {summary['wall_time_s']} s")
    print_claims(all_results)
    return 0
