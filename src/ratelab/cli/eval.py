"""``ratelab eval``: score a saved model the way its training task does, on a dataset split.

The run's task is rebuilt from its saved config (the checkpoint's, else ``config.json``) and its ``evaluate`` is
called: a classifier gets accuracy and cross-entropy, an MCR² network nearest-subspace accuracy and its rates, and
so on for every task, with no task-specific code here. The dataset, its root, image size, seed (which fixes
train/val partitions) and options default to those of the training run, so ``ratelab eval --checkpoint RUN``
evaluates on exactly the run's validation split.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a saved classifier (accuracy, loss)",
        description="Evaluate a classifier saved by ratelab (run directory, model.safetensors with "
        "model_config.json beside it, or a training checkpoint checkpoints/last.pt) on a dataset split. Prints "
        "accuracy, mean cross-entropy and the number of items; with --out also writes OUT/eval.json.",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="PATH",
        help="run directory, model.safetensors, or a trainer checkpoint (*.pt)",
    )
    p.add_argument("--dataset", default=None, help="dataset name (default: the run's dataset from its config.json)")
    p.add_argument("--split", default="val", help="dataset split (default: val)")
    p.add_argument("--data-root", default=None, help="data directory for file-backed datasets (default: the run's)")
    p.add_argument(
        "--img-size", type=int, default=None, help="image side in pixels (default: the run's, else the dataset's)"
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="dataset seed, which fixes train/val partitions (default: the run's seed, else 0)",
    )
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default: 256)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--n-components", type=int, default=None,
                   help="MCR² runs only: principal directions per class for nearest-subspace scoring "
                   "(default: the run's task setting)")
    p.add_argument("--calibration", action="store_true",
                   help="also report calibration: top-label ECE (15 equal-width and equal-mass bins), classwise ECE, "
                   "MCE, RMS-CE, Brier, NLL; with --out also DIR/reliability.png")
    p.add_argument("--linear-probe", action="store_true",
                   help="also score a linear probe (logistic regression) of the frozen encoder's forward_features, "
                   "[CLS] and mean-pooled patch tokens, fitted on the un-augmented train split; any encoder")
    p.add_argument("--probe-C", type=float, default=1.0, help="--linear-probe: inverse L2 strength (default 1.0)")
    p.add_argument("--out", default=None, metavar="DIR", help="write DIR/eval.json with the results")
    p.set_defaults(func=run)


def _run_config(path: Path) -> dict[str, Any]:
    """The training config of the run ``path`` belongs to ({} when there is none): the checkpoint's, else
    ``config.json``."""
    from ratelab.core.errors import UsageError

    for cand in (path, path.parent, path.parent.parent):
        if not cand.is_dir():
            continue
        if (cand / "checkpoints").is_dir():
            from ratelab.train.trainer import read_checkpoint_config

            try:
                return read_checkpoint_config(cand)[1]
            except Exception:  # noqa: BLE001 -- fall back to config.json beside it
                pass
        f = cand / "config.json"
        if f.is_file():
            try:
                data = json.loads(f.read_text())
            except json.JSONDecodeError as e:
                raise UsageError(f"{f}: not valid JSON ({e.msg})") from None
            return data if isinstance(data, dict) and "dataset" in data else {}
    return {}


def load_classifier(path: str | Path):
    """Rebuild a model from a run directory, a ``model.safetensors`` or a trainer checkpoint ``*.pt``.

    Raises:
        UsageError: nothing loadable at ``path``.
        ratelab.core.errors.CheckpointError: the file is unreadable or does not fit the model.
    """
    from ratelab.core.checkpoint import MODEL_CONFIG, load_model
    from ratelab.core.errors import UsageError

    p = Path(path)
    if not p.exists():
        raise UsageError(f"--checkpoint: {p} does not exist")
    if p.is_dir() and not (p / MODEL_CONFIG).is_file() and not (p / "checkpoints" / "last.pt").is_file():
        raise UsageError(f"--checkpoint: {p} holds neither {MODEL_CONFIG} + model.safetensors nor checkpoints/last.pt")
    return load_model(p)


def run(args: argparse.Namespace) -> int:
    from ratelab.core.dist import get_dist_info
    from ratelab.core.errors import UsageError
    from ratelab.train import TrainConfig, build_task
    from ratelab.train.data import DeviceLoader, EvalShardSampler
    from ratelab.train.tasks import EvalContext

    if args.batch_size <= 0:
        raise UsageError(f"--batch-size must be positive, got {args.batch_size}")
    path = Path(args.checkpoint)
    model = load_classifier(path)
    run_cfg = _run_config(path)
    dataset = args.dataset or run_cfg.get("dataset")
    if not dataset:
        raise UsageError("--dataset is required: the checkpoint is not inside a training run with a config.json")
    same = dataset == run_cfg.get("dataset")
    img_size = args.img_size or (run_cfg.get("img_size") if same else None) or getattr(model, "img_size", None)
    seed = args.seed if args.seed is not None else (run_cfg.get("seed", 0) if same else 0)
    root = args.data_root or (run_cfg.get("data_root") if same else None)
    # The run's own config (task section included) with the data settings of this evaluation.
    base = {k: v for k, v in run_cfg.items() if k in {f for f in TrainConfig.__dataclass_fields__}}
    base.update(dataset=dataset, img_size=img_size, seed=seed, data_root=root, resume=False, progress=False,
                device=args.device)
    if not same:
        base["dataset_kwargs"] = {}
    cfg = TrainConfig.from_dict(base, source=f"{path} (run config)")
    if args.n_components is not None and hasattr(cfg.task, "n_components"):
        cfg = cfg.with_overrides([("task.n_components", str(args.n_components))])
    task = build_task(cfg)
    _, val = task.build_datasets(cfg)
    ds = val
    if args.split != "val" or val is None:
        from ratelab.data import build_dataset

        ds = build_dataset(dataset, args.split, root=root, img_size=img_size, seed=seed, augment=False,
                           **cfg.dataset_kwargs)
    # The split actually evaluated, as the dataset names it (CIFAR's "val" is its test set): never the alias.
    split = getattr(ds, "split", args.split)
    dist = get_dist_info(args.device)
    device = dist.device
    model = model.to(device).eval()
    task.setup(device, dist)
    sampler = EvalShardSampler(len(ds), batch_size=args.batch_size)
    loader = DeviceLoader(torch.utils.data.DataLoader(ds, batch_sampler=sampler), device)
    ctx = EvalContext(loader=loader, out_dir=Path(args.out) if args.out else path, step=0, epoch=0, dist=dist,
                      device=device)
    with torch.no_grad():
        metrics = task.evaluate(model, ctx)
    res: dict[str, Any] = {(k[4:] if k.startswith("val_") else k): v for k, v in metrics.items()}
    res["n"] = len(ds)
    if args.calibration:
        if cfg.task.name != "classification":
            raise UsageError(f"--calibration needs a classifier's logits; this run's task is {cfg.task.name!r}")
        res["calibration"] = _calibration(model, ds, batch_size=args.batch_size, device=device,
                                          figure=Path(args.out) / "reliability.png" if args.out else None)
    if args.linear_probe:
        from ratelab.data import build_dataset
        from ratelab.eval.probe import probe_encoder

        if args.probe_C <= 0:
            raise UsageError(f"--probe-C must be > 0, got {args.probe_C}")
        fit = build_dataset(dataset, "train", root=root, img_size=img_size, seed=seed, augment=False,
                            **cfg.dataset_kwargs)
        try:
            res["linear_probe"] = probe_encoder(model, fit, ds, C=args.probe_C, batch_size=args.batch_size,
                                                device=device)
        except (TypeError, ValueError) as e:
            raise UsageError(f"--linear-probe: {e}") from None
    out = {
        "checkpoint": str(path),
        "model": getattr(model, "model_name", type(model).__name__),
        "task": cfg.task.name,
        "dataset": dataset,
        "split": split,
        "img_size": img_size,
        "seed": seed,
        **res,
    }
    label = "nearest-subspace acc" if cfg.task.name == "mcr2" else "acc"
    shown = ", ".join(f"{k} {v:.4f}" for k, v in res.items() if isinstance(v, float) and k != "acc")
    acc = f"{label} {res['acc']:.4f}, " if "acc" in res else ""
    print(f"{out['model']} ({cfg.task.name}) on {dataset}/{split} ({res['n']} items): {acc}{shown}")
    for k, v in res.get("calibration", {}).items():
        print(f"  {k:18s} {v:.4f}")
    for k, v in res.get("linear_probe", {}).items():
        print(f"  {k:22s} {v:.4f}")
    if args.out:
        from ratelab.core.checkpoint import atomic_write_text

        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json.dumps(out, indent=2), out_dir / "eval.json")
        print(f"wrote {out_dir / 'eval.json'}")
    return 0


def _calibration(model, ds, *, batch_size, device, figure) -> dict[str, float]:
    """Calibration metrics of the classifier's softmax on ``ds`` (and the reliability diagram, if asked)."""
    from ratelab.analysis import calibration as cal
    from ratelab.eval.classification import predict

    logits, labels = predict(model, ds, batch_size=batch_size, device=device)
    probs = logits.double().softmax(-1)
    res = {
        "ece_width15": cal.ece(probs, labels, n_bins=15, binning="width"),
        "ece_mass15": cal.ece(probs, labels, n_bins=15, binning="mass"),
        "classwise_ece15": cal.classwise_ece(probs, labels, n_bins=15),
        "mce15": cal.mce(probs, labels, n_bins=15),
        "rms_ce15": cal.rms_ce(probs, labels, n_bins=15),
        "brier": cal.brier(probs, labels),
        "nll": cal.nll(probs, labels),
    }
    if figure is not None:
        figure.parent.mkdir(parents=True, exist_ok=True)
        cal.reliability_diagram(probs, labels, n_bins=15).savefig(figure, dpi=110, bbox_inches="tight")
    return res
