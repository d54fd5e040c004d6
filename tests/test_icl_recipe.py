"""Recipe icl-calibration (smoke) and its record collection (ratelab.icl.collect_records) against the ratelab.icl
contract."""

from __future__ import annotations

import pytest
import torch
from _recipe_fixtures import smoke_run

import ratelab.models.icl_gpt  # noqa: F401  (registers icl_gpt_*)
import ratelab.recipes.icl.calibration as icl_cal
from ratelab.core.registry import create_model
from ratelab.core.seeding import derive_seed
from ratelab.data.fewshot import FewShotConfig, sample_points, sample_task
from ratelab.data.noise import symmetric_noise
from ratelab.icl import collect_records
from ratelab.icl.records import ICLRecords


def test_collect_records_layout():
    cfg = FewShotConfig(input_dim=4, vocab_size=6, max_classes=4, n_pairs=5)
    model = create_model("icl_gpt_tiny", input_dim=4, vocab_size=6)
    shots = (0, 1, 4)
    recs = collect_records(model, cfg, n_tasks=2, shots=shots, n_prompts=2, n_extra_prompts=1, n_test=7,
                                   n_calib=5, seed=1, num_classes=3)
    assert len(recs) == 2
    for t, r in enumerate(recs):
        test, calib = r["test"], r["calib"]
        assert isinstance(test, ICLRecords) and test.num_classes == 3
        # 0 shots is one group; every other shots value has n_prompts groups (test) / + extra (calib).
        assert len(test) == 7 * (1 + 2 * 2) and len(calib) == 5 * (1 + 2 * 3)
        assert set(test.example_id.tolist()) == set(range(7)) and set(calib.example_id.tolist()) == set(range(7, 12))
        assert set(test.prompt_id.tolist()) == {1000 * t, 1000 * t + 1}
        assert set(calib.prompt_id.tolist()) == {1000 * t + p for p in range(3)}
        torch.testing.assert_close(test.probs, test.logits.softmax(1))
    # Same seed -> same records; another seed -> other tasks.
    again = collect_records(model, cfg, n_tasks=1, shots=shots, n_prompts=2, n_extra_prompts=1, n_test=7,
                                    n_calib=5, seed=1, num_classes=3)
    torch.testing.assert_close(again[0]["test"].probs, recs[0]["test"].probs)


def test_collect_records_matches_direct_prompt():
    """A k-shot record equals the model's prediction on the explicit prompt demo_1 .. demo_k, query."""
    cfg = FewShotConfig(input_dim=3, vocab_size=5, max_classes=3, n_pairs=5)
    model = create_model("icl_gpt_tiny", input_dim=3, vocab_size=5).eval()
    recs = collect_records(model, cfg, n_tasks=1, shots=(0, 2), n_prompts=1, n_extra_prompts=0, n_test=4,
                                   n_calib=2, seed=5, num_classes=2)
    test, task = recs[0]["test"], recs[0]["task"]
    # Rebuild the task, queries and demonstrations from the documented seeds and score the prompts one by one.
    g = torch.Generator().manual_seed(derive_seed(5, 0, 0x7A5C))
    task2 = sample_task(cfg, g, 2)
    torch.testing.assert_close(task2.centers, task.centers)
    qx, qy = sample_points(task2, 6, cfg, g)
    dx, dc = sample_points(task2, 2, cfg, torch.Generator().manual_seed(derive_seed(5, 0, 0, 0xD3)))
    dy = task.label_words[dc]
    for k in (0, 2):
        rows = test.subset(test.shots == k)
        assert rows.labels.tolist() == qy[:4].tolist()
        for i in range(4):
            x = torch.cat([dx[:k], qx[i: i + 1]])[None]
            z = model.label_logits(x, dy[None, :k], task.label_words)[0, -1].double()
            torch.testing.assert_close(rows.logits[i], z, rtol=1e-5, atol=1e-5)
    two, zero = test.subset(test.shots == 2), test.subset(test.shots == 0)
    assert not torch.allclose(two.probs, zero.probs)  # the demonstrations matter


def test_collect_records_demonstration_noise():
    """With label noise in the task distribution, the demonstrations carry it (drawn like the training sequences':
    each label independently, to another class) and the query labels stay clean."""
    cfg = FewShotConfig(input_dim=3, vocab_size=5, max_classes=3, n_pairs=5, label_noise=0.5)
    model = create_model("icl_gpt_tiny", input_dim=3, vocab_size=5).eval()
    recs = collect_records(model, cfg, n_tasks=1, shots=(0, 4), n_prompts=1, n_extra_prompts=0, n_test=4, n_calib=2,
                           seed=2, num_classes=3)
    test, task = recs[0]["test"], recs[0]["task"]
    g = torch.Generator().manual_seed(derive_seed(2, 0, 0x7A5C))
    task2 = sample_task(cfg, g, 3)
    qx, qy = sample_points(task2, 6, cfg, g)
    gp = torch.Generator().manual_seed(derive_seed(2, 0, 0, 0xD3))
    dx, dc = sample_points(task2, 4, cfg, gp)
    noisy = symmetric_noise(dc, 0.5, 3, generator=gp, selection="bernoulli")
    assert bool(noisy.mask.any())  # this seed corrupts some demonstrations, so the check below can fail
    rows = test.subset(test.shots == 4)
    assert rows.labels.tolist() == qy[:4].tolist()  # queries clean
    for i in range(4):
        x = torch.cat([dx, qx[i: i + 1]])[None]
        z_noisy = model.label_logits(x, task.label_words[noisy.labels][None], task.label_words)[0, -1].double()
        torch.testing.assert_close(rows.logits[i], z_noisy, rtol=1e-5, atol=1e-5)
    z_clean = model.label_logits(torch.cat([dx, qx[:1]])[None], task.label_words[dc][None],
                                 task.label_words)[0, -1].double()
    assert not torch.allclose(rows.logits[0], z_clean)


@pytest.mark.slow  # runs a whole recipe or trains networks (seconds, not milliseconds)
def test_icl_calibration_smoke(tmp_path_factory):
    run = smoke_run("icl-calibration", tmp_path_factory)
    r, out = run.saved, run.out_dir
    assert r["recipe"] == "icl-calibration" and r["scale"] == "smoke"
    s = r["summary"]
    for k in (0, 1, 2, 16):
        assert 0.0 <= s[f"tiny acc@{k}"] <= 1.0 and 0.0 <= s[f"tiny ece@{k}"] <= 1.0
    claims = [c["claim"] for c in r["checks"]]
    assert any("spike" in c for c in claims) and any("scaling_binning (shot_specific" in c for c in claims)
    methods = {(row["method"], row["regime"]) for row in r["recalibration"]["tiny"]}
    assert ("none", "none") in methods and ("scaling_binning", "prompt_specific") in methods
    assert (out / "acc_ece_vs_shots.png").exists() and (out / "ece_recalibration.png").exists()
    assert (out / "report.html").stat().st_size > 1000
    # The summary describes the smoke scale's settings, and the returned results are the ones written.
    smoke = icl_cal.SCALES["smoke"]
    assert s["sizes"] == [f"icl_gpt_{z}" for z in smoke.sizes] and s["steps"] == smoke.steps
    assert s["eval_tasks"] == smoke.n_tasks and s["test_queries"] == smoke.n_test
    assert [run_["size"] for run_ in r["runs"]] == list(smoke.sizes) and r["runs"][0]["params"] > 0
    assert run.result.results["summary"] == s
