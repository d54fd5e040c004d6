"""The ``adventurer`` recipe (smoke scale) and benchmarks/adventurer_vs_vit.py (smoke mode), in tiny shapes."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import sys
from pathlib import Path

import pytest
import torch
from _recipe_fixtures import smoke_run

import ratelab.recipes.adventurer.recipe as adv_recipe

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.slow  # runs a whole recipe or trains networks (seconds, not milliseconds)
def test_recipe_smoke_writes_results(tmp_path_factory):
    run = smoke_run("adventurer", tmp_path_factory)
    data, out = run.saved, run.out_dir
    assert (out / "report.html").is_file()
    assert (out / "accuracy.png").is_file() and (out / "throughput_vs_tokens.png").is_file()
    s = data["summary"]
    for key in ("params", "val_acc", "train_time_s", "infer_img_per_s_16_tokens", "sweep_adventurer_x_vit",
                "vit_mlp_ratio", "crate_width", "binomial_se_diff"):
        assert key in s, key
    arms = set(adv_recipe.ABLATION) | {"adventurer", "vit", "vit (avg pool)", "crate"}
    assert set(s["val_acc"]) == arms
    assert all(0.0 <= v <= 1.0 for v in s["val_acc"].values())
    # "both" is the main Adventurer run, reused (same config and seed), so the two must agree exactly
    assert s["val_acc"]["both (Adventurer)"] == s["val_acc"]["adventurer"]
    # parameter matching: the ViT and CRATE are within 15% of the Adventurer's count even at smoke size
    p = s["params"]
    assert abs(p["vit"] - p["adventurer"]) / p["adventurer"] < 0.15
    assert abs(p["crate"] - p["adventurer"]) / p["adventurer"] < 0.15
    # One claim per comparison the recipe makes: accuracy vs ViT and vs CRATE, each ablation ingredient, throughput.
    claims = [c["claim"] for c in data["checks"]]
    for topic in ("as accurate as a ViT", "as accurate as CRATE", "heading average + flips", "heading average alone",
                  "flips alone", "grows with the token count", "2x ViT inference throughput"):
        assert sum(topic in c for c in claims) == 1, topic
    assert all(isinstance(c["holds"], bool) and c["measured"] for c in data["checks"])
    assert [r["tokens"] for r in data["sweep"]] == [16, 64]
    assert data["scale"] == "smoke" and s["scale"] == "smoke" and data["scale_settings"]["width"] == 16
    assert run.result.results["checks"] == data["checks"]  # what run_recipe returned is what it wrote


def test_ablation_arms_are_distinct_models():
    """The four ablation factories really differ in heading average / flips (a mix-up would silently void the
    ablation): same seed and weights, different outputs unless both switches match."""
    scale = adv_recipe.SCALES["smoke"]
    match = {"vit_mlp_ratio": 4.0, "crate_width": 32}
    fac = adv_recipe.build_family(scale, match)
    x = torch.randn(2, 1, 16, 16)
    outs = {}
    for arm in adv_recipe.ABLATION:
        torch.manual_seed(0)
        m = fac[arm]().eval()
        assert [b.flip for b in m.blocks] == [False, adv_recipe.ABLATION[arm][1] == "alternate"]
        with torch.no_grad():
            outs[arm] = m(x)
    names = list(outs)
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            assert not torch.allclose(outs[names[i]], outs[names[j]]), (names[i], names[j])


def test_match_params_picks_closest():
    lin = lambda w: torch.nn.Linear(w, 1, bias=False)  # noqa: E731  (w parameters)
    assert adv_recipe.match_params(10, lin, [3, 8, 11, 20]) == (11, 11)


@pytest.fixture()
def bench_module(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # the script imports its sibling _machine
    mod = importlib.import_module("adventurer_vs_vit")
    yield mod
    sys.modules.pop("adventurer_vs_vit", None)


def test_benchmark_smoke_prints_table(bench_module, tmp_path):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = bench_module.main(["--smoke", "--no-memory", "--threads", "1", "--json", str(tmp_path / "b.json"),
                                "--plot", str(tmp_path / "b.png")])
    out = buf.getvalue()
    assert rc == 0
    assert "| tokens | image/patch | batch | model |" in out
    assert "scaled_dot_product_attention" in out
    rec = json.loads((tmp_path / "b.json").read_text())
    rows = rec["rows"]
    expected = {(m, t) for m in ("adventurer", "vit", "crate") for t in (16, 64)}
    assert {(r["model"], r["tokens"]) for r in rows} == expected
    for r in rows:
        assert r["infer"]["img_per_s"] > 0 and r["train"]["img_per_s"] > 0
        if r["model"] == "vit":
            assert r["infer"]["x_vit"] == pytest.approx(1.0)
    assert (tmp_path / "b.png").stat().st_size > 0


@pytest.mark.slow  # runs a whole recipe or trains networks (seconds, not milliseconds)
def test_benchmark_memory_probe_sees_activations(bench_module):
    """The peak-memory probe (a fresh subprocess) sees a step's activations: a 4096-token train step of the smoke
    CRATE (2 layers, 32 wide; CRATE keeps timm out of the subprocess) saves several MiB of activations, more than
    its inference step holds."""
    ns = bench_module.argparse.Namespace(smoke=True, width=256, depth=12, adventurer="adventurer_tiny_patch16_224",
                                         flip="alternate", ssd_backend="auto", num_classes=10, device="cpu",
                                         batch_tokens=4096, seed=0, threads=1, memory_timeout=120.0)
    mem = bench_module.measure_memory("crate", 1024, 16, ns)
    assert set(mem) == {"infer", "train"}
    assert mem["train"] > mem["infer"] >= 0  # the train step keeps activations for backward
    assert mem["train"] > 2.0
