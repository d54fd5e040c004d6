"""``ratelab reproduce RECIPE``: run one paper's experiment; writes results.json, figures and report.html."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reproduce",
        help="run a paper recipe (results.json + figures + report.html)",
        description="Re-run one paper's experiment at small scale. `--list` shows the recipes.",
    )
    p.add_argument("recipe", nargs="?", help="recipe name (see --list)")
    p.add_argument("--list", action="store_true", help="list the available recipes and exit")
    p.add_argument("--quick", action="store_true", help="the CPU-minutes version (the one `ratelab demo` runs)")
    p.add_argument("--smoke", action="store_true",
                   help="seconds-long wiring check (tiny model, few steps; numbers are meaningless)")
    p.add_argument("--out", help="output directory (required unless --list)")
    p.add_argument("--seed", type=int, default=0, help="base random seed (default 0)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="disable progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ratelab.recipes import list_recipes, run_recipe

    if args.list or not args.recipe:
        for spec in list_recipes():
            print(f"{spec.name:20s} ~{spec.quick_minutes:g} min quick  {spec.paper}: {spec.description}")
        return 0
    if not args.out:
        raise ValueError("--out DIR is required")
    res = run_recipe(args.recipe, args.out, quick=args.quick, smoke=args.smoke, seed=args.seed, device=args.device,
                     progress=not args.no_progress)
    print_summary({args.recipe: res.results})
    print(f"wrote {args.out}/results.json and {args.out}/report.html")
    return 0


def print_summary(results_by_recipe: dict) -> None:
    """Print each recipe's headline numbers and claim checks as a plain table."""
    from ratelab.eval.report import fmt

    for name, res in results_by_recipe.items():
        print(f"\n== {name} ({res.get('paper', '')}) ==")
        summary = res.get("summary", {})
        width = max((len(k) for k in summary), default=10)
        for k, v in summary.items():
            print(f"  {k:<{width}}  {fmt(v) if not isinstance(v, list) else ', '.join(fmt(x, 3) for x in v)}")
        for c in res.get("checks", []):
            print(f"  [{'holds' if c['holds'] else 'FAILS'}] {c['claim']} (measured: {c['measured']})")
