"""Digits nuisance-cue part of the wrong-line recipe: data construction, cue/noise rates, smoke sweep, determinism."""

from __future__ import annotations

import json
import math

import pytest
import torch
from _recipe_fixtures import smoke_run

from ratelab.recipes.wrong_line import digits as D

torch.set_num_threads(1)


def test_assign_cues_rates():
    y = torch.randint(0, 10, (20_000,), generator=torch.Generator().manual_seed(0))
    c9 = D.assign_cues(y, 0.9, torch.Generator().manual_seed(1))
    c1 = D.assign_cues(y, 0.1, torch.Generator().manual_seed(2))
    assert abs(D.cue_label_agreement(c9, y) - 0.9) < 0.01
    assert abs(D.cue_label_agreement(c1, y) - 0.1) < 0.01
    # p = 1/K: the cue is uniform whatever the label (independence), e.g. for label 3.
    counts = torch.bincount(c1[y == 3], minlength=10).float()
    assert (counts / counts.sum() - 0.1).abs().max() < 0.03


def test_apply_cue_is_readable_from_pixels():
    img = torch.rand(40, 1, 8, 8)
    cues = torch.arange(40) % 10
    col = D.apply_cue(img, cues, "colour")
    assert col.shape == (40, 3, 8, 8)
    rgb = col.sum(dim=(2, 3))
    rgb = rgb / rgb.norm(dim=1, keepdim=True)
    pal = D.PALETTE / D.PALETTE.norm(dim=1, keepdim=True)
    assert torch.equal((rgb @ pal.T).argmax(1), cues)
    bor = D.apply_cue(torch.zeros(10, 1, 8, 8), torch.arange(10), "border")
    frames = bor[:, 0].reshape(10, -1)
    assert len({tuple(f.tolist()) for f in frames}) == 10  # ten distinct frame patterns
    assert bor[:, :, 1:-1, 1:-1].abs().sum() == 0  # nothing drawn inside the frame
    with pytest.raises(ValueError, match="kind"):
        D.apply_cue(img, cues, "stripes")


def test_cue_only_accuracy_hand_case():
    c = torch.tensor([0, 0, 0, 1, 1])
    y = torch.tensor([0, 0, 1, 1, 1])
    out = D.cue_only_accuracy(c, y, {"t": (torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1]))}, num_classes=2)
    assert out["train"] == pytest.approx(0.8) and out["t"] == pytest.approx(2 / 3)


def test_config_errors():
    with pytest.raises(ValueError, match="cue_p"):
        D.DigitsCueConfig(cue_p=1.5).validate()
    with pytest.raises(ValueError, match="checkpoints"):
        D.DigitsCueConfig(checkpoints=(5, 2)).validate()
    with pytest.raises(ValueError, match="cue_follows"):
        D.DigitsCueConfig(cue_follows="noisy").validate()


def test_make_cue_data_correlations_and_noise():
    cfg = D.DigitsCueConfig(noise=0.3, cue_p=0.9, ood_draws=2)
    d = D.make_cue_data(cfg, noisy=True, seed=0)
    n, m2 = len(d["y_train"]), len(d["y_test"])
    assert d["x_train"].shape == (n, 3, 8, 8) and d["x_id"].shape == d["x_ood"].shape == (m2, 3, 8, 8)
    assert (d["y_train"] != d["y_train_clean"]).sum().item() == round(0.3 * n)
    assert torch.equal(d["y_train"] != d["y_train_clean"], d["flipped"])
    # Cue correlated in train and ID (cue_follows="clean": with the clean label), broken in OOD.
    assert abs(D.cue_label_agreement(d["cue_train"], d["y_train_clean"]) - 0.9) < 0.03
    assert abs(D.cue_label_agreement(d["cue_id"], d["y_test"]) - 0.9) < 0.04
    assert abs(D.cue_label_agreement(d["cue_ood"], d["y_test"]) - 0.1) < 0.04
    # ID and OOD hold the same digits: where the cues coincide, the images are identical.
    same = d["cue_id"] == d["cue_ood"]
    assert same.any() and torch.equal(d["x_id"][same], d["x_ood"][same])
    assert not torch.equal(d["x_id"][~same][:5], d["x_ood"][~same][:5])
    clean = D.make_cue_data(cfg, noisy=False, seed=0)
    assert torch.equal(clean["y_train"], clean["y_train_clean"]) and torch.equal(clean["y_train_clean"],
                                                                                  d["y_train_clean"])


@pytest.mark.slow  # runs a whole recipe or trains networks (seconds, not milliseconds)
def test_smoke_sweep_contract(tmp_path_factory):
    # The digits sweep of the wrong-line recipe's smoke run (shared with test_wrong_line_recipe: run once).
    out = smoke_run("wrong-line", tmp_path_factory).result.results["digits"]
    assert {"clean", "noisy", "meta"} <= set(out)
    for cond in ("clean", "noisy"):
        rows = out[cond]
        assert len(rows) >= 8
        for r in rows:
            assert isinstance(r["model"], str) and {"arch", "n_train", "epochs"} <= set(r)
            for k in ("id_acc", "ood_acc", "train_acc"):
                assert math.isfinite(r[k]) and 0.0 <= r[k] <= 1.0
        assert len({r["model"] for r in rows}) == len(rows)
        assert {r["epochs"] for r in rows} == set(D.SCALES["smoke"].checkpoints)
    meta = out["meta"]
    assert meta["clean"]["noise_rate_measured"] == 0.0
    assert abs(meta["noisy"]["noise_rate_measured"] - 0.3) < 1e-3
    ag = meta["noisy"]["cue_agreement"]
    assert ag["train_vs_clean"] > 0.85 and ag["id"] > 0.85 and ag["ood"] < 0.15
    co = meta["noisy"]["cue_only_acc"]
    assert co["id"] > 0.85 and co["ood"] < 0.15
    assert meta["wall_s"]["total"] > 0
    json.dumps(out, allow_nan=False)  # results are strict JSON (the recipe writes them to results.json)


@pytest.mark.slow  # runs a whole recipe or trains networks (seconds, not milliseconds)
def test_trainer_runs_evaluate_at_the_checkpoints(tmp_path):
    """The sweep trains through ratelab.train.Trainer: one row per checkpoint epoch, with the Trainer's step count
    (batch 128, the ragged tail of each epoch dropped), and every run directory kept without its checkpoint."""
    cfg = D.DigitsCueConfig(archs=(("mlp-16", "mcr2_mlp_small", {"hidden": 16}),), n_train=(300,),
                            checkpoints=(2, 4, 6), ood_draws=1)
    out = D.digits_sweep(tmp_path, cfg, seed=1, device="cpu")
    rows = out["noisy"]
    assert [r["epochs"] for r in rows] == [2, 4, 6]
    assert [r["step"] for r in rows] == [2 * (300 // 128), 4 * (300 // 128), 6 * (300 // 128)]
    run_dir = tmp_path / "digits_runs" / "noisy" / "mlp-16_n300"
    assert (run_dir / "metrics.jsonl").is_file() and (run_dir / "config.json").is_file()
    assert not (run_dir / "checkpoints").exists()
    assert out["meta"]["mode"] == "custom" and out["meta"]["torch_threads"] == 1


@pytest.mark.slow  # runs a whole recipe or trains networks (seconds, not milliseconds)
def test_determinism_same_seed():
    cfg = D.DigitsCueConfig(archs=(("mlp-16", "mcr2_mlp_small", {"hidden": 16}),), n_train=(600,),
                            checkpoints=(1, 4), ood_draws=1)
    a = D.digits_sweep(None, cfg, seed=3, device="cpu")
    b = D.digits_sweep(None, cfg, seed=3, device="cpu")
    keys = ("model", "id_acc", "ood_acc", "train_acc", "memorized")

    def table(rows):  # nan -> None so that equal nans compare equal
        return [[None if isinstance(r[k], float) and math.isnan(r[k]) else r[k] for k in keys] for r in rows]

    for cond in ("clean", "noisy"):
        assert table(a[cond]) == table(b[cond])
    # The accuracies move between checkpoints, so equality above is not trivially about untrained models.
    assert a["noisy"][0]["train_acc"] != a["noisy"][1]["train_acc"]
    assert a["clean"][0]["memorized"] is None and a["noisy"][0]["memorized"] is not None
    with pytest.raises(ValueError, match="config must be"):
        D.digits_sweep(None, "medium")
