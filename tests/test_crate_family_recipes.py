"""The ``crate-alpha`` and ``crate-mae`` recipes at smoke scale (shared smoke runs), and their arm factories."""

from __future__ import annotations

import pytest
import torch
from _recipe_fixtures import smoke_run

import ratelab.recipes.crate_alpha.recipe as ca


@pytest.mark.slow
def test_crate_alpha_smoke_writes_results(tmp_path_factory):
    run = smoke_run("crate-alpha", tmp_path_factory)
    data, out = run.saved, run.out_dir
    assert (out / "report.html").is_file() and (out / "crate_alpha.png").is_file()
    s = data["summary"]
    for arm in ca.ARMS:
        assert 0.0 <= s[f"acc {arm}"] <= 1.0 and s[f"params {arm}"] > 0
    assert s["params crate"] < s["params + overcomplete"] < s["params + decoupled"] == s["params + residual (CRATE-α)"]
    claims = [c["claim"] for c in data["checks"]]
    for topic in ("beats CRATE", "+ overcomplete improves", "+ decoupled improves", "+ residual (CRATE-α) improves",
                  "keeps improving with width", "light recipe"):
        assert sum(topic in c for c in claims) == 1, topic
    assert data["compute_token_epochs"]["light"] <= data["compute_token_epochs"]["scratch"] * 1.5
    arms = {r["arm"] for r in data["runs"]}
    assert {"light pre-train", "light fine-tune"} <= arms
    assert {r["patch"] for r in data["runs"] if r["arm"] == "light pre-train"} == {ca.DATA['digits'].big_patch}


def _write_cifar10(root, n_train=16, n_test=6):
    """Tiny CIFAR-10 pickles in the official layout (as tests/test_data.py builds them)."""
    import pickle

    import numpy as np

    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def dump(name, n):
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": [i % 10 for i in range(n)]}
        (base / name).write_bytes(pickle.dumps(batch, protocol=2))

    for b in range(1, 6):
        dump(f"data_batch_{b}", n_train)
    dump("test_batch", n_test)
    (base / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))


@pytest.mark.slow
def test_crate_alpha_runs_cifar10_when_present_and_says_when_not(tmp_path, monkeypatch):
    """CIFAR-10 joins the study when its pickles are under $RATELAB_DATA (claims and summary prefixed, runs on
    32 px RGB); without them the results and the report name the missing file instead of dropping it silently."""
    from dataclasses import replace

    from ratelab.recipes import run_recipe

    monkeypatch.setitem(ca.SCALES, "smoke", replace(ca.SCALES["smoke"], datasets=("digits", "cifar10")))
    monkeypatch.setenv("RATELAB_DATA", str(tmp_path / "data"))
    missing = run_recipe("crate-alpha", tmp_path / "missing", "smoke", progress=False, device="cpu").results
    assert missing["datasets"] == ["digits"]
    assert "batches.meta" in missing["datasets_not_found"]["cifar10"]
    assert "cifar10: not run" in (tmp_path / "missing" / "report.html").read_text()

    _write_cifar10(tmp_path / "data")
    res = run_recipe("crate-alpha", tmp_path / "with", "smoke", progress=False, device="cpu").results
    assert res["datasets"] == ["digits", "cifar10"] and not res["datasets_not_found"]
    cifar_claims = [c["claim"] for c in res["checks"] if c["claim"].startswith("cifar10: ")]
    assert len(cifar_claims) == len(res["checks"]) // 2 == 6
    assert 0.0 <= res["summary"]["cifar10: acc crate"] <= 1.0
    runs = [r for r in res["runs"] if r["dataset"] == "cifar10"]
    assert runs and {r["patch"] for r in runs} == {8, 16}
    assert (tmp_path / "with" / "cifar10" / "crate_alpha_cifar10.png").is_file()


def test_crate_alpha_arms_differ_as_the_ablation_says():
    """The arms are the models the ablation names: CRATE is the CRATE family; the three CRATE-α arms switch
    decoupled/residual and nothing else (a mix-up would void the ablation)."""
    models = {arm: ca._factory(arm, 16, 1, 2, ca.DATA['digits'], 4)() for arm in ca.ARMS}
    assert type(models["crate"]).__name__ == "Crate"
    for arm, flags in ca.ALPHA_FLAGS.items():
        cfg = models[arm].cfg
        assert (cfg.decoupled, cfg.residual) == (flags["decoupled"], flags["residual"])
    torch.manual_seed(0)
    x = torch.randn(2, 1, 16, 16)
    outs = []
    for arm in ca.ARMS[1:]:
        torch.manual_seed(0)
        m = ca._factory(arm, 16, 1, 2, ca.DATA['digits'], 4)().eval()
        outs.append(m(x))
    assert not torch.allclose(outs[1], outs[2])  # the residual changes the function at the same weights


@pytest.mark.slow
def test_crate_mae_smoke_writes_results(tmp_path_factory):
    run = smoke_run("crate-mae", tmp_path_factory)
    data, out = run.saved, run.out_dir
    assert (out / "report.html").is_file()
    assert (out / "reconstructions_crate_mae.png").is_file() and (out / "reconstructions_mae_vit.png").is_file()
    s = data["summary"]
    assert s["params CRATE-MAE-B"] == 44_638_464 and s["params ViT-MAE-B"] == 143_790_336
    for fam in ("CRATE-MAE", "ViT-MAE"):
        assert s[f"held-out loss {fam}"] > 0
        assert 0.0 <= s[f"probe [CLS] {fam}"] <= 1.0 and 0.0 <= s[f"probe random init {fam}"] <= 1.0
    assert len(s["encoder R^c per layer"]) == len(s["decoder R^c per layer"]) >= 1
    claims = [c["claim"] for c in data["checks"]]
    for topic in ("30% of the matched", "reconstructs held-out", "random-init encoder", "ViT-MAE's frozen features",
                  "decoder undoes"):
        assert sum(topic in c for c in claims) == 1, topic
