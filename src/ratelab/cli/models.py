"""``ratelab models``: list registered models with their parameter counts, or one model's parameter names."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list registered models", description="List registered model names.")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'crate_*' (default: all)")
    p.add_argument("--params", action="store_true", help="also build each model on the meta device and count "
                   "parameters (at its default num_classes and img_size)")
    p.add_argument("--keys", action="store_true", help="print every parameter and buffer name with its shape (the "
                   "names --init-reinit and checkpoint keys use), built on the meta device")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ratelab import create_model, list_models
    from ratelab.core.errors import UsageError

    names = list_models(args.pattern)
    if not names:
        raise UsageError(f"no model matches {args.pattern!r}")
    for name in names:
        if args.keys:
            with torch.device("meta"):
                sd = create_model(name).state_dict()
            print(f"{name} ({len(sd)} tensors)")
            for k, v in sd.items():
                print(f"  {k:56s} {tuple(v.shape)}")
        elif args.params:
            with torch.device("meta"):
                n = sum(p.numel() for p in create_model(name).parameters())
            print(f"{name:40s} {n / 1e6:9.2f}M")
        else:
            print(name)
    return 0
