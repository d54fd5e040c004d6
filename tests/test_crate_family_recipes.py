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
    assert {r["patch"] for r in data["runs"] if r["arm"] == "light pre-train"} == {ca.BIG_PATCH}


def test_crate_alpha_arms_differ_as_the_ablation_says():
    """The arms are the models the ablation names: CRATE is the CRATE family; the three CRATE-α arms switch
    decoupled/residual and nothing else (a mix-up would void the ablation)."""
    models = {arm: ca._factory(arm, 16, 1, 2)() for arm in ca.ARMS}
    assert type(models["crate"]).__name__ == "Crate"
    for arm, flags in ca.ALPHA_FLAGS.items():
        cfg = models[arm].cfg
        assert (cfg.decoupled, cfg.residual) == (flags["decoupled"], flags["residual"])
    torch.manual_seed(0)
    x = torch.randn(2, 1, 16, 16)
    outs = []
    for arm in ca.ARMS[1:]:
        torch.manual_seed(0)
        m = ca._factory(arm, 16, 1, 2)().eval()
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
