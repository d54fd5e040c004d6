"""The recipe registry and the helpers every recipe shares (ratelab.recipes, ratelab.recipes._common), and the
`ratelab reproduce` / `ratelab demo` scale options. No recipe is run here (their smoke runs live in their own tests)."""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch

from ratelab.cli.main import build_parser, main
from ratelab.core.errors import ConfigError, UnknownNameError
from ratelab.eval.report import Report
from ratelab.recipes import SCALE_NAMES, get_recipe, list_recipes, register_recipe, run_recipe
from ratelab.recipes._common import add_figure, check_scales, fresh_run_dir, limit_threads, logger


def test_every_recipe_has_a_typed_scale_table():
    specs = list_recipes()
    assert len(specs) >= 6
    for spec in specs:
        assert tuple(spec.scales) == SCALE_NAMES, spec.name
        types = {type(row) for row in spec.scales.values()}
        assert len(types) == 1, spec.name
        row_type = types.pop()
        assert dataclasses.is_dataclass(row_type) and row_type.__dataclass_params__.frozen, spec.name
        # The registered table is the recipe module's own SCALES (what its docstring and tests refer to).
        module = importlib.import_module(spec.fn.__module__)
        assert module.SCALES == spec.scales and row_type is module.Scale, spec.name
        # The rows differ (a scale that changes nothing is a copy-paste slip) and are JSON-able for results.json.
        rows = [dataclasses.asdict(r) for r in spec.scales.values()]
        assert rows[0] != rows[1] != rows[2], spec.name


def test_reproduce_list_names_every_recipe(capsys):
    assert main(["reproduce", "--list"]) == 0
    out = capsys.readouterr().out
    names = [s.name for s in list_recipes()]
    assert out.splitlines()[0].startswith(f"{len(names)} recipes")
    listed = [line.split()[0] for line in out.splitlines()[1:]]
    assert listed == names


@pytest.mark.parametrize("argv, scale", [
    ([], "full"), (["--quick"], "quick"), (["--smoke"], "smoke"), (["--scale", "quick"], "quick"),
    (["--scale", "smoke"], "smoke"),
])
def test_reproduce_scale_options(argv, scale):
    args = build_parser().parse_args(["reproduce", "crate-digits", "--out", "x", *argv])
    assert args.scale == scale


def test_demo_defaults_to_quick_and_scale_flags_exclude_each_other(capsys):
    assert build_parser().parse_args(["demo"]).scale == "quick"
    assert build_parser().parse_args(["demo", "--smoke"]).scale == "smoke"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["reproduce", "crate-digits", "--quick", "--smoke"])
    assert "not allowed with" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["reproduce", "crate-digits", "--scale", "medium"])


def test_reproduce_needs_out(capsys):
    assert main(["reproduce", "crate-digits", "--quick"]) == 2
    assert "--out" in capsys.readouterr().err


def test_unknown_recipe_and_scale_errors(tmp_path):
    with pytest.raises(UnknownNameError, match="did you mean 'crate-digits'"):
        get_recipe("crate-digit")
    with pytest.raises(ConfigError, match="scale.*'medium'"):
        run_recipe("crate-digits", tmp_path, "medium")
    assert not (tmp_path / "results.json").exists()


def test_register_recipe_rejects_bad_tables():
    @dataclasses.dataclass(frozen=True)
    class Row:
        n: int

    @dataclasses.dataclass
    class Loose:
        n: int

    good = {"smoke": Row(1), "quick": Row(2), "full": Row(3)}
    check_scales("ok", good)
    with pytest.raises(ValueError, match="exactly the rows"):
        check_scales("r", {"smoke": Row(1), "quick": Row(2)})
    with pytest.raises(TypeError, match="one type"):
        check_scales("r", {**good, "full": Loose(3)})
    with pytest.raises(TypeError, match="frozen"):
        check_scales("r", {k: Loose(v.n) for k, v in good.items()})
    with pytest.raises(ValueError, match="already registered"):
        register_recipe("crate-digits", paper="p", description="d", scales=good)(lambda *a, **k: None)


def test_fresh_run_dir_empties_only_inside_out_dir(tmp_path):
    run = tmp_path / "runs" / "a"
    run.mkdir(parents=True)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.pt").write_text("stale")
    (tmp_path / "keep.txt").write_text("user file")
    got = fresh_run_dir(tmp_path, "runs", "a")
    assert got == run and got.is_dir() and not any(got.iterdir())
    assert (tmp_path / "keep.txt").read_text() == "user file"
    assert fresh_run_dir(tmp_path, "new").is_dir()
    for bad in ((), ("..", "x"), ("/abs",), (".",)):
        with pytest.raises(ValueError, match="fresh_run_dir"):
            fresh_run_dir(tmp_path, *bad)


def test_limit_threads_sets_and_restores():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with limit_threads(1, device="cpu"):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), limit_threads(1):
            raise RuntimeError("inside")
        assert torch.get_num_threads() == 2  # restored on errors too
        from threadpoolctl import threadpool_info

        with limit_threads(1, device="cpu", blas=True):
            assert all(p["num_threads"] == 1 for p in threadpool_info() if p["user_api"] == "blas")
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="n must be"):
        with limit_threads(0):
            pass


def test_add_figure_writes_and_embeds(tmp_path):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 2))
    fig.subplots().plot([0, 1], [1, 0])
    report = Report("t")
    path = add_figure(report, fig, tmp_path, "f.png", "a caption")
    assert path == tmp_path / "f.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = report.body()
    assert html.count("data:image/png;base64,") == 1 and "a caption" in html


def test_logger(capsys):
    logger(True, "r")("hello")
    logger(False, "r")("quiet")
    assert capsys.readouterr().out == "[r] hello\n"


def test_accuracy_difference_adds_seed_spread_to_binomial_error():
    from ratelab.recipes._common import accuracy_difference, binom_se_diff

    one = accuracy_difference([0.95], [0.90], 400)
    assert one["two_se"] == pytest.approx(2 * binom_se_diff(0.925, 400))
    assert one["separated"] and one["better"]
    # the same means with a wide spread over seeds no longer separate
    wide = accuracy_difference([0.99, 0.91], [0.93, 0.87], 400)
    assert wide["diff"] == pytest.approx(0.05) and wide["two_se"] > one["two_se"] and not wide["separated"]
    assert accuracy_difference([0.90], [0.95], 400)["better"] is False
    with pytest.raises(ValueError):
        accuracy_difference([], [0.9], 100)


def test_train_arm_builds_after_seeding(tmp_path):
    import torch

    from ratelab.data import build_dataset
    from ratelab.recipes._common import train_arm

    train = build_dataset("digits", "train", img_size=8)
    val = build_dataset("digits", "val", img_size=8)
    inits = []

    def factory():
        m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
        inits.append(m[1].weight.detach().clone())
        return m

    kw = dict(train_dataset=train, val_dataset=val, out_dir=tmp_path, device="cpu", progress=False, epochs=1,
              batch_size=256, dataset="digits", img_size=8)
    a = train_arm("lin", factory, seed=3, **kw)
    train_arm("lin", factory, seed=3, **kw)
    assert torch.equal(inits[0], inits[1])  # the seed fixes the factory's initialization
    assert 0.0 <= a["final"]["val_acc"] <= 1.0 and a["run_dir"] == tmp_path / "runs" / "lin_seed3"
