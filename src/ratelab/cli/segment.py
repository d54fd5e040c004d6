"""``ratelab segment``: attention maps, MaskCut masks and PCA pictures of a trained model on a folder of images.

For every image of ``--images`` (sorted; the image types ``imagefolder`` reads) it writes into ``--out``:

* ``<stem>_attn.png``: the mean over heads of the [CLS] attention of ``--layer`` (penultimate by default) over the
  image, and ``<stem>_attn_mask.png``: that map thresholded to the top ``--p`` share (§3.2-3.3 of the Emergence
  paper's protocol, ``ratelab.analysis.segmentation.threshold_top``);
* ``<stem>_maskcut.png`` and ``<stem>_mask<k>.png``: up to ``--n-objects`` MaskCut masks (§3.5, tau ``--tau``) on the
  layer's patch features (CRATE: the heads' projections U_k^T z, the paper's affinity);
* ``<stem>_pca.png``: the top-3 principal components of the foreground patch features as RGB (§3.4);

and ``index.html``, one self-contained page with every picture and a row per image. Images are resized to
``--img-size`` (default: the model's) and normalized with ``--mean``/``--std`` (default ImageNet's for RGB models; a
one-channel model gets each image standardized, as ratelab's digits/shapes datasets are).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("segment", help="attention maps, MaskCut masks and PCA of a model on your images",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="run directory, model.safetensors, trainer checkpoint, or an official weights file (with "
                        "--model)")
    p.add_argument("--model", default=None, help="registered model name, for an official weights file")
    p.add_argument("--images", required=True, metavar="DIR", help="folder of images")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument("--img-size", type=int, default=None, help="side the images are resized to (default: model's)")
    p.add_argument("--layer", type=int, default=-2, help="block whose attention/features are read (default -2)")
    p.add_argument("--p", type=float, default=0.6, help="share of attention entries kept in the mask (default 0.6)")
    p.add_argument("--tau", type=float, default=0.15, help="MaskCut affinity threshold (default 0.15)")
    p.add_argument("--n-objects", type=int, default=3, help="MaskCut rounds (default 3)")
    p.add_argument("--mean", type=float, nargs="+", default=None, help="per-channel normalization mean")
    p.add_argument("--std", type=float, nargs="+", default=None, help="per-channel normalization std")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _load(args: argparse.Namespace):
    from ratelab.core.errors import UsageError

    path = Path(args.checkpoint)
    if args.model:
        from ratelab import create_model

        if not path.is_file():
            raise UsageError(f"--checkpoint: {path} is not a file (with --model it is a weights file)")
        return create_model(args.model, checkpoint_path=str(path), num_classes=0)
    from ratelab.cli.eval import load_classifier

    return load_classifier(path)


def _read_image(path: Path, size: int, in_chans: int, mean, std):
    import numpy as np
    import torch
    from PIL import Image

    from ratelab.data.folder import load_image

    im = load_image(str(path), "L" if in_chans == 1 else "RGB").resize((size, size), Image.BICUBIC)
    arr = np.asarray(im, dtype=np.float32) / 255.0
    x = torch.from_numpy(arr)
    x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
    if mean is None and in_chans == 1:
        return (x - x.mean()) / x.std().clamp_min(1e-6)
    if mean is None:
        mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return (x - m) / s


def _save_png(arr, path: Path) -> None:
    import numpy as np
    from PIL import Image

    a = np.asarray(arr)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        a = (np.clip(a, 0, 1) * 255).astype(np.uint8)
    Image.fromarray(a).save(path)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from ratelab.analysis.segmentation import cls_attention_maps, maskcut, patch_features, pca_rgb, threshold_top
    from ratelab.core.dist import resolve_device
    from ratelab.core.errors import UsageError
    from ratelab.data.folder import IMG_EXTENSIONS, is_image_file
    from ratelab.eval.report import Report

    src = Path(args.images)
    if not src.is_dir():
        raise UsageError(f"--images: {src} is not a directory")
    files = sorted(f for f in src.iterdir() if f.is_file() and is_image_file(f.name))
    if not files:
        raise UsageError(f"--images: no {'/'.join(IMG_EXTENSIONS)} files in {src}")
    if not 0 < args.p <= 1:
        raise UsageError(f"--p must be in (0, 1], got {args.p}")
    if args.n_objects < 1:
        raise UsageError(f"--n-objects must be >= 1, got {args.n_objects}")
    if (args.mean is None) != (args.std is None):
        raise UsageError("--mean and --std go together")
    device = resolve_device(args.device)
    model = _load(args).to(device).eval()
    in_chans = int(getattr(model, "in_chans", 3))
    size = args.img_size or int(getattr(model, "img_size", 224))
    if args.mean is not None and not (len(args.mean) == len(args.std) == in_chans):
        raise UsageError(f"--mean/--std need {in_chans} values each (the model's input channels)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = Report(f"ratelab segment: {getattr(model, 'model_name', type(model).__name__)} on {src}")
    report.text(f"{len(files)} images at {size} px; layer {args.layer}; attention mask keeps the top "
                f"{args.p:.0%} of entries; MaskCut tau {args.tau}, {args.n_objects} rounds.")
    rows, shown = [], []
    for f in tqdm(files, desc="segment", disable=args.no_progress):
        x = _read_image(f, size, in_chans, args.mean, args.std)[None].to(device)
        with torch.no_grad():
            maps = cls_attention_maps(model, x, args.layer, upsample=False)  # (1, heads, h, w)
            feats = patch_features(model, x, args.layer)[0]  # (N, D)
        h, w = maps.shape[-2:]
        mean_map = maps[0].mean(0)
        up = F.interpolate(mean_map[None, None], size=(size, size), mode="nearest")[0, 0]
        attn_mask = threshold_top(up[None], p=args.p)[0]
        masks = maskcut(feats, tau=args.tau, n_objects=args.n_objects, grid=(h, w))
        pca = pca_rgb(feats, (h, w))
        stem = f.stem
        norm_map = ((up - up.min()) / (up.max() - up.min()).clamp_min(1e-12)).cpu().numpy()
        _save_png(norm_map, out / f"{stem}_attn.png")
        _save_png(attn_mask.cpu().numpy(), out / f"{stem}_attn_mask.png")
        colors = np.array([[230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48], [145, 30, 180]], np.uint8)
        seg = np.zeros((h, w, 3), np.uint8)
        for k, m in enumerate(masks):
            mk = m.cpu().numpy().astype(bool)
            seg[mk] = colors[k % len(colors)]
            big = np.kron(mk, np.ones((size // h, size // w), dtype=bool))
            _save_png(big, out / f"{stem}_mask{k}.png")
        _save_png(np.kron(seg, np.ones((size // h, size // w, 1), np.uint8)), out / f"{stem}_maskcut.png")
        _save_png(np.kron(pca.cpu().numpy(), np.ones((size // h, size // w, 1))), out / f"{stem}_pca.png")
        rows.append([stem, len(masks), float(attn_mask.float().mean())])
        shown.append(stem)
    report.heading("Images")
    report.table(rows, headers=["image", "MaskCut masks", "attention mask share"])
    for stem in shown:
        report.heading(stem, level=3)
        for kind in ("attn", "attn_mask", "maskcut", "pca"):
            report.figure(out / f"{stem}_{kind}.png", f"{stem}: {kind.replace('_', ' ')}")
    report.save(out / "index.html")
    print(f"wrote masks, overlays and {out / 'index.html'} for {len(files)} images")
    return 0
