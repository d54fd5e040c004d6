"""Weights registry: the official releases behind ``create_model(name, pretrained=True)`` (timm's ``default_cfgs``).

Each entry is a :class:`PretrainedCfg` named ``"architecture.tag"``: the registered model name it loads into and a
tag that tells releases of one architecture apart. The first entry listed for an architecture is its default, used
by ``create_model(architecture, pretrained=True)``. An entry may precede its model: ``ratelab weights list`` shows
it as "model not implemented yet" and ``create_model`` of the name fails as for any unknown model.

ratelab never downloads. A release is looked for at ``$RATELAB_WEIGHTS/<file>`` (default ``~/.cache/ratelab/weights``),
where ``file`` is ``<hub repo>/<file name in it>``: the layout ``huggingface-cli download REPO FILE --local-dir
$RATELAB_WEIGHTS/REPO`` produces. A missing file is :class:`~ratelab.core.errors.WeightsNotFound` naming the path and
the URL; when the entry has a sha256 a mismatch is an error naming the file and both hashes.

Facts come from the official READMEs and code (``/work/shared/research`` notes, cross-read in the repositories): no
sha256 of any release is published there, so every ``sha256`` is ``None`` (pin one with :func:`register_pretrained`
or ``ratelab weights info NAME`` on a file you trust); fields the notes could not confirm are listed in
``unverified`` and explained in ``notes``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ratelab.core.errors import CheckpointError, UnknownNameError, WeightsNotFound, did_you_mean

ENV_VAR = "RATELAB_WEIGHTS"
DEFAULT_DIR = "~/.cache/ratelab/weights"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PM1_MEAN = (0.5, 0.5, 0.5)  # x -> 2x - 1: images in [-1, 1] (VAR's tokenizer)
PM1_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True, kw_only=True)
class PretrainedCfg:
    """One official weight release.

    Attributes:
        name: ``"architecture.tag"``; ``architecture`` is the registered model name the weights load into.
        url: where a user downloads the file (ratelab does not); ``None`` when nothing was released.
        file: path under the weights directory where ratelab looks for it; ``None`` when nothing was released.
        sha256: hex digest of the file when it is known (never guessed); checked before loading.
        hf_hub: Hugging Face repository that hosts the file, when it is one.
        hf_file: path of the file inside ``hf_hub``.
        license: license of the release as stated by its authors (``None``: none stated).
        origin: page that lists the release (README).
        paper: arXiv id.
        input_size: ``(C, H, W)`` the release was evaluated at.
        mean: per-channel normalization mean of the release's preprocessing.
        std: per-channel normalization std.
        interpolation: resize filter of the evaluation transform.
        crop_pct: center-crop fraction of the evaluation transform (resize to ``H / crop_pct``, crop ``H``).
        num_classes: classifier width of the file (``None``: no classifier).
        classifier: key prefix of the classifier in ratelab's layout; dropped and re-initialized when
            ``create_model(..., pretrained=True, num_classes=K)`` asks for another width.
        converter: ``"module:function"`` of the family's ``checkpoint_filter_fn``, which maps the file's layout.
        model_kwargs: entry-point arguments the released architecture needs (e.g. its ``img_size``); the caller's
            own keyword arguments override them.
        use_ema: load the file's EMA weights (``model_ema``) instead of ``model``.
        reported: the result the authors report for this file.
        notes: provenance remarks, caveats.
        unverified: fields or facts the research notes flag as unconfirmed (``notes`` says why).
    """

    name: str
    url: str | None
    file: str | None
    sha256: str | None = None
    hf_hub: str | None = None
    hf_file: str | None = None
    license: str | None = None
    origin: str | None = None
    paper: str | None = None
    input_size: tuple[int, int, int] | None = (3, 224, 224)
    mean: tuple[float, ...] | None = IMAGENET_MEAN
    std: tuple[float, ...] | None = IMAGENET_STD
    interpolation: str | None = "bicubic"
    crop_pct: float | None = 0.875
    num_classes: int | None = 1000
    classifier: str | None = "head"
    converter: str | None = None
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    use_ema: bool = False
    reported: str | None = None
    notes: str = ""
    unverified: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.name.count(".") != 1 or not all(self.name.split(".")):
            raise ValueError(f"pretrained name must be 'architecture.tag', got {self.name!r}")
        hexdigits = set("0123456789abcdef")
        if self.sha256 is not None and (len(self.sha256) != 64 or not set(self.sha256) <= hexdigits):
            raise ValueError(f"{self.name}: sha256 must be 64 lowercase hex digits, got {self.sha256!r}")
        if (self.url is None) != (self.file is None):
            raise ValueError(f"{self.name}: give both url and file (a release) or neither (nothing released)")

    @property
    def architecture(self) -> str:
        return self.name.split(".")[0]

    @property
    def tag(self) -> str:
        return self.name.split(".")[1]

    @property
    def released(self) -> bool:
        return self.file is not None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict in timm's ``pretrained_cfg`` convention (``architecture``, ``tag``, ``input_size``, ...)."""
        d = asdict(self)
        d["model_kwargs"] = dict(self.model_kwargs)
        return {"architecture": self.architecture, "tag": self.tag, **d}


_PRETRAINED: dict[str, PretrainedCfg] = {}


def register_pretrained(cfg: PretrainedCfg) -> PretrainedCfg:
    """Add a release to the table (e.g. a private one, or a public one with a sha256 you pinned).

    Raises:
        ValueError: the name is already taken.
    """
    if cfg.name in _PRETRAINED:
        raise ValueError(f"pretrained weights {cfg.name!r} are already registered")
    _PRETRAINED[cfg.name] = cfg
    return cfg


def list_pretrained(pattern: str = "*") -> list[str]:
    """Release names (``"architecture.tag"``) matching ``pattern``, in table order (an architecture's default first)."""
    return [n for n in _PRETRAINED if fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(n.split(".")[0], pattern)]


def has_pretrained(architecture: str) -> bool:
    """Whether the table has an entry for ``architecture`` (released or not)."""
    return any(c.architecture == architecture for c in _PRETRAINED.values())


def get_pretrained_cfg(name: str) -> PretrainedCfg:
    """The entry ``"architecture.tag"``, or the default (first listed) entry of a bare ``architecture``.

    Raises:
        UnknownNameError: no entry of that name; the message lists the closest ones.
    """
    if name in _PRETRAINED:
        return _PRETRAINED[name]
    if "." not in name:
        for cfg in _PRETRAINED.values():
            if cfg.architecture == name:
                return cfg
    raise UnknownNameError(
        f"no pretrained weights named {name!r}{did_you_mean(name, list(_PRETRAINED))}; see `ratelab weights list`"
    )


def weights_dir() -> Path:
    """``$RATELAB_WEIGHTS``, default ``~/.cache/ratelab/weights`` (read at every call, so tests can set it)."""
    return Path(os.environ.get(ENV_VAR) or DEFAULT_DIR).expanduser()


def weights_path(cfg: PretrainedCfg) -> Path | None:
    """Where ratelab looks for the release's file (``None`` when nothing was released)."""
    return weights_dir() / cfg.file if cfg.file is not None else None


def download_hint(cfg: PretrainedCfg) -> str:
    """One sentence telling a user where to get the file and where to put it."""
    if not cfg.released:
        return f"no official weights were released for {cfg.name}" + (f" ({cfg.notes})" if cfg.notes else "")
    path = weights_path(cfg)
    hint = f"download {cfg.url} and save it as {path}"
    if cfg.hf_hub and cfg.hf_file:
        hint += (f" (or: huggingface-cli download {cfg.hf_hub} {cfg.hf_file} --local-dir "
                 f"{weights_dir() / cfg.hf_hub})")
    return hint


_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks; cached per (path, size, mtime) within the process."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _HASH_CACHE[key] = h.hexdigest()
    return _HASH_CACHE[key]


def find_weights(cfg: PretrainedCfg) -> Path:
    """The release's local file, its sha256 checked when the entry has one.

    Raises:
        WeightsNotFound: nothing was released, or the file is not at its expected path (the message names the path
            and the URL to get it from).
        CheckpointError: the file's sha256 differs from the entry's (the message names the file and both hashes).
    """
    path = weights_path(cfg)
    if path is None:
        raise WeightsNotFound(f"{download_hint(cfg)}; load your own file with checkpoint_path=...")
    if not path.is_file():
        raise WeightsNotFound(f"weights for {cfg.name} not found: {path} does not exist; {download_hint(cfg)} "
                              f"(ratelab never downloads; set {ENV_VAR} to use another directory)")
    if cfg.sha256 is not None:
        actual = file_sha256(path)
        if actual != cfg.sha256:
            raise CheckpointError(f"{path}: sha256 mismatch for {cfg.name}: expected {cfg.sha256}, got {actual} "
                                  f"(a truncated or different file; download it again from {cfg.url})")
    return path


def weights_status(cfg: PretrainedCfg) -> str:
    """``"not released"``, ``"missing"``, ``"present"`` (no sha256 to check), ``"present, sha256 ok"`` or
    ``"sha256 MISMATCH"``."""
    path = weights_path(cfg)
    if path is None:
        return "not released"
    if not path.is_file():
        return "missing"
    if cfg.sha256 is None:
        return "present"
    return "present, sha256 ok" if file_sha256(path) == cfg.sha256 else "sha256 MISMATCH"


# ---- the table ----------------------------------------------------------------------------------------------------
# Sources: Ma-Lab-Berkeley/CRATE README (checkpoint tables), main.py (eval transform); UCSC-VLAA/CRATE-alpha README,
# torch_inference/eval_in1k_cls.py; wangf3014/Adventurer README, main.py/datasets.py; FoundationVision/VAR README,
# utils/data.py; OliverRensu/MVAR README, gen_img_uncond.py; facebookresearch/dpcap README. Research notes:
# /work/shared/research/crate_family.md, linear_vision_models.md, trust.md.

_CRATE = dict(
    license="MIT", origin="https://github.com/Ma-Lab-Berkeley/CRATE", paper="2306.01129",
    interpolation="bilinear", converter="ratelab.models.crate.convert:checkpoint_filter_fn",
    unverified=("license",),
)  # fmt: skip
_CRATE_NOTE = "eval: resize 256 (torchvision default bilinear), center crop 224, ImageNet mean/std (main.py). "
_CRATE_LICENSE = "MIT is the repository's LICENSE; no separate license is stated for the weights. "
_NOT_RELEASED = "the README's checkpoint table lists TODO (Ma-Lab-Berkeley/CRATE issues #1, #8 ask for it). "

register_pretrained(PretrainedCfg(
    name="crate_small_patch16_224.in1k",
    url="https://drive.google.com/file/d/1hYgDJl4EKHYfKprwhEjmWmWHuxnK6_h8/view?usp=share_link",
    file="Ma-Lab-Berkeley/CRATE/crate_small_patch16_224.in1k.pth",
    reported="ImageNet-1K top-1 69.2 (paper table)",
    notes=_CRATE_NOTE + _CRATE_LICENSE + "Google Drive file: save it under the name given here (its own name is not "
    "published). The link is reported dead since 2025 (issue #30); issue #28: the released checkpoint is not the "
    "one behind the paper's plots. The Colab's crate-demo.pth is another model (B/8, IN-21K, 6 heads, an extra "
    "Linear after the head norm) that this entry does not cover.",
    **_CRATE,
))  # fmt: skip
for _size, _top1 in (("tiny", "66.7"), ("base", "70.8"), ("large", "71.3")):
    register_pretrained(PretrainedCfg(
        name=f"crate_{_size}_patch16_224.in1k", url=None, file=None,
        reported=f"ImageNet-1K top-1 {_top1} (paper table; no file)",
        notes=_NOT_RELEASED + _CRATE_LICENSE,
        **_CRATE,
    ))  # fmt: skip

register_pretrained(PretrainedCfg(
    name="crate_mae_base_patch16_224.in1k",
    url="https://drive.google.com/file/d/11i5BMwymqOsunq44WD3omN5mS6ZREQPO/view?usp=sharing",
    file="Ma-Lab-Berkeley/CRATE/crate_mae_base_patch16_224.in1k.pth",
    license="MIT", origin="https://github.com/Ma-Lab-Berkeley/CRATE", paper="2404.02446",
    num_classes=None, classifier=None, crop_pct=None,
    converter="ratelab.models.crate_mae.convert:checkpoint_filter_fn",
    notes="Masked autoencoder (encoder + decoder, no classifier); the only CRATE-MAE release (Small is TODO in the "
    "README). Google Drive file: save it under the name given here. Preprocessing: the README trains with FAIR's MAE "
    "code, whose defaults are ImageNet mean/std and bicubic resizing; not stated for this model itself. "
    + _CRATE_LICENSE,
    unverified=("license", "mean", "std", "interpolation"),
))  # fmt: skip

_ALPHA = dict(
    hf_hub="UCSC-VLAA/CRATE-alpha", license=None, origin="https://github.com/UCSC-VLAA/CRATE-alpha",
    paper="2405.20299", interpolation="bilinear", converter="ratelab.models.crate_alpha.convert:checkpoint_filter_fn",
)  # fmt: skip
_ALPHA_NOTE = (
    "PyTorch port of the JAX weights (README), a plain state dict in the layout of torch_inference/model/"
    "crate_alpha.py. eval: resize 256 (bilinear), center crop 224, ImageNet mean/std (torch_inference/"
    "eval_in1k_cls.py). No license is stated (the repository has no LICENSE file). The same HF repository holds the "
    "IN-21K pre-trained torch weights at /32, /16, /14 and /8 (torch/in21k_Pretrain, issue #2; file names not "
    "recorded here), the JAX checkpoints (jax/) and the CRATE-alpha-CLIPA L/14 and H/14 image-text models (not "
    "covered)."
)
register_pretrained(PretrainedCfg(
    name="crate_alpha_base_patch16_224.in21k_ft_in1k",
    url="https://huggingface.co/UCSC-VLAA/CRATE-alpha/blob/main/torch/crate_alpha_B16.pth",
    file="UCSC-VLAA/CRATE-alpha/torch/crate_alpha_B16.pth", hf_file="torch/crate_alpha_B16.pth",
    reported="ImageNet-1K top-1 81.2 (README, PyTorch = JAX)", notes=_ALPHA_NOTE, **_ALPHA,
))  # fmt: skip
register_pretrained(PretrainedCfg(
    name="crate_alpha_large_patch14_224.in21k_ft_in1k",
    url="https://huggingface.co/UCSC-VLAA/CRATE-alpha/blob/main/torch/crate_alpha_L14.pth",
    file="UCSC-VLAA/CRATE-alpha/torch/crate_alpha_L14.pth", hf_file="torch/crate_alpha_L14.pth",
    reported="ImageNet-1K top-1 83.9 (README, PyTorch = JAX)", notes=_ALPHA_NOTE, **_ALPHA,
))  # fmt: skip

_ADV = dict(
    hf_hub="Wangf3014/Adventurer", license=None, origin="https://github.com/wangf3014/Adventurer", paper="2410.07599",
    converter="ratelab.models.adventurer.convert:checkpoint_filter_fn", unverified=("model_kwargs.flip",),
)  # fmt: skip
_ADV_NOTE = (
    "Files hold 'model' and 'model_ema'; 'model' is loaded (what the DeiT-style script evaluates). eval: resize "
    "S/0.875 bicubic, center crop S, ImageNet mean/std (main.py, datasets.py). flip='legacy_2_3' is the schedule "
    "the released code computes (n // 2 == 1); which schedule trained the weights is unverified (issue #6): check "
    "ImageNet-val accuracy against 'reported'. No license is stated (the repository has no LICENSE file)."
)
for _arch, _file, _size, _top1 in (
    ("adventurer_tiny_patch16_224", "adventurer_tiny_patch16_224.pth", 224, "78.2"),
    ("adventurer_small_patch16_224", "adventurer_small_patch16_224.pth", 224, "81.8"),
    ("adventurer_base_patch16_224", "adventurer_base_patch16_224.pth", 224, "82.6"),
    ("adventurer_large_patch16_224", "adventurer_large_patch16_224.pth", 224, "83.4"),
    ("adventurer_base_patch8_224", "adventurer_base_patch8_224.pth", 224, "83.9"),
    ("adventurer_base_patch16_224", "adventurer_base_patch16_384.pth", 384, "84.2"),
    ("adventurer_base_patch16_224", "adventurer_base_patch16_448.pth", 448, "84.3"),
    ("adventurer_base_patch8_224", "adventurer_base_patch8_448.pth", 448, "84.8"),
):
    register_pretrained(PretrainedCfg(
        name=f"{_arch}.in1k" if _size == 224 else f"{_arch}.in1k_{_size}",
        url=f"https://huggingface.co/Wangf3014/Adventurer/resolve/main/{_file}",
        file=f"Wangf3014/Adventurer/{_file}", hf_file=_file, input_size=(3, _size, _size),
        model_kwargs={"flip": "legacy_2_3", **({"img_size": _size} if _size != 224 else {})},
        reported=f"ImageNet-1K top-1 {_top1} at {_size}px (README)",
        notes=_ADV_NOTE + ("" if _size == 224 else f" Fine-tuned at {_size}px: built with img_size={_size}."),
        **_ADV,
    ))  # fmt: skip

_VAR = dict(
    hf_hub="FoundationVision/var", license="MIT", origin="https://github.com/FoundationVision/VAR",
    paper="2404.02905", input_size=(3, 256, 256), mean=PM1_MEAN, std=PM1_STD, interpolation="lanczos",
    crop_pct=1 / 1.125, converter="ratelab.models.var.convert:checkpoint_filter_fn", unverified=("license",),
)  # fmt: skip
_VAR_NOTE = (
    "Images in [-1, 1] (x -> 2x - 1), resize to 1.125 x 256 with Lanczos, center crop 256 (utils/data.py). MIT is the "
    "repository's LICENSE; no separate license is stated for the weights."
)
register_pretrained(PretrainedCfg(
    name="var_vae_ch160v4096z32.official",
    url="https://huggingface.co/FoundationVision/var/resolve/main/vae_ch160v4096z32.pth",
    file="FoundationVision/var/vae_ch160v4096z32.pth", hf_file="vae_ch160v4096z32.pth",
    num_classes=None, classifier=None,
    notes="The multi-scale residual VQ-VAE (tokenizer) shared by VAR and M-VAR; 108.95M parameters. " + _VAR_NOTE,
    **_VAR,
))  # fmt: skip
for _depth, _fid in ((16, "3.55"), (20, "2.95"), (24, "2.33"), (30, "1.97")):
    register_pretrained(PretrainedCfg(
        name=f"var_d{_depth}.in1k_256",
        url=f"https://huggingface.co/FoundationVision/var/resolve/main/var_d{_depth}.pth",
        file=f"FoundationVision/var/var_d{_depth}.pth", hf_file=f"var_d{_depth}.pth",
        reported=f"ImageNet 256x256 FID {_fid} (README, these weights)",
        notes="Class-conditional (1000 classes + the null class); needs var_vae_ch160v4096z32. " + _VAR_NOTE + (
            " The README's VAR-d30-re row (FID 1.80) links this same file; the '-re' suffix is not explained."
            if _depth == 30 else ""),
        **_VAR,
    ))  # fmt: skip

_MVAR = dict(
    hf_hub="OliverRen/M-VAR", license=None, origin="https://github.com/OliverRensu/MVAR", paper="2411.10433",
    input_size=(3, 256, 256), mean=PM1_MEAN, std=PM1_STD, interpolation="lanczos", crop_pct=1 / 1.125,
    converter="ratelab.models.var.convert:checkpoint_filter_fn",
)  # fmt: skip
_MVAR_NOTE = (
    "Class-conditional; uses VAR's tokenizer (var_vae_ch160v4096z32) and VAR's data pipeline (the README: same "
    "settings as VAR). FID protocol: cfg=1.5, top_p=0.96, top_k=900, more_smooth=False (README). No license is "
    "stated (the repository has no LICENSE file)."
)
for _depth, _fid in ((16, "3.07"), (20, "2.41"), (24, "1.93"), (32, "1.78")):
    _known = _depth == 32  # gen_img_uncond.py downloads d32.pth; the other file names follow it but are unconfirmed
    register_pretrained(PretrainedCfg(
        name=f"mvar_d{_depth}.in1k_256",
        url=f"https://huggingface.co/OliverRen/M-VAR/resolve/main/d{_depth}.pth" if _known
        else "https://huggingface.co/OliverRen/M-VAR",
        file=f"OliverRen/M-VAR/d{_depth}.pth", hf_file=f"d{_depth}.pth",
        model_kwargs={"attn_l2_norm": False} if _depth in (16, 20) else {},
        reported=f"ImageNet 256x256 FID {_fid} (paper table)",
        notes=_MVAR_NOTE + (
            " Whether d32.pth holds a depth-32 model (3.66B parameters by the code) or depth 30 (3.0B as the paper "
            "lists) is unresolved: check the tensor shapes." if _known else
            f" The file name d{_depth}.pth is inferred from d32.pth; look it up on the HF repository page.")
        + (" attn_l2_norm=False, as the README says for d16/d20." if _depth in (16, 20) else ""),
        unverified=("model depth",) if _known else ("file", "url"),
        **_MVAR,
    ))  # fmt: skip

register_pretrained(PretrainedCfg(
    name="dpcap_base_patch16_224.metaclip_eps7",
    url="https://dl.fbaipublicfiles.com/dpcap/base-eps7.pth",
    file="facebookresearch/dpcap/base-eps7.pth",
    license="CC-BY-NC-4.0", origin="https://github.com/facebookresearch/dpcap", paper="2403.02506",
    crop_pct=None, num_classes=None, classifier=None,
    converter="ratelab.models.dpcap.convert:checkpoint_filter_fn",
    reported="README: 'full linear probe 31.9%, 10-shot 24.8%, 5-shot 16.3%, 1-shot 10.7%' on ImageNet (the 31.9% "
    "is inconsistent with the paper's 65.8% and probably mislabelled)",
    notes="DP captioner, epsilon = 7, sigma = 0.527, 5,000 steps at batch 1.3M on the Meta-CLIP data (~2B pairs): not "
    "the paper's epsilon = 8 DEDUP-LAION-233M model. The README builds mae_vit_base_patch16_autoregressive_nobias("
    "text_max_length=77) with the bert-base-uncased tokenizer and loads checkpoint['model'] with strict=False. "
    "Input 224x224, ImageNet mean/std; bicubic is the training crop's filter. CC-BY-NC-4.0 is the README's license "
    "for the project; the weights' license is not stated separately.",
    unverified=("license", "interpolation"),
))  # fmt: skip

__all__ = [
    "ENV_VAR",
    "PretrainedCfg",
    "download_hint",
    "file_sha256",
    "find_weights",
    "get_pretrained_cfg",
    "has_pretrained",
    "list_pretrained",
    "register_pretrained",
    "weights_dir",
    "weights_path",
    "weights_status",
]
