"""``ratelab models``: list registered models with their parameter counts."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list registered models", description="List registered model names.")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'crate_*' (default: all)")
    p.add_argument("--params", action="store_true", help="also build each model on the meta device and count "
                   "parameters (at its default num_classes and img_size)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ratelab import create_model, list_models
    from ratelab.core.errors import UsageError

    names = list_models(args.pattern)
    if not names:
        raise UsageError(f"no model matches {args.pattern!r}")
    for name in names:
        if args.params:
            with torch.device("meta"):
                n = sum(p.numel() for p in create_model(name).parameters())
            print(f"{name:40s} {n / 1e6:9.2f}M")
        else:
            print(name)
    return 0
