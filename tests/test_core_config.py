"""The generic config machinery (ratelab.core.config) on a small dataclass tree of its own."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from ratelab.core.config import (
    apply_overrides,
    config_diff,
    config_field,
    dataclass_from_dict,
    dataclass_to_dict,
    flatten,
    parse_dotted_options,
)
from ratelab.core.errors import ConfigError


@dataclass
class Inner:
    width: int = 4
    rate: float = 0.5
    mode: str = config_field("a", "a mode", choices=("a", "b"))


@dataclass
class Outer:
    name: str = "x"
    sizes: tuple[int, int] = (1, 2)
    inner: Inner = field(default_factory=Inner)
    extra: dict = field(default_factory=dict)
    limit: int | None = None


def test_round_trip_and_coercion():
    cfg = dataclass_from_dict(Outer, {"sizes": [3, 4], "inner": {"rate": "1e-3", "width": 7}, "limit": None})
    assert cfg.sizes == (3, 4) and cfg.inner.rate == 1e-3 and cfg.inner.width == 7  # YAML-1.1 numeric string ok
    assert dataclass_from_dict(Outer, dataclass_to_dict(cfg)) == cfg
    assert flatten(dataclass_to_dict(cfg))["inner.rate"] == 1e-3


@pytest.mark.parametrize("data,needle", [
    ({"inner": {"widht": 1}}, "unknown config key(s) 'inner.widht'"),
    ({"inner": {"width": 1.5}}, "inner.width: must be int"),
    ({"inner": {"mode": "c"}}, "inner.mode: must be one of ['a', 'b']"),
    ({"sizes": [1]}, "sizes: must be tuple of int, int"),
    ({"limit": "many"}, "limit: must be int or null"),
])
def test_errors_name_the_dotted_key(data, needle):
    with pytest.raises(ConfigError) as e:
        dataclass_from_dict(Outer, data, source="run.yaml")
    assert needle in str(e.value) and str(e.value).startswith("run.yaml: ")


def test_dotted_overrides_and_diff():
    pairs = parse_dotted_options(["--inner.width", "9", "--set", "inner.mode=b", "--limit.x=1"][:4])
    assert pairs == [("inner.width", "9"), ("inner.mode", "b")]
    d = apply_overrides(Outer, dataclass_to_dict(Outer()), pairs + [("extra", "k=1,v=two")])
    cfg = dataclass_from_dict(Outer, d)
    assert cfg.inner.width == 9 and cfg.inner.mode == "b" and cfg.extra == {"k": 1, "v": "two"}
    assert config_diff(Outer(), cfg) == [("extra", {}, {"k": 1, "v": "two"}), ("inner.mode", "a", "b"),
                                         ("inner.width", 4, 9)]
    with pytest.raises(ConfigError, match="inner.depth: unknown key 'depth'"):
        apply_overrides(Outer, {}, [("inner.depth", "1")])
    with pytest.raises(ConfigError, match="inner.width: expected int"):
        apply_overrides(Outer, {}, [("inner.width", "wide")])
    with pytest.raises(ConfigError, match="unrecognized argument 'oops'"):
        parse_dotted_options(["oops"])
    with pytest.raises(ConfigError, match="--set: expected KEY=VALUE"):
        parse_dotted_options(["--set", "novalue"])



def test_diff_sees_an_added_optionless_plugin():
    import test_trainer_v2  # noqa: F401  (registers the option-less test plugins)

    from ratelab.train import TrainConfig

    a = TrainConfig(plugins={"test_poisson": {}})
    b = TrainConfig(plugins={"test_poisson": {}, "test_empty_stepper": {}})
    assert [k for k, _, _ in config_diff(a, b)] == ["plugins.test_empty_stepper"]
