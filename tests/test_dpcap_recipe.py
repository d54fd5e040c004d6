"""Recipe dpcap at smoke scale: every arm runs (DP captioner, DP classifier, non-private captioner, random init),
epsilon is reported under both accountants and the TAN simulation is flagged as carrying no guarantee."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import torch

import ratelab
from ratelab.data import build_dataset
from ratelab.recipes import run_recipe
from ratelab.recipes.dpcap import recipe
from ratelab.recipes.dpcap.recipe import SCALES, EncoderClassifier, _privacy
from ratelab.train import CaptionTask


def test_encoder_classifier_features_are_the_captioners_mean_encoder_token():
    torch.manual_seed(0)
    cap = ratelab.create_model("test_dpcap").eval()
    clf = EncoderClassifier(cap, 6).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(clf.features(x), cap.forward_encoder(x).mean(1))
        assert clf(x).shape == (2, 6)
    assert not any("decoder" in n or "text" in n for n, _ in clf.named_parameters())


def test_smoke_run(tmp_path):
    assert recipe.run is not None and set(SCALES) == {"smoke", "quick", "full"}
    res = run_recipe("dpcap", tmp_path, scale="smoke", progress=False)
    r = res.results
    row = SCALES["smoke"]
    names = {"random init", *(f"captioner eps={e:g}" for e in (*row.epsilons, math.inf)),
             *(f"DP classifier eps={e:g}" for e in row.epsilons)}
    assert set(r["arms"]) == names
    for e in row.epsilons:
        for kind in ("captioner", "DP classifier"):
            a = r["arms"][f"{kind} eps={e:g}"]
            # TAN simulation: flagged, and its epsilon named as the simulated run's (no dp_epsilon* key)
            assert a["tan_simulated_epsilon_rdp"] <= e * 1.01
            assert 0 < a["tan_simulated_epsilon_prv"] <= a["tan_simulated_epsilon_rdp"]
            assert a["dp_guarantee"] == 0 and not any(k.startswith("dp_epsilon") for k in a)
    assert not any(k.startswith(("dp_", "tan_")) for k in r["arms"]["captioner eps=inf"])
    assert r["tokenizer_vocab_size"] == CaptionTask(vocab_size=1000).build_tokenizer(
        build_dataset("shapes_captions", "train", size=4, img_size=8)).vocab_size  # the generator's word list
    for a in r["arms"].values():
        assert set(a["probe"]) == {"shape", "color", "position"} and all(0 <= v <= 1 for v in a["probe"].values())
    assert set(r["arms"]["captioner eps=inf"]["zero_shot"]) == {"shape", "color"}
    assert len(r["checks"]) == 7 and r["summary"]["guarantee"].startswith("none")
    assert all(isinstance(c, str) for c in r["samples"]["captioner eps=8"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["summary"]["guarantee"] == r["summary"]["guarantee"]
    assert "NO privacy guarantee" in (tmp_path / "report.html").read_text()


def test_only_simulations_use_the_recipes_seed():
    """A TAN arm (no guarantee to lose) draws its noise and batches from the recipe's seed, for exact repeats; an
    accounted arm leaves dp_seed unset, so the plugin draws a secret one and the run keeps its guarantee."""
    from ratelab.privacy import PrivacyConfig

    row = SCALES["smoke"]
    tan = _privacy(8.0, row, 96, seed=3)
    assert tan["dp_seed"] == 3 and tan["tan_batch_size"] == row.tan_batch
    real = _privacy(8.0, replace(row, tan_batch=None), 96, seed=3)
    assert "dp_seed" not in real and "tan_batch_size" not in real and PrivacyConfig(**real).has_guarantee


def test_docstring_sigmas_are_what_the_quick_scale_solves():
    """The recorded sigmas (quick scale) are what find_noise_multiplier gives for its q, T and delta (0.502 at
    epsilon 8 was a stale figure; 0.537 is solved)."""
    import re

    row = SCALES["quick"]
    m = re.search(r"sigma = ([\d.]+) at epsilon 1 and ([\d.]+) at epsilon 8", " ".join(recipe.__doc__.split()))
    assert m is not None
    for eps, doc in zip((1.0, 8.0), m.groups()):
        assert f"{_privacy(eps, row, row.n_train, seed=0)['noise_multiplier']:.3f}" == doc
