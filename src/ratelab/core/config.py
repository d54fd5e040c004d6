"""Typed configuration trees: dataclasses <-> dicts (JSON/YAML) <-> command-line options, without ``eval``.

A config is a dataclass whose fields are scalars (``bool``, ``int``, ``float``, ``str``), ``X | None``, fixed-length
tuples, ``dict`` or nested dataclasses (sections). Each field's ``metadata["help"]`` documents it and becomes the
``--help`` text of its option; ``metadata["choices"]`` restricts it. Values are checked against the field types
(never executed); every error is a :class:`~ratelab.core.errors.ConfigError` naming the dotted key
(``task.eps``) or the option the user typed.

Sections whose class depends on a value (the task section's class depends on the task name) are *dynamic*: the
field's ``metadata["resolve"]`` is a function ``(value, key) -> dataclass instance`` that builds the right
dataclass from a name, a mapping (with ``name``) or an instance.

Layering used by the CLI: dataclass defaults < ``--config FILE`` < ``--kebab-option`` < ``--set a.b=v`` /
``--a.b v`` (dotted overrides, applied in the order given).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path
from typing import Any

from ratelab.core.errors import ConfigError

__all__ = [
    "ConfigFileNotFound",
    "add_dataclass_args",
    "apply_overrides",
    "config_diff",
    "config_field",
    "coerce_value",
    "dataclass_from_dict",
    "dataclass_to_dict",
    "flatten",
    "load_config_file",
    "parse_dotted_options",
    "parse_value",
    "validate_dataclass",
]


def config_field(default: Any, help: str, *, choices: tuple[str, ...] | None = None, resolve: Any = None) -> Any:
    """A dataclass field with documentation (``help``), optional ``choices`` and a dynamic-section ``resolve``."""
    meta: dict[str, Any] = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    if resolve is not None:
        meta["resolve"] = resolve
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    if is_dataclass(default) and not isinstance(default, type):
        return dataclasses.field(default_factory=lambda d=default: dataclasses.replace(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# ---- types ---------------------------------------------------------------------------------------------------

_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
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
        name = "tuple of " + ", ".join(getattr(a, "__name__", str(a)) for a in typing.get_args(base))
    elif base is dict or origin is dict:
        name = "dict"
    else:
        name = getattr(base, "__name__", str(base))
    return f"{name} or null" if optional else name


def coerce_value(value: Any, tp: Any, key: str) -> Any:
    """Check an already-parsed value (Python, JSON or YAML) against a field type; lists become tuples.

    Numeric strings are accepted for ``float``/``int`` fields (YAML 1.1 reads ``1e-3`` as a string).

    Raises:
        ConfigError: naming ``key`` and the expected type.
    """
    base, optional = _split_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}: must be {_type_name(tp)}, got None")
    origin = typing.get_origin(base)
    bad = ConfigError(f"{key}: must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if is_dataclass(base):
        if isinstance(value, base):
            validate_dataclass(value, prefix=key)
            return value
        if isinstance(value, dict):
            return dataclass_from_dict(base, value, prefix=key)
        raise bad
    if base is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if base is int:
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if base is float:
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise bad from None
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
        return tuple(coerce_value(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if base is Any:
        return value
    raise TypeError(f"{key}: unsupported field type {tp!r}")  # a programming error in the config class


def parse_value(text: str, tp: Any, key: str) -> Any:
    """Parse a command-line string for a field of type ``tp``.

    Numbers and strings are parsed as such; ``none``/``null`` gives None for optional fields; booleans accept
    true/false/1/0/yes/no/on/off; tuples accept ``a,b`` or a JSON list; dicts accept JSON (``'{"depth": 2}'``) or
    ``key=value`` pairs separated by commas (values parsed as JSON when they can be, else kept as strings).

    Raises:
        ConfigError: naming ``key`` and the expected type.
    """
    base, optional = _split_optional(tp)
    s = text.strip()
    if optional and s.lower() in ("none", "null"):
        return None
    origin = typing.get_origin(base)
    err = ConfigError(f"{key}: expected {_type_name(tp)}, got {text!r}")
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
            return float(s)
        except ValueError:
            raise err from None
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
            return tuple(parse_value(p, a, key) if isinstance(p, str) else coerce_value(p, a, key)
                         for p, a in zip(parts, args))
        except ConfigError:
            raise err from None
    if base is dict or origin is dict or is_dataclass(base) or base is Any:
        if s.startswith("{"):
            try:
                d = json.loads(s)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{key}: invalid JSON {text!r} ({e.msg})") from None
            if not isinstance(d, dict):
                raise err
            return d
        if base is Any or is_dataclass(base):
            # A bare word for a section is its name (``--task mcr2``); anything else for Any: JSON or the string.
            try:
                return json.loads(s) if base is Any else s
            except json.JSONDecodeError:
                return s
        out: dict[str, Any] = {}
        for item in (p for p in s.split(",") if p.strip()):
            if "=" not in item:
                raise ConfigError(f"{key}: expected JSON or key=value pairs, got {item!r} in {text!r}")
            k, v = item.split("=", 1)
            try:
                out[k.strip()] = json.loads(v)
            except json.JSONDecodeError:
                out[k.strip()] = v.strip()
        return out
    raise TypeError(f"{key}: unsupported field type {tp!r}")


# ---- dataclass <-> dict --------------------------------------------------------------------------------------


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def validate_dataclass(obj: Any, *, prefix: str = "") -> None:
    """Coerce every field of ``obj`` in place (lists -> tuples, ints -> floats, dicts -> sections) and check
    ``choices``; then call the instance's own ``check()`` (cross-field and range checks) if it has one.

    Raises:
        ConfigError: naming the dotted key.
    """
    hints = _hints(type(obj))
    for f in fields(obj):
        key = _join(prefix, f.name)
        value = getattr(obj, f.name)
        resolve = f.metadata.get("resolve")
        value = resolve(value, key) if resolve is not None else coerce_value(value, hints[f.name], key)
        object.__setattr__(obj, f.name, value)
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"{key}: must be one of {list(choices)}, got {value!r}")
    own = getattr(obj, "check", None)
    if callable(own):
        try:
            own()
        except ConfigError as e:
            raise ConfigError(f"{prefix}.{e}" if prefix and not str(e).startswith(prefix) else str(e)) from None
        except ValueError as e:
            raise ConfigError(f"{prefix + ': ' if prefix else ''}{e}") from None


def dataclass_from_dict(cls: type, data: dict[str, Any], *, prefix: str = "", source: str = "") -> Any:
    """Build ``cls`` from a mapping; unknown keys and ill-typed values are errors naming the dotted key.

    Args:
        cls: the dataclass.
        data: field values (nested mappings for sections).
        prefix: dotted path of ``cls`` inside a bigger tree (for messages).
        source: where ``data`` came from (a file name, "command line"), prepended to messages.
    """
    where = f"{source}: " if source else ""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}{prefix or cls.__name__}: expected a mapping, got {type(data).__name__}")
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        keys = ", ".join(repr(_join(prefix, k)) for k in unknown)
        raise ConfigError(f"{where}unknown config key(s) {keys}; valid keys{' of ' + prefix if prefix else ''}: "
                          f"{names}")
    hints = _hints(cls)
    values: dict[str, Any] = {}
    try:
        for f in fields(cls):
            if f.name not in data:
                continue
            key = _join(prefix, f.name)
            resolve = f.metadata.get("resolve")
            values[f.name] = resolve(data[f.name], key) if resolve is not None else \
                coerce_value(data[f.name], hints[f.name], key)
        try:
            obj = cls(**values)  # runs the class's own __post_init__ checks
        except ConfigError:
            raise
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{prefix + ': ' if prefix else ''}{e}") from None
        if "__post_init__" not in vars(cls):
            validate_dataclass(obj, prefix=prefix)  # choices and check(); a __post_init__ does its own
    except ConfigError as e:
        raise ConfigError(f"{where}{e}") from None
    return obj


def dataclass_to_dict(obj: Any) -> Any:
    """JSON-ready nested dict (tuples become lists, sections become mappings)."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: dataclass_to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, tuple):
        return [dataclass_to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: dataclass_to_dict(v) for k, v in obj.items()}
    return obj


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"task": {"eps": 1}}`` -> ``{"task.eps": 1}`` (dict-typed leaf fields stay whole when empty)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = _join(prefix, k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def config_diff(a: Any, b: Any) -> list[tuple[str, Any, Any]]:
    """Dotted keys whose values differ between two configs (dataclasses or dicts): ``[(key, a_value, b_value)]``."""
    fa = _leaves(a) if is_dataclass(a) else flatten(a)
    fb = _leaves(b) if is_dataclass(b) else flatten(b)
    return [(k, fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


def _leaves(obj: Any, prefix: str = "") -> dict[str, Any]:
    # Descend into sections (dataclasses, and mappings of them such as plugins); a plain dict field is one value,
    # so {} -> {"depth": 2} is one difference, not two.
    out: dict[str, Any] = {}
    if is_dataclass(obj) and not isinstance(obj, type):
        for f in fields(obj):
            out.update(_leaves(getattr(obj, f.name), _join(prefix, f.name)))
        if not fields(obj):
            out[prefix] = {}  # an option-less section still counts as present
    elif isinstance(obj, dict) and obj and all(is_dataclass(v) for v in obj.values()):
        for k, v in obj.items():
            out.update(_leaves(v, _join(prefix, k)))
    else:
        out[prefix] = dataclass_to_dict(obj)
    return out


# ---- dotted overrides ----------------------------------------------------------------------------------------


def _field_type(cls: type, dotted: str, data: dict[str, Any]) -> Any:
    """The declared type of ``dotted`` inside ``cls`` (or Any below a dict/dynamic section)."""
    parts = dotted.split(".")
    tp: Any = cls
    for i, part in enumerate(parts):
        base, _ = _split_optional(tp)
        if not is_dataclass(base):
            return Any
        by_name = {f.name: f for f in fields(base)}
        if part not in by_name:
            where = ".".join(parts[:i]) or "the config"
            raise ConfigError(f"{dotted}: unknown key {part!r} in {where}; valid: {sorted(by_name)}")
        f = by_name[part]
        if f.metadata.get("resolve") is not None:
            # Dynamic section: its class is known only once resolved; resolve what is there now.
            sub = data.get(part) if isinstance(data, dict) else None
            if i == len(parts) - 1:
                return Any
            inst = f.metadata["resolve"](sub, ".".join(parts[: i + 1]))
            rest = parts[i + 1 :]
            if isinstance(inst, dict) and len(rest) > 1 and is_dataclass(inst.get(rest[0])):
                # A mapping of sections (plugins): descend into the named one.
                inst, rest = inst[rest[0]], rest[1:]
            if not is_dataclass(inst):
                return Any
            try:
                return _field_type(type(inst), ".".join(rest), dataclass_to_dict(inst))
            except ConfigError as e:
                # The inner lookup knows only the key below the section; name the whole dotted key.
                inner = ".".join(rest)
                raise ConfigError(str(e).replace(f"{inner}:", f"{dotted}:", 1).replace(
                    "in the config", f"in {'.'.join(parts[: len(parts) - len(rest)])}", 1)) from None
        tp = _hints(base)[part]
        data = data.get(part, {}) if isinstance(data, dict) else {}
    return tp


def apply_overrides(cls: type, data: dict[str, Any], overrides: list[tuple[str, str]]) -> dict[str, Any]:
    """Apply ``[(dotted_key, text)]`` to the nested mapping ``data`` (parsed against the field types).

    A dynamic section given as a bare name (``task: "mcr2"``) becomes ``{"name": "mcr2"}`` before a dotted key
    below it is set.

    Raises:
        ConfigError: unknown key or bad value, naming the dotted key.
    """
    out = json.loads(json.dumps(data, default=list))  # deep copy of JSON-able data
    for key, text in overrides:
        tp = _field_type(cls, key, out)
        value = parse_value(text, tp, key) if isinstance(text, str) else text
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            cur = node.get(part)
            if isinstance(cur, str):
                cur = {"name": cur}
            elif not isinstance(cur, dict):
                cur = {}
            node[part] = cur
            node = cur
        leaf = parts[-1]
        if isinstance(value, str) and isinstance(node.get(leaf), dict) and "name" in _section_keys(cls, key):
            value = {"name": value}  # --task mcr2 on a section: set its name, drop the old task's fields
        node[leaf] = value
    return out


def _section_keys(cls: type, dotted: str) -> set[str]:
    try:
        tp = _field_type(cls, dotted, {})
    except ConfigError:
        return set()
    base, _ = _split_optional(tp)
    if is_dataclass(base):
        return {f.name for f in fields(base)}
    for f in fields(cls):  # a dynamic section at the top level
        if f.name == dotted and f.metadata.get("resolve") is not None:
            return {"name"}
    return set()


def parse_dotted_options(tokens: list[str]) -> list[tuple[str, str]]:
    """``["--task.eps", "0.5", "--set", "a.b=1", "--x.y=2"]`` -> ``[("task.eps", "0.5"), ("a.b", "1"), ("x.y", "2")]``.

    Raises:
        ConfigError: a token that is neither a dotted option nor a ``--set`` value.
    """
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok == "--set":
            if i + 1 >= len(tokens) or "=" not in tokens[i + 1]:
                raise ConfigError("--set: expected KEY=VALUE (e.g. --set task.eps=0.5)")
            k, v = tokens[i + 1].split("=", 1)
            out.append((k.strip(), v))
            i += 2
        elif tok.startswith("--") and "." in tok.split("=", 1)[0]:
            name = tok[2:]
            if "=" in name:
                k, v = name.split("=", 1)
                out.append((k.replace("-", "_"), v))
                i += 1
            else:
                if i + 1 >= len(tokens):
                    raise ConfigError(f"{tok}: expected a value")
                out.append((name.replace("-", "_"), tokens[i + 1]))
                i += 2
        else:
            raise ConfigError(f"unrecognized argument {tok!r}")
    return out


# ---- files and argparse --------------------------------------------------------------------------------------


class ConfigFileNotFound(ConfigError, FileNotFoundError):
    """``--config FILE`` names a file that does not exist."""


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON (``.json``) or YAML (``.yaml``/``.yml``) mapping of config fields.

    Raises:
        ConfigError: the file is missing, does not parse or is not a mapping (the message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigFileNotFound(f"--config: file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:
        raise ConfigError(f"--config {path}: could not parse ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of config fields, got {type(data).__name__}")
    return data


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _default_text(f: Any) -> str:
    default = f.default if f.default is not MISSING else f.default_factory()
    if is_dataclass(default):
        return json.dumps(dataclass_to_dict(default))
    return "unset" if default is None else json.dumps(default) if isinstance(default, (dict, tuple)) else str(default)


def _metavar(tp: Any, choices: Any) -> str | None:
    if choices:
        return "{" + ",".join(choices) + "}"
    base, _ = _split_optional(tp)
    if base is dict or typing.get_origin(base) is dict:
        return "JSON|K=V,..."
    if typing.get_origin(base) is tuple:
        return ",".join(["X"] * len(typing.get_args(base)))
    if is_dataclass(base) or base is Any:
        return "NAME|JSON"
    return None if base is str else getattr(base, "__name__", "VALUE").upper()


def _arg_parser(tp: Any, opt: str) -> Any:
    def parse(text: str) -> Any:
        try:
            return parse_value(text, tp, opt)
        except ConfigError as e:
            # argparse prefixes "argument --opt:"; keep only the part after our own "name: ".
            raise argparse.ArgumentTypeError(str(e).split(": ", 1)[-1]) from None

    parse.__name__ = _type_name(tp)
    return parse


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--kebab-case`` option per top-level field of ``cls`` (booleans get ``--x/--no-x``).

    Options default to "not given" (``argparse.SUPPRESS``) so that callers can layer defaults < file < options.
    Sections (nested or dynamic) get an option too: a bare word sets the section's ``name`` (``--task mcr2``),
    JSON sets it whole; their fields are reached with dotted options (``--task.eps 0.5``) or ``--set``.
    """
    hints = _hints(cls)
    for f in fields(cls):
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
            type=_arg_parser(tp if f.metadata.get("resolve") is None else Any, opt),
            default=argparse.SUPPRESS,
            choices=choices,
            metavar=_metavar(tp, choices),
            help=help_text,
        )
