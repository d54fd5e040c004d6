"""Metrics of generated images: the standard ones through torch-fidelity, and an offline pair that needs no download.

Standard (:func:`fidelity_metrics`): FID (Heusel et al. 2017), Inception Score (Salimans et al. 2016) and
precision / recall (Kynkaanniemi et al. 2019, k = 3 nearest neighbours) on the 2048-d pool features of the
TF-ported Inception-v3 that torch-fidelity (``pip install ratelab[gen]``) implements. The Inception weights must be on
disk (``weights-inception-2015-12-05-6726825d.pth``, by default under the weights directory
``$RATELAB_WEIGHTS/toshas/torch-fidelity/``); ratelab never lets torch-fidelity download them (nor datasets), and a
missing file is an error naming it and where to get it. Published VAR / M-VAR numbers use 50k samples and
OpenAI's guided-diffusion TensorFlow evaluator with its ImageNet reference batch; torch-fidelity's FID is close to
but not the same program, so say which one a number comes from.

Offline (:func:`offline_generation_metrics`): a Fréchet distance between the penultimate-layer features of a
classifier trained by :func:`fit_feature_classifier` on the SAME real data, for real vs generated images, and the
accuracy with which that classifier recognizes the class a generated image was conditioned on. Every key starts
with ``offline_``: these numbers depend on the classifier, so they compare models evaluated with one classifier
and are never comparable with a published FID.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from ratelab.core.errors import ConfigError, WeightsNotFound

__all__ = [
    "INCEPTION_FILE",
    "INCEPTION_URL",
    "OFFLINE_NOTE",
    "FeatureClassifier",
    "SmallConvNet",
    "class_accuracy",
    "feature_statistics",
    "fidelity_metrics",
    "fit_feature_classifier",
    "frechet_distance",
    "inception_weights_path",
    "offline_generation_metrics",
]

INCEPTION_FILE = "toshas/torch-fidelity/weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
OFFLINE_NOTE = ("offline: Fréchet distance on features of a classifier trained on the same data, and that "
                "classifier's accuracy on generated images; not comparable with published FID")


# ---- Fréchet distance ---------------------------------------------------------------------------------------------


def feature_statistics(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, d) features -> mean (d,) and unbiased covariance (d, d), in float64."""
    x = features.detach().double().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features,
                                                                                                     np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, d), got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, *,
                     eps: float = 1e-6) -> float:
    """Fréchet distance of two Gaussians: ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2})``.

    The matrix square root is scipy's ``sqrtm``; when the product is singular it is retried with ``eps`` added
    to both diagonals (pytorch-fid's rule), and a negligible imaginary part from round-off is dropped.
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shapes do not match: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm has a large imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


# ---- the offline classifier ---------------------------------------------------------------------------------------


class SmallConvNet(nn.Module):
    """Default feature network of the offline metrics: four 3x3 conv-BN-ReLU stages (two of them stride 2), global
    average pooling to ``width`` features, a linear classifier. Follows the ``forward_features`` /
    ``forward_head(pre_logits=True)`` convention."""

    def __init__(self, in_chans: int, num_classes: int, width: int = 64) -> None:
        super().__init__()
        w = width

        def stage(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(*stage(in_chans, w // 2, 1), *stage(w // 2, w, 2), *stage(w, w, 1),
                                      *stage(w, w, 2))
        self.head = nn.Linear(w, num_classes)
        self.num_classes, self.num_features = num_classes, w

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(2, 3))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class FeatureClassifier(nn.Module):
    """A classifier with its input normalization: images in [0, 1] in, logits or pooled features out."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if not (hasattr(net, "forward_features") and hasattr(net, "forward_head")):
            raise ConfigError(f"{type(net).__name__} has no forward_features/forward_head: the offline metrics need "
                              "the timm convention (pooled features from forward_head(..., pre_logits=True))")
        self.net = net
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> (B, d) pooled penultimate features."""
        f = self.net.forward_head(self.net.forward_features(self._norm(x)), pre_logits=True)
        return f.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self._norm(x))


def _batches(n: int, batch_size: int) -> list[slice]:
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def fit_feature_classifier(images: torch.Tensor, labels: torch.Tensor, *, net: nn.Module | None = None,
                           num_classes: int | None = None, epochs: int = 10, lr: float = 2e-3,
                           batch_size: int = 128, weight_decay: float = 1e-4, seed: int = 0,
                           device: str | torch.device = "cpu") -> FeatureClassifier:
    """Train the offline metrics' classifier on real images (in [0, 1]) and their labels.

    Args:
        images: (N, C, H, W) float in [0, 1].
        labels: (N,) int64.
        net: the network (``forward_features`` / ``forward_head`` convention; e.g. ``ratelab.create_model(...)``);
            default :class:`SmallConvNet`.
        num_classes: default ``labels.max() + 1``.
        epochs, lr, batch_size, weight_decay: AdamW with a cosine schedule, cross-entropy.
        seed: initialization and order of the data.

    Returns:
        The trained :class:`FeatureClassifier` in eval mode, normalizing inputs with the per-channel mean/std of
        ``images``.
    """
    if images.ndim != 4 or labels.shape != (images.shape[0],):
        raise ValueError(f"images (N, C, H, W) and labels (N,) expected, got {tuple(images.shape)} and "
                         f"{tuple(labels.shape)}")
    g = torch.Generator().manual_seed(seed)
    k = int(num_classes if num_classes is not None else int(labels.max()) + 1)
    if net is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = SmallConvNet(images.shape[1], k)
    mean = images.float().mean(dim=(0, 2, 3)).tolist()
    std = images.float().std(dim=(0, 2, 3)).clamp_min(1e-6).tolist()
    model = FeatureClassifier(net, mean, std).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    n = images.shape[0]
    steps = max(1, epochs * len(_batches(n, batch_size)))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for s in _batches(n, batch_size):
            i = perm[s]
            x, y = images[i].to(device), labels[i].to(device)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def _features(classifier: FeatureClassifier, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    dev = classifier.mean.device
    return torch.cat([classifier.features(images[s].to(dev)).cpu() for s in _batches(images.shape[0], batch_size)])


@torch.no_grad()
def class_accuracy(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                   batch_size: int = 256) -> float:
    """Share of ``images`` (in [0, 1]) that ``classifier`` assigns to ``labels``."""
    dev = next(iter(classifier.buffers()), torch.empty(0)).device
    correct = 0
    for s in _batches(images.shape[0], batch_size):
        correct += int((classifier(images[s].to(dev)).argmax(-1).cpu() == labels[s].cpu()).sum())
    return correct / max(1, images.shape[0])


def offline_generation_metrics(classifier: FeatureClassifier, real: torch.Tensor, fake: torch.Tensor,
                               fake_labels: torch.Tensor | None = None, *, real_labels: torch.Tensor | None = None,
                               batch_size: int = 256) -> dict[str, Any]:
    """Offline metrics of generated images (all in [0, 1], (N, C, H, W)).

    Returns:
        ``offline_fd``: Fréchet distance between the classifier's pooled features of ``real`` and ``fake``;
        ``offline_class_acc``: the classifier's accuracy on ``fake`` against the conditioning ``fake_labels``
        (when given); ``offline_real_acc``: its accuracy on ``real`` (when ``real_labels`` are given: the
        ceiling to read ``offline_class_acc`` against); ``note``: :data:`OFFLINE_NOTE`.
    """
    fr, ff = _features(classifier, real, batch_size), _features(classifier, fake, batch_size)
    out: dict[str, Any] = {"offline_fd": frechet_distance(*feature_statistics(fr), *feature_statistics(ff))}
    if fake_labels is not None:
        out["offline_class_acc"] = class_accuracy(classifier, fake, fake_labels, batch_size=batch_size)
    if real_labels is not None:
        out["offline_real_acc"] = class_accuracy(classifier, real, real_labels, batch_size=batch_size)
    out["note"] = OFFLINE_NOTE
    return out


# ---- torch-fidelity -------------------------------------------------------------------------------------------------


def inception_weights_path(path: str | os.PathLike | None = None) -> Path:
    """The Inception-v3 weights file torch-fidelity needs: ``path``, else ``$RATELAB_WEIGHTS/`` +
    :data:`INCEPTION_FILE`.

    Raises:
        WeightsNotFound: the file is not there (the message names it and the URL to fetch it from).
    """
    if path is None:
        from ratelab.models._pretrained import weights_dir

        p = Path(weights_dir()) / INCEPTION_FILE
    else:
        p = Path(path)
    if not p.is_file():
        raise WeightsNotFound(f"Inception weights file {p} not found: FID/IS/precision/recall need it locally "
                              f"(ratelab downloads nothing); fetch {INCEPTION_URL} to that path or pass "
                              "inception_weights=...")
    return p


class _Uint8Images(Dataset):
    # torch-fidelity's input protocol: a Dataset of (3, H, W) uint8 tensors.
    def __init__(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be (N, 1 or 3, H, W), got {tuple(images.shape)}")
        x = images if images.dtype == torch.uint8 else (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
        self.x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i].contiguous()


def _as_input(x: Any, what: str) -> Any:
    if isinstance(x, torch.Tensor):
        return _Uint8Images(x)
    if isinstance(x, (str, os.PathLike)):
        if not Path(x).is_dir():
            raise ConfigError(f"{what}: {x} is not a directory of images")
        return str(x)
    if isinstance(x, Dataset):
        return x
    raise ConfigError(f"{what}: expected an image tensor, a directory or a Dataset, got {type(x).__name__}")


def fidelity_metrics(generated: Any, reference: Any | None = None, *, inception_weights: str | os.PathLike |
                     None = None, fid: bool = True, isc: bool = True, prc: bool = True, batch_size: int = 64,
                     isc_splits: int = 10, device: str | torch.device | None = None,
                     verbose: bool = False) -> dict[str, float]:
    """FID, Inception Score and precision/recall through torch-fidelity, from a local Inception file.

    Args:
        generated: images as a tensor (N, C, H, W) (uint8, or float in [0, 1]), a directory of PNG/JPEG files, or
            a Dataset of (3, H, W) uint8 tensors.
        reference: the real images, same forms (required for FID and precision/recall).
        inception_weights: the weights file (default: :func:`inception_weights_path`).
        fid, isc, prc: which metrics.
        isc_splits: splits of the Inception Score (10 in the literature; at most N).
        device: ``"cuda"`` uses the GPU; default CUDA when available.

    Returns:
        ``fid``, ``isc_mean``, ``isc_std``, ``precision``, ``recall`` (those asked for).

    Raises:
        WeightsNotFound: no Inception file (named). ConfigError: torch-fidelity not installed, or bad inputs.
    """
    weights = inception_weights_path(inception_weights)
    try:
        import torch_fidelity
    except ImportError as e:
        raise ConfigError("fidelity_metrics needs torch-fidelity: pip install 'ratelab[gen]'") from e
    if (fid or prc) and reference is None:
        raise ConfigError("reference: FID and precision/recall compare with real images; pass reference=")
    cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    kw: dict[str, Any] = dict(
        input1=_as_input(generated, "generated"), cuda=cuda, batch_size=batch_size, isc=isc, fid=fid, prc=prc,
        kid=False, feature_extractor="inception-v3-compat", feature_extractor_weights_path=str(weights),
        feature_layer_prc="2048", isc_splits=isc_splits, cache=False, datasets_download=False, verbose=verbose,
        samples_shuffle=False,
    )
    if reference is not None and (fid or prc):
        kw["input2"] = _as_input(reference, "reference")
    # In-memory tensors need no loader workers (torch-fidelity's save_cpu_ram also turns them off); folders of
    # image files keep them for decoding.
    kw["save_cpu_ram"] = all(isinstance(x, _Uint8Images) for x in (kw["input1"], kw.get("input2")) if x is not None)
    res = torch_fidelity.calculate_metrics(**kw)
    names = {"frechet_inception_distance": "fid", "inception_score_mean": "isc_mean",
             "inception_score_std": "isc_std", "precision": "precision", "recall": "recall"}
    return {names[k]: float(v) for k, v in res.items() if k in names}
