"""``ratelab reproduce RECIPE``: run one paper's experiment; writes results.json, figures and report.html."""

from __future__ import annotations

import argparse

from ratelab.recipes._common import SCALE_NAMES


def add_scale_args(p: argparse.ArgumentParser, *, default: str) -> None:
    """``--scale {smoke,quick,full}`` with ``--quick`` and ``--smoke`` as short forms (one of them at most)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--scale", choices=SCALE_NAMES, default=default,
                   help=f"smoke: seconds-long wiring check (tiny models, numbers meaningless); quick: the CPU-minutes "
                        f"version `ratelab demo` runs; full: the fuller study of the recipe's docstring "
                        f"(default {default})")
    g.add_argument("--quick", dest="scale", action="store_const", const="quick", help="same as --scale quick")
    g.add_argument("--smoke", dest="scale", action="store_const", const="smoke", help="same as --scale smoke")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for the recipe (default 1: the recipes' small models run as fast or faster "
                        "on 1 thread, and a recipe's figures repeat bitwise only at a fixed thread count)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reproduce",
        help="run a paper recipe (results.json + figures + report.html)",
        description="Re-run one paper's experiment at a chosen scale. `--list` shows the recipes.",
    )
    p.add_argument("recipe", nargs="?", help="recipe name (see --list)")
    p.add_argument("--list", action="store_true", help="list the available recipes and exit")
    add_scale_args(p, default="full")
    p.add_argument("--out", help="output directory (required unless --list)")
    p.add_argument("--seed", type=int, default=0, help="base random seed (default 0)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="disable progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ratelab.core.errors import ConfigError
    from ratelab.recipes import list_recipes, run_recipe

    if args.list or not args.recipe:
        specs = list_recipes()
        width = max(len(s.name) for s in specs)
        total = sum(s.quick_seconds for s in specs)
        print(f"{len(specs)} recipes (scales: {', '.join(SCALE_NAMES)}; times are for --scale quick on one thread of "
              f"a quiet 2-core machine, about {total / 60:.0f} min for all of them):")
        for spec in specs:
            print(f"  {spec.name:{width}s}  ~{spec.quick_seconds:>3.0f} s  {spec.paper}: {spec.description}")
        return 0
    if not args.out:
        raise ConfigError("--out: an output directory is required to run a recipe (e.g. --out runs/NAME)")
    res = run_recipe(args.recipe, args.out, args.scale, seed=args.seed, device=args.device,
                     progress=not args.no_progress, threads=args.threads)
    print_figures({args.recipe: res.results})
    print(f"\nwrote {args.out}/results.json and {args.out}/report.html")
    print_claims({args.recipe: res.results})
    return 0


def print_figures(results_by_recipe: dict) -> None:
    """Print each recipe's headline numbers (its ``summary``) as a plain two-column table."""
    from ratelab.eval.report import fmt

    for name, res in results_by_recipe.items():
        print(f"\n== {name} ({res.get('paper', '')}) ==")
        summary = res.get("summary", {})
        width = max((len(k) for k in summary), default=10)
        for k, v in summary.items():
            print(f"  {k:<{width}}  {fmt(v) if not isinstance(v, list) else ', '.join(fmt(x, 3) for x in v)}")


def print_claims(results_by_recipe: dict) -> None:
    """Print the summary table of the claims checked: a tally, then per recipe each claim's verdict (holds /
    does not hold, the words the HTML report uses) and its measured figure."""
    from ratelab.eval.report import summary_rows_text

    lines = summary_rows_text(results_by_recipe)
    rule = "=" * min(100, max(len(x) for x in lines))
    print(f"\n{rule}\nSummary: {lines[0]}\n{rule}")
    for line in lines[1:]:
        print(line)
