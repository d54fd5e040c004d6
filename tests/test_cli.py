import json
import subprocess
import sys

import pytest

from ratelab.cli.main import _COMMANDS, main


def test_python_m_ratelab_help():
    out = subprocess.run([sys.executable, "-m", "ratelab", "--help"], capture_output=True, text=True, check=True)
    for cmd in _COMMANDS:
        assert cmd in out.stdout


@pytest.mark.parametrize("cmd", _COMMANDS)
def test_every_subcommand_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "usage: ratelab " + cmd in text


def test_every_option_has_help_text():
    import argparse

    from ratelab.cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [
        f"{name} {'/'.join(act.option_strings) or act.dest}"
        for name, p in sub.choices.items()
        for act in p._actions
        if not isinstance(act, argparse._HelpAction) and not act.help
    ]
    assert missing == []


def test_models_lists_and_counts(capsys):
    assert main(["models", "crate_*_patch16_224", "--params"]) == 0
    out = capsys.readouterr().out
    counts = {line.split()[0]: float(line.split()[1][:-1]) for line in out.splitlines()}
    assert counts["crate_tiny_patch16_224"] == pytest.approx(6.09, abs=0.005)
    assert counts["crate_base_patch16_224"] == pytest.approx(22.80, abs=0.005)


def test_models_unknown_pattern_is_clear_error(capsys):
    assert main(["models", "nothing_like_this*"]) == 2
    assert "nothing_like_this" in capsys.readouterr().err


def test_reproduce_list(capsys):
    assert main(["reproduce", "--list"]) == 0
    assert "crate-digits" in capsys.readouterr().out


def test_reproduce_unknown_recipe(capsys, tmp_path):
    assert main(["reproduce", "nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "crate-digits" in err


@pytest.mark.slow  # runs a whole recipe or trains networks (seconds, not milliseconds)
def test_demo_smoke_writes_report_and_summary(tmp_path, tmp_path_factory, capsys, monkeypatch):
    """`ratelab demo --smoke` runs every registered recipe at scale smoke and combines them. The runs themselves are
    the suite's shared smoke runs (tests/_recipe_fixtures.py), so no recipe's smoke run executes twice."""
    import shutil

    from _recipe_fixtures import smoke_run

    import ratelab.recipes
    from ratelab.recipes import list_recipes

    calls = []

    def shared_run(name, out_dir, scale="quick", **kw):
        calls.append((name, scale, kw["seed"]))
        run = smoke_run(name, tmp_path_factory)
        shutil.copytree(run.out_dir, out_dir, dirs_exist_ok=True)
        return run.result

    monkeypatch.setattr(ratelab.recipes, "run_recipe", shared_run)
    out = tmp_path / "demo"
    assert main(["demo", "--smoke", "--no-progress", "--out", str(out)]) == 0
    names = [s.name for s in list_recipes()]
    assert calls == [(n, "smoke", 0) for n in names]
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["recipes"]) == names and summary["scale"] == "smoke"
    rec = summary["recipes"]["crate-digits"]
    assert 0.0 <= rec["summary"]["val_acc_mean"] <= 1.0
    assert len(rec["summary"]["sparsity_trained"]) == 4  # crate_pico has 4 layers
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3
    assert all(f"{n} — " in html for n in names)  # one section per recipe
    assert (out / "crate-digits" / "results.json").exists()
    printed = capsys.readouterr().out
    assert all(f"== {n} (" in printed for n in names)
    # the page opens with one summary row per recipe, each linking to its section, and a tally of every claim
    n_claims = sum(len(r["checks"]) for r in summary["recipes"].values())
    n_ok = sum(c["holds"] for r in summary["recipes"].values() for c in r["checks"])
    assert f"{n_ok} of {n_claims} claims hold in {len(names)} recipes" in html
    assert all(f'<a href="#{n}">{n}</a>' in html and f'id="{n}"' in html for n in names)
    assert html.index('class="summary"') < html.index('class="toc"') < html.index(f'id="{names[0]}"')
    # the terminal ends with the same table: the tally, then each recipe's claims with the report's words
    tail = printed[printed.index("Summary: "):]
    assert tail.startswith(f"Summary: {n_ok} of {n_claims} claims hold in {len(names)} recipes")
    assert "FAILS" not in printed and all(f"\n{n} (" in tail for n in names)
    assert tail.count("holds  ") + tail.count("does not hold  ") == n_claims
    from _browser import find_chromium, render

    if find_chromium() is not None:  # the real page in a real browser (tests/test_report_browser.py skips if absent)
        seen = render(out / "report.html", tmp_path)
        assert seen["images"] == seen["images_loaded"] == html.count("data:image/png;base64,")
        assert seen["errors"] == [] and seen["broken_links"] == []
        assert seen["summary_recipes"] == names


def test_eval_scores_an_mcr2_run_by_nearest_subspace(tmp_path, capsys):
    from ratelab.train import MCR2Task, TrainConfig, Trainer

    cfg = TrainConfig(task="mcr2", model="mcr2_mlp_small", dataset="digits", img_size=8, epochs=2, batch_size=128,
                      out_dir=str(tmp_path / "run"), progress=False)
    res = Trainer(cfg, MCR2Task()).fit()
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "ev")]) == 0
    assert "nearest-subspace acc" in capsys.readouterr().out
    ev = json.loads((tmp_path / "ev" / "eval.json").read_text())
    # the CLI's score is the task's own evaluation of the same weights on the same split
    assert ev["acc"] == pytest.approx(res["val_acc"], abs=1e-6)
    assert ev["delta_R"] > 0


def test_eval_calibration_report(tmp_path, capsys):
    from ratelab.analysis.calibration import ece
    from ratelab.core.checkpoint import load_model
    from ratelab.data import build_dataset
    from ratelab.eval.classification import predict
    from ratelab.train import ClassificationTask, TrainConfig, Trainer

    cfg = TrainConfig(model="crate_pico_patch4_16", dataset="digits", img_size=16, epochs=1, batch_size=128,
                      out_dir=str(tmp_path / "run"), progress=False)
    Trainer(cfg, ClassificationTask()).fit()
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--calibration", "--out", str(tmp_path / "ev")]) == 0
    assert "ece_width15" in capsys.readouterr().out
    ev = json.loads((tmp_path / "ev" / "eval.json").read_text())["calibration"]
    assert (tmp_path / "ev" / "reliability.png").stat().st_size > 1000
    logits, labels = predict(load_model(tmp_path / "run"), build_dataset("digits", "val", img_size=16, augment=False))
    assert ev["ece_width15"] == pytest.approx(ece(logits.double().softmax(-1), labels, n_bins=15), abs=1e-6)
    assert 0 <= ev["mce15"] <= 1 and ev["brier"] > 0 and ev["nll"] > 0
