"""Typed training configuration and its command-line mapping.

:class:`TrainConfig` is a flat dataclass; each field's ``metadata["help"]`` is its documentation and the ``--help``
text of the matching ``ratelab train --kebab-case`` option. :func:`add_config_args` generates those options and
:func:`config_from_args` turns a parsed namespace (plus an optional ``--config`` JSON/YAML file) back into a
validated config. Values are type-checked against the field types without ``eval``/``exec``; errors name the option
or key.
"""

from __future__ import annotations

import argparse
import json
import math
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = ["TrainConfig", "add_config_args", "config_from_args", "load_config_file", "parse_value"]


def _f(default: Any, help: str, *, choices: tuple[str, ...] | None = None) -> Any:
    meta: dict[str, Any] = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Everything one training run needs. Saved as ``out_dir/config.json`` and inside every checkpoint."""

    # ---- what to train -----------------------------------------------------------------------------------------
    task: str = _f("classification", "Task: what the model learns and how it is evaluated (see ratelab.train.TASKS).")
    model: str = _f("crate_nano_patch4_16", "Registered model name (see `ratelab models`).")
    model_kwargs: dict = _f({}, "Extra keyword arguments for create_model, as JSON or key=value pairs.")
    num_classes: int | None = _f(None, "Classifier width; default: the dataset's number of classes.")
    # ---- data --------------------------------------------------------------------------------------------------
    dataset: str = _f("digits", "Dataset name for ratelab.data.build_dataset.")
    data_root: str | None = _f(None, "Directory holding the dataset files (dataset-specific default when unset).")
    img_size: int | None = _f(None, "Input resolution; default: the dataset's native size.")
    augment: bool | None = _f(None, "Training-set augmentation on/off; default: the dataset's own default.")
    dataset_kwargs: dict = _f({}, "Extra keyword arguments for build_dataset, as JSON or key=value pairs.")
    num_workers: int = _f(0, "DataLoader worker processes. 0 keeps resume bitwise exact (augmentation RNG in-process).")
    # ---- length and batch --------------------------------------------------------------------------------------
    epochs: int = _f(10, "Number of passes over the training set.")
    max_steps: int | None = _f(None, "Stop after this many optimizer steps (overrides epochs for the run length).")
    batch_size: int = _f(64, "GLOBAL batch size (split evenly across ranks).")
    eval_batch_size: int | None = _f(None, "Global evaluation batch size; default: batch_size.")
    # ---- optimization ------------------------------------------------------------------------------------------
    optimizer: str = _f("adamw", "Optimizer.", choices=("adamw", "lion"))
    lr: float = _f(1e-3, "Peak learning rate (reached after warmup).")
    weight_decay: float = _f(0.05, "Decoupled weight decay (not applied to biases, norms, embeddings/tokens).")
    betas: tuple[float, float] | None = _f(None, "Optimizer betas 'b1,b2'; default (0.9,0.999) AdamW, (0.9,0.99) Lion.")
    warmup_epochs: float = _f(1.0, "Linear warmup length in epochs.")
    warmup_steps: int | None = _f(None, "Linear warmup length in steps (overrides warmup_epochs).")
    min_lr: float = _f(0.0, "Learning rate at the end of the cosine decay.")
    label_smoothing: float = _f(0.0, "Label smoothing of the cross-entropy loss (0 = off).")
    grad_clip: float = _f(0.0, "Clip gradients to this global L2 norm (0 = off).")
    ema_decay: float = _f(0.0, "Keep an exponential moving average of the weights with this decay (0 = off).")
    amp: str = _f(
        "auto",
        "Mixed precision: auto = bf16 autocast on CUDA and none on CPU.",
        choices=("auto", "bf16", "fp16", "none"),
    )
    # ---- run management ----------------------------------------------------------------------------------------
    seed: int = _f(0, "Seed for model init, data order and augmentation.")
    out_dir: str = _f("runs/train", "Run directory: config.json, metrics.jsonl, checkpoints/, model.safetensors.")
    ckpt_every: int = _f(500, "Write checkpoints/last.pt every this many optimizer steps (0 = only at the end).")
    eval_every: int = _f(1, "Evaluate every this many epochs (the end of the run is always evaluated; 0 = only then).")
    log_every: int = _f(50, "Log training metrics every this many optimizer steps.")
    resume: bool = _f(False, "Continue from out_dir/checkpoints/last.pt (starts fresh if there is none).")
    save_init: bool = _f(False, "Also save the initial weights to out_dir/init/ (model.safetensors).")
    device: str = _f("auto", "auto, cpu, cuda or cuda:N (under torchrun, cuda means cuda:LOCAL_RANK).")
    progress: bool = _f(True, "Show a tqdm progress bar on rank 0.")
    deterministic: bool = _f(False, "torch.use_deterministic_algorithms for the run (slower on GPU).")

    def __post_init__(self) -> None:
        self.validate()

    # ---- validation --------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check types and ranges of every field.

        Raises:
            ValueError: naming the offending field.
        """
        hints = _type_hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            setattr(self, f.name, _coerce(value, hints[f.name], f.name))
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name}: must be one of {list(choices)}, got {getattr(self, f.name)!r}")
        positive = ("epochs", "batch_size", "log_every")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        for name in ("max_steps", "eval_batch_size", "num_classes", "img_size"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"{name}: must be positive, got {v}")
        for name in (
            "lr",
            "weight_decay",
            "warmup_epochs",
            "min_lr",
            "grad_clip",
            "num_workers",
            "ckpt_every",
            "eval_every",
        ):
            v = getattr(self, name)
            if v < 0 or (isinstance(v, float) and not math.isfinite(v)):
                raise ValueError(f"{name}: must be a finite number >= 0, got {v}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing: must be in [0, 1), got {self.label_smoothing}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay: must be in [0, 1), got {self.ema_decay}")
        if self.betas is not None and not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas: each must be in [0, 1), got {self.betas}")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr: must not exceed lr ({self.lr}), got {self.min_lr}")

    # ---- serialization ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        d = asdict(self)
        if d["betas"] is not None:
            d["betas"] = list(d["betas"])
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config") -> TrainConfig:
        """Build from a dict; unknown keys and ill-typed values are errors naming the key and ``source``."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a mapping of config fields, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{source}: unknown config keys {unknown}; valid keys: {sorted(names)}")
        try:
            return cls(**d)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, text: str, *, source: str = "config") -> TrainConfig:
        return cls.from_dict(json.loads(text), source=source)

    def replace(self, **changes: Any) -> TrainConfig:
        """A validated copy with ``changes`` applied."""
        return type(self).from_dict({**self.to_dict(), **changes}, source="replace")


# ---- type handling ---------------------------------------------------------------------------------------------

_HINTS: dict[type, dict[str, Any]] = {}


def _type_hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _split_optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (tp, False)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _type_name(tp: Any) -> str:
    base, optional = _split_optional(tp)
    origin = typing.get_origin(base)
    if origin is tuple:
        name = "tuple of " + ", ".join(a.__name__ for a in typing.get_args(base))
    elif base is dict or origin is dict:
        name = "dict"
    else:
        name = getattr(base, "__name__", str(base))
    return f"{name} or null" if optional else name


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Check an already-parsed value (from Python, JSON or YAML) against a field type; lists become tuples."""
    base, optional = _split_optional(tp)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name}: must be {_type_name(tp)}, got None")
    origin = typing.get_origin(base)
    bad = ValueError(f"{name}: must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if base is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if base is str:
        if not isinstance(value, str):
            raise bad
        return value
    if base is dict or origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise bad
        return dict(value)
    if origin is tuple:
        args = typing.get_args(base)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise bad
        return tuple(_coerce(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    raise TypeError(f"{name}: unsupported field type {tp!r}")  # a programming error in TrainConfig


def parse_value(text: str, tp: Any, name: str) -> Any:
    """Parse a command-line string for a field of type ``tp``.

    Numbers and strings are parsed as such; ``none``/``null`` gives None for optional fields; booleans accept
    true/false/1/0/yes/no; tuples accept ``a,b`` or a JSON list; dicts accept JSON (``'{"depth": 2}'``) or
    ``key=value`` pairs separated by commas (values parsed as JSON when they can be, else kept as strings).

    Raises:
        ValueError: naming ``name`` and the expected type.
    """
    base, optional = _split_optional(tp)
    s = text.strip()
    if optional and s.lower() in ("none", "null"):
        return None
    origin = typing.get_origin(base)
    err = ValueError(f"{name}: expected {_type_name(tp)}, got {text!r}")
    if base is bool:
        low = s.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise err
    if base is int:
        try:
            return int(s)
        except ValueError:
            raise err from None
    if base is float:
        try:
            v = float(s)
        except ValueError:
            raise err from None
        return v
    if base is str:
        return text
    if origin is tuple:
        if s.startswith("["):
            try:
                parts = json.loads(s)
            except json.JSONDecodeError:
                raise err from None
        else:
            parts = [p.strip() for p in s.split(",")]
        args = typing.get_args(base)
        if not isinstance(parts, list) or len(parts) != len(args):
            raise err
        try:
            return tuple(a(p) if isinstance(p, str) else _coerce(p, a, name) for p, a in zip(parts, args))
        except ValueError:
            raise err from None
    if base is dict or origin is dict:
        if s.startswith("{"):
            try:
                d = json.loads(s)
            except json.JSONDecodeError as e:
                raise ValueError(f"{name}: invalid JSON {text!r} ({e.msg})") from None
            if not isinstance(d, dict):
                raise err
            return d
        out: dict[str, Any] = {}
        for item in (p for p in s.split(",") if p.strip()):
            if "=" not in item:
                raise ValueError(f"{name}: expected JSON or key=value pairs, got {item!r} in {text!r}")
            k, v = item.split("=", 1)
            try:
                out[k.strip()] = json.loads(v)
            except json.JSONDecodeError:
                out[k.strip()] = v.strip()
        return out
    raise TypeError(f"{name}: unsupported field type {tp!r}")


# ---- command line ----------------------------------------------------------------------------------------------


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _default_text(f: Any) -> str:
    default = f.default if f.default is not MISSING else f.default_factory()
    return "unset" if default is None else json.dumps(default) if isinstance(default, (dict, tuple)) else str(default)


def add_config_args(parser: argparse.ArgumentParser, config_cls: type = TrainConfig) -> None:
    """Add one ``--kebab-case`` option per dataclass field, plus ``--config FILE``.

    Options default to "not given" (``argparse.SUPPRESS``) so that :func:`config_from_args` can layer
    dataclass defaults < ``--config`` file < explicit options. Booleans get ``--x/--no-x``.
    """
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="JSON or YAML file with config fields; explicit options override it.",
    )
    hints = typing.get_type_hints(config_cls)
    for f in fields(config_cls):
        tp = hints[f.name]
        base, _ = _split_optional(tp)
        help_text = f"{f.metadata.get('help', '')} (default: {_default_text(f)})"
        opt = _option(f.name)
        if base is bool and tp is bool:
            parser.add_argument(
                opt, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text
            )
            continue
        choices = f.metadata.get("choices")
        parser.add_argument(
            opt,
            dest=f.name,
            type=_arg_parser(tp, opt),
            default=argparse.SUPPRESS,
            choices=choices,
            metavar=_metavar(tp, choices),
            help=help_text,
        )


def _metavar(tp: Any, choices: Any) -> str | None:
    if choices:
        return "{" + ",".join(choices) + "}"
    base, _ = _split_optional(tp)
    if base is dict or typing.get_origin(base) is dict:
        return "JSON|K=V,..."
    if typing.get_origin(base) is tuple:
        return ",".join(["X"] * len(typing.get_args(base)))
    return None if base is str else getattr(base, "__name__", "VALUE").upper()


def _arg_parser(tp: Any, opt: str) -> Any:
    def parse(text: str) -> Any:
        try:
            return parse_value(text, tp, opt)
        except ValueError as e:
            # argparse prefixes "argument --opt:"; keep only the part after our own "name: ".
            raise argparse.ArgumentTypeError(str(e).split(": ", 1)[-1]) from None

    parse.__name__ = _type_name(tp)
    return parse


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON (``.json``) or YAML (``.yaml``/``.yml``) file of config fields.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: it does not parse or is not a mapping (the message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config: file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:
        raise ValueError(f"--config {path}: could not parse ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of config fields, got {type(data).__name__}")
    return data


def config_from_args(args: argparse.Namespace, config_cls: type = TrainConfig) -> Any:
    """Layer dataclass defaults < ``--config`` file < options given on the command line, then validate.

    Raises:
        ValueError / FileNotFoundError: a bad file or value; the message names the option or file key.
    """
    values: dict[str, Any] = {}
    source = "command line"
    cfg_file = getattr(args, "config", None)
    if cfg_file:
        values.update(load_config_file(cfg_file))
        source = f"--config {cfg_file} / command line"
    names = {f.name for f in fields(config_cls)}
    given = {k: v for k, v in vars(args).items() if k in names}
    values.update(given)
    try:
        return config_cls.from_dict(values, source=source)
    except ValueError as e:
        # Name the option the user typed: "command line: min_lr: ..." -> "--min-lr: ...".
        msg = str(e)
        for name in sorted(names, key=len, reverse=True):
            if f": {name}:" in msg and name in given:
                msg = msg.replace(f"{source}: {name}:", f"{_option(name)}:", 1)
                break
        raise ValueError(msg) from None
