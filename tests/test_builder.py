"""core.builder.build_model_with_cfg: the split of keyword arguments, the errors, and the model_args contract."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

import ratelab
from ratelab.core.builder import UnknownArgumentError, build_model_with_cfg, runtime_arg_names
from ratelab.core.checkpoint import load_model, save_model
from ratelab.core.errors import ConfigError
from ratelab.core.registry import model_entrypoint
from ratelab.models.crate import CRATE_VARIANTS, Crate, CrateConfig


@dataclass(frozen=True)
class ToyConfig:
    width: int = 4
    ratio: float = 1.5
    sizes: tuple[int, ...] = (2, 3)
    name: str | None = None
    gate: bool = False

    def __post_init__(self) -> None:
        if self.width <= 0:
            raise ValueError(f"width must be positive, got {self.width}")


class Toy(nn.Module):
    execution_args = ("backend",)

    def __init__(self, cfg: ToyConfig, *, num_classes: int = 3, backend: str = "auto", note: object = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        self.backend = backend
        self.lin = nn.Linear(cfg.width, num_classes)


def test_split_into_config_and_runtime_and_model_args():
    m = build_model_with_cfg(Toy, ToyConfig, ToyConfig(), width=6, sizes=[1, 2, 3], num_classes=5, backend="ref")
    assert m.cfg == ToyConfig(width=6, sizes=(1, 2, 3))  # a JSON list becomes the field's tuple
    assert m.num_classes == 5 and m.backend == "ref"
    # every architecture field and the runtime options, minus the execution-only ones; JSON-able as is
    assert m.model_args == {"width": 6, "ratio": 1.5, "sizes": [1, 2, 3], "name": None, "gate": False,
                            "num_classes": 5, "note": None}
    assert json.loads(json.dumps(m.model_args)) == m.model_args
    again = build_model_with_cfg(Toy, ToyConfig, ToyConfig(width=99), **m.model_args)
    assert again.cfg == m.cfg and again.num_classes == 5
    assert runtime_arg_names(Toy) == ["num_classes", "backend", "note"]
    # an int for a float field is accepted and stored as a float
    assert build_model_with_cfg(Toy, ToyConfig, ToyConfig(), ratio=2).cfg.ratio == 2.0


def test_unknown_argument_names_it_and_the_valid_ones():
    with pytest.raises(UnknownArgumentError) as e:
        build_model_with_cfg(Toy, ToyConfig, ToyConfig(), widht=5, depth=2)
    msg = str(e.value)
    assert "['depth', 'widht']" in msg and "Toy" in msg
    assert "['gate', 'name', 'ratio', 'sizes', 'width']" in msg and "['num_classes', 'backend', 'note']" in msg
    assert isinstance(e.value, ValueError) and isinstance(e.value, TypeError) and isinstance(e.value, ConfigError)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"width": "6"}, r"ToyConfig\.width must be int, got '6'"),
        ({"width": True}, r"ToyConfig\.width must be int"),
        ({"gate": 1}, r"ToyConfig\.gate must be bool"),
        ({"ratio": "x"}, r"ToyConfig\.ratio must be float"),
        ({"sizes": 3}, r"ToyConfig\.sizes must be tuple"),
        ({"name": 3}, r"ToyConfig\.name must be str"),
        ({"width": -1}, r"ToyConfig: width must be positive"),  # the config's own check, as a ConfigError
        ({"note": object()}, "note=.* is not JSON-serializable"),
    ],
)
def test_bad_values_are_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        build_model_with_cfg(Toy, ToyConfig, ToyConfig(), **kw)


def test_variant_must_be_of_the_config_class():
    with pytest.raises(TypeError, match="ToyConfig"):
        build_model_with_cfg(Toy, ToyConfig, CrateConfig())


def test_crate_override_rederives_head_dim_and_round_trips():
    m = build_model_with_cfg(Crate, CrateConfig, CRATE_VARIANTS["test"], embed_dim=48, num_heads=3, num_classes=4)
    assert m.cfg.head_dim == 16 and m.model_args["head_dim"] == 16
    narrow = build_model_with_cfg(Crate, CrateConfig, CRATE_VARIANTS["test"], num_heads=4, head_dim=4)
    assert narrow.cfg.head_dim == 4  # an explicit head_dim is kept
    with torch.device("meta"):
        rebuilt = model_entrypoint("test_crate")(**m.model_args)
    assert rebuilt.cfg == m.cfg and {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in m.state_dict().items()}


def test_execution_args_are_not_recorded():
    m = ratelab.create_model("test_adventurer", ssd_backend="ref", drop_path_rate=0.1)
    assert "ssd_backend" not in m.model_args and "ssd_chunk_size" not in m.model_args
    assert m.model_args["drop_path_rate"] == 0.1 and m.model_args["flip"] == "alternate"


def test_mcr2_mlp_with_overrides_saves_and_loads(tmp_path):
    # The defect of issue 9: a family without a config saved its overrides nowhere and failed to load.
    m = ratelab.create_model("mcr2_mlp_small", hidden=64, num_classes=7).eval()
    assert m.model_args == {"hidden": 64, "num_classes": 7, "img_size": 8, "in_chans": 1}
    save_model(m, tmp_path)
    again = load_model(tmp_path).eval()
    assert again.cfg.hidden == 64 and again.model_args == m.model_args
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(again(x), m(x), atol=0, rtol=0)
    cnn = ratelab.create_model("mcr2_cnn_small", width=4, hidden=16)
    assert cnn.model_args == {"width": 4, "hidden": 16, "num_classes": 10, "img_size": 16, "in_chans": 1}
    with pytest.raises(TypeError, match="unknown SmallCNN option"):
        ratelab.create_model("mcr2_cnn_small", depth=3)
