"""``ratelab measure``: layer-wise compression and sparsity of a CRATE-like model on a dataset.

Writes ``OUT/rates.json`` (see :func:`ratelab.analysis.layer_rates.measure_layers`, plus model, checkpoint and
data provenance) and ``OUT/rates.png`` (compression and sparsity per layer), and prints a small table. A family
declares the measures it supports (``layer_measures``: compression needs per-head subspace projections, sparsity
sparse codes); a model that supports none is a usage error naming what each measure needs, one that supports some
gets the others as ``n/a``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ratelab.cli.errors import UsageError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "measure",
        help="per-layer compression Rc and ISTA sparsity of a model",
        description="Measure per-layer compression (coding rate of the per-head projections, official CRATE "
        "convention) and sparsity (fraction of zeros of each ISTA output) of a trained or randomly initialized "
        "model over a set of images; writes rates.json and rates.png.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="PATH", help="run directory or model.safetensors saved by ratelab "
                     "(model_config.json must sit beside it)")
    src.add_argument("--model", metavar="NAME", help="registered model name, randomly initialized (see "
                     "`ratelab models`); its input channels and size follow the dataset")
    p.add_argument("--seed", type=int, default=0, help="seed for the random init, the data partition and the "
                   "image subset (default: 0)")
    p.add_argument("--dataset", default="digits", help="dataset name (default: digits)")
    p.add_argument("--split", default="val", help="dataset split (default: val)")
    p.add_argument("--img-size", type=int, default=None, help="image side in pixels (default: the dataset's)")
    p.add_argument("--data-root", default=None, help="data directory, for file-backed datasets")
    p.add_argument("--num-images", type=int, default=512, help="number of images, a seeded random subset of the "
                   "split; all of it if smaller (default: 512)")
    p.add_argument("--eps", type=float, default=0.1, help="precision epsilon, not squared; 0.1 reproduces the "
                   "official CRATE measurement (default: 0.1)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")
    p.add_argument("--device", default="auto", help="torch device, or 'auto' = cuda if available else cpu "
                   "(default: auto)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory for rates.json and rates.png")
    p.set_defaults(func=run)


def _build_dataset(name: str, split: str, *, root: str | None, img_size: int | None, seed: int):
    # Indirection so that tests can substitute the data source.
    from ratelab.data import build_dataset

    # No augmentation: the measurement must see the images themselves, whatever the split.
    return build_dataset(name, split, root=root, img_size=img_size, seed=seed, augment=False)


def _load_images(args: argparse.Namespace, img_size: int | None):
    import torch

    ds = _build_dataset(args.dataset, args.split, root=args.data_root, img_size=img_size, seed=args.seed)
    # The split actually measured (CIFAR's "val" is its test set): what the output must call it.
    args.split = getattr(ds, "split", args.split)
    n_total = len(ds)
    if n_total == 0:
        raise UsageError(f"--dataset {args.dataset} --split {args.split}: the split is empty")
    g = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(n_total, generator=g)[: min(args.num_images, n_total)].sort().values
    images = torch.stack([ds[int(i)][0] for i in idx])
    return images, n_total


def _validate(args: argparse.Namespace) -> None:
    if args.num_images < 1:
        raise UsageError(f"--num-images must be >= 1, got {args.num_images}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not args.eps > 0:
        raise UsageError(f"--eps must be > 0 (epsilon, not squared), got {args.eps}")
    if args.img_size is not None and args.img_size < 1:
        raise UsageError(f"--img-size must be >= 1, got {args.img_size}")
    if args.checkpoint is not None and not Path(args.checkpoint).exists():
        raise UsageError(f"--checkpoint {args.checkpoint}: no such file or directory")


def family_measures() -> dict[str, tuple[str, ...]]:
    """``{family: measures}`` for every registered family that supports at least one layer measure.

    One model per family is built on the meta device (no memory, no init cost) to read its ``layer_measures``.
    """
    import torch

    from ratelab.analysis.layer_rates import supported_measures
    from ratelab.models._factory import create_model, list_models, model_family

    first: dict[str, str] = {}
    for name in list_models():
        first.setdefault(model_family(name), name)
    out = {}
    for family, name in sorted(first.items()):
        try:
            with torch.device("meta"):
                measures = supported_measures(create_model(name))
        except Exception:  # noqa: BLE001 -- a family that cannot be probed is simply not listed
            continue
        if measures:
            out[family] = measures
    return out


def _require_measures(model) -> None:
    from ratelab.analysis.layer_rates import supported_measures, unsupported_message

    if supported_measures(model):
        return
    listed = "; ".join(f"{fam}_* ({', '.join(ms)})" for fam, ms in family_measures().items())
    raise UsageError(unsupported_message(model) + (f". Families with layer measures: {listed}" if listed else ""))


def _probe(name: str):
    # The registered architecture without weights or image size, to refuse an unsupported family before any data is
    # read (and before its builder sees dataset-specific arguments it may not take, like an ICL model's img_size).
    import torch

    from ratelab import create_model

    with torch.device("meta"):
        return create_model(name)


def _format_table(result: dict[str, Any]) -> str:
    def cell(r: dict[str, Any], key: str, digits: int) -> str:
        if r[key] is None:
            return "n/a"
        return f"{r[key]:.{digits}f}±{r[key + '_std']:.{digits}f}"

    lines = [f"{'layer':>5}  {'Rc(U^T Z^l)':>16}  {'Rc(U^T Z^l+1/2)':>16}  {'zero fraction':>16}"]
    for r in result["layers"]:
        lines.append(
            f"{r['layer'] + 1:>5}  {cell(r, 'compression', 3):>16}  {cell(r, 'compression_half', 3):>16}  "
            f"{cell(r, 'sparsity', 4):>16}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import torch

    from ratelab import create_model
    from ratelab.analysis.layer_rates import (
        MEASURES,
        measure_layers,
        plot_layer_rates,
        supported_measures,
        unsupported_message,
    )
    from ratelab.core.checkpoint import atomic_write_text, load_model

    _validate(args)
    if args.checkpoint is not None:
        model = load_model(args.checkpoint)
        _require_measures(model)
        label = "checkpoint"
        # Measure at the resolution the model was built for unless told otherwise.
        images, n_total = _load_images(args, args.img_size or getattr(model, "img_size", None))
        _, C, H, W = images.shape
    else:
        _require_measures(_probe(args.model))
        images, n_total = _load_images(args, args.img_size)
        _, C, H, W = images.shape
        torch.manual_seed(args.seed)
        model = create_model(args.model, in_chans=C, img_size=H)
        label = "random init"
    in_chans = getattr(model, "in_chans", C)
    if in_chans != C:
        raise UsageError(f"--dataset {args.dataset} gives {C}-channel images but the model expects {in_chans}")

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    result = measure_layers(model, images, eps=args.eps, batch_size=args.batch_size, device=device)
    result = {
        "model": getattr(model, "model_name", type(model).__name__),
        "checkpoint": None if args.checkpoint is None else str(Path(args.checkpoint).resolve()),
        "dataset": args.dataset,
        "split": args.split,
        "img_size": int(H),
        "seed": args.seed,
        "split_size": n_total,
        **result,
    }

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(result, indent=2) + "\n", out / "rates.json")
    plot_layer_rates({label: result}, out / "rates.png")
    heads = "" if result["num_heads"] is None else f", {result['num_heads']} heads x {result['head_dim']}"
    print(f"{result['model']} ({label}) on {args.dataset}/{args.split}: {result['num_images']} images, "
          f"{result['num_tokens']} tokens{heads}, eps={args.eps}")
    if supported_measures(model) != MEASURES:
        print(unsupported_message(model))
    print(_format_table(result))
    print(f"wrote {out / 'rates.json'} and {out / 'rates.png'}")
    return 0
