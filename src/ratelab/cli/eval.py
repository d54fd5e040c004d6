"""``ratelab eval``: accuracy and cross-entropy of a saved classifier on a dataset split.

The dataset, its root, image size, seed (which fixes train/val partitions) and options default to those of the
training run when the checkpoint sits in a run directory (``config.json``), so ``ratelab eval --checkpoint RUN``
evaluates on exactly the run's validation split.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


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
    p.add_argument("--n-components", type=int, default=30,
                   help="MCR² runs only: principal directions per class for nearest-subspace scoring "
                   "(default: 30, as the task)")
    p.add_argument("--calibration", action="store_true",
                   help="also report calibration: top-label ECE (15 equal-width and equal-mass bins), classwise ECE, "
                   "MCE, RMS-CE, Brier, NLL; with --out also DIR/reliability.png")
    p.add_argument("--out", default=None, metavar="DIR", help="write DIR/eval.json with the results")
    p.set_defaults(func=run)


def _run_config(path: Path) -> dict[str, Any]:
    """The training config of the run ``path`` belongs to ({} when there is none)."""
    for cand in (path, path.parent, path.parent.parent):
        f = cand / "config.json"
        if cand.is_dir() and f.is_file():
            try:
                data = json.loads(f.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{f}: not valid JSON ({e.msg})") from None
            return data if isinstance(data, dict) and "dataset" in data else {}
    return {}


def load_classifier(path: str | Path):
    """Rebuild a model from a run directory, a ``model.safetensors`` or a trainer checkpoint ``*.pt``.

    Raises:
        FileNotFoundError: nothing loadable at ``path``.
        ratelab.core.checkpoint.CheckpointError: the file is unreadable or does not fit the model.
    """
    from ratelab.core.checkpoint import MODEL_CONFIG, load_model

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--checkpoint: {p} does not exist")
    if p.is_dir() and not (p / MODEL_CONFIG).is_file() and not (p / "checkpoints" / "last.pt").is_file():
        raise FileNotFoundError(
            f"--checkpoint: {p} holds neither {MODEL_CONFIG} + model.safetensors nor checkpoints/last.pt"
        )
    return load_model(p)


def run(args: argparse.Namespace) -> int:
    from ratelab.core.dist import resolve_device
    from ratelab.data import build_dataset
    from ratelab.eval.classification import evaluate_classifier

    if args.batch_size <= 0:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    path = Path(args.checkpoint)
    model = load_classifier(path)
    run_cfg = _run_config(path)
    dataset = args.dataset or run_cfg.get("dataset")
    if not dataset:
        raise ValueError("--dataset is required: the checkpoint is not inside a training run with a config.json")
    same = dataset == run_cfg.get("dataset")
    img_size = args.img_size or (run_cfg.get("img_size") if same else None) or getattr(model, "img_size", None)
    seed = args.seed if args.seed is not None else (run_cfg.get("seed", 0) if same else 0)
    root = args.data_root or (run_cfg.get("data_root") if same else None)
    extra = dict(run_cfg.get("dataset_kwargs") or {}) if same else {}
    ds = build_dataset(dataset, args.split, root=root, img_size=img_size, seed=seed, augment=False, **extra)
    device = resolve_device(args.device)
    model = model.to(device)
    if run_cfg.get("task") == "mcr2":
        # An MCR² network outputs features, not logits: score it as its task does, by nearest subspace with class
        # subspaces fitted on the (un-augmented) training split.
        res = _evaluate_mcr2(model, ds, root=root, img_size=img_size, seed=seed, extra=extra, dataset=dataset,
                             batch_size=args.batch_size, device=device, n_components=args.n_components)
    else:
        res = evaluate_classifier(model, ds, batch_size=args.batch_size, device=device)
        if args.calibration:
            res["calibration"] = _calibration(model, ds, batch_size=args.batch_size, device=device,
                                              figure=Path(args.out) / "reliability.png" if args.out else None)
    if args.calibration and "calibration" not in res:
        raise ValueError("--calibration needs a classifier's logits; this run trains features (task mcr2)")
    out = {
        "checkpoint": str(path),
        "model": getattr(model, "model_name", type(model).__name__),
        "dataset": dataset,
        "split": args.split,
        "img_size": img_size,
        "seed": seed,
        **res,
    }
    metric = f"nearest-subspace acc {res['acc']:.4f}, delta_R {res['delta_R']:.3f}" if "delta_R" in res else (
        f"acc {res['acc']:.4f}, loss {res['loss']:.4f}")
    print(f"{out['model']} on {dataset}/{args.split} ({res['n']} items): {metric}")
    for k, v in res.get("calibration", {}).items():
        print(f"  {k:18s} {v:.4f}")
    if args.out:
        from ratelab.core.checkpoint import atomic_write_text

        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json.dumps(out, indent=2), out_dir / "eval.json")
        print(f"wrote {out_dir / 'eval.json'}")
    return 0


def _evaluate_mcr2(model, ds, *, root, img_size, seed, extra, dataset, batch_size, device, n_components) -> dict:
    """Nearest-subspace accuracy and rate reduction of an MCR² feature network on ``ds``."""
    from ratelab.data import build_dataset
    from ratelab.eval.subspace import nearest_subspace_fit, nearest_subspace_predict
    from ratelab.objectives.rate_reduction import rate_reduction
    from ratelab.train.mcr2_task import EPS_OFFICIAL, extract_features

    train = build_dataset(dataset, "train", root=root, img_size=img_size, seed=seed, augment=False, **extra)
    model.eval()
    f_tr, y_tr = extract_features(model, train, device=device, batch_size=batch_size, normalize=True)
    f_te, y_te = extract_features(model, ds, device=device, batch_size=batch_size, normalize=True)
    fit = nearest_subspace_fit(f_tr, y_tr, n_components, num_classes=ds.num_classes)
    acc = (nearest_subspace_predict(fit, f_te) == y_te).double().mean().item()
    dR, R, Rc = rate_reduction(f_te.double(), y_te, EPS_OFFICIAL, num_classes=ds.num_classes)
    return {"acc": acc, "n": int(len(y_te)), "delta_R": float(dR), "R": float(R), "Rc": float(Rc),
            "n_components": n_components, "eps": EPS_OFFICIAL}


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
