"""The segmentation recipe at smoke scale (its arms, claims and intervals); the quick figures are in its docstring."""

from __future__ import annotations

import pytest
from _recipe_fixtures import smoke_run


@pytest.mark.slow
def test_segmentation_smoke_writes_results(tmp_path_factory):
    import ratelab.recipes.segmentation.recipe as seg

    run = smoke_run("segmentation", tmp_path_factory)
    data, out = run.saved, run.out_dir
    assert (out / "report.html").is_file() and (out / "maps.png").is_file()
    s = data["summary"]
    arms = seg.SCALES["smoke"].arms
    assert set(data["runs"]) == set(arms)
    for kind in arms:
        assert 0.0 <= s[f"mIoU {kind}"] <= 1.0 and 0.0 <= s[f"MaskCut AP50 {kind}"] <= 1.0
        assert 0.0 <= s[f"mIoU {kind} untrained"] <= 1.0
        assert len(data["runs"][kind]) == seg.SCALES["smoke"].seeds
        assert len(data["runs"][kind][0]["miou_per_layer"]) == seg.SCALES["smoke"].depth
        assert len(data["runs"][kind][0]["init"]["miou_per_layer"]) == seg.SCALES["smoke"].depth
    claims = [c["claim"] for c in data["checks"]]
    for topic in ("emerges with supervised training", "not in supervised ViT", "MaskCut needs MSSA and ISTA",
                  "MSSA alone", "deeper layers"):
        assert sum(topic in c for c in claims) == 1, topic
    # one seed gives no interval: no "beyond its 95% interval" claim can hold at smoke scale
    assert not any(c["holds"] for c in data["checks"] if "95% interval" in c["claim"])


def test_segmentation_models_are_the_named_ablation():
    import ratelab.recipes.segmentation.recipe as seg

    row = seg.SCALES["smoke"]
    built = {k: seg._factory(k, row)() for k in seg.MODELS}
    assert type(built["vit"]).__name__ == "VisionTransformer"
    assert (built["crate-mlp"].cfg.attn, built["crate-mlp"].cfg.mlp) == ("mssa", "mlp")
    assert (built["crate-mhsa"].cfg.attn, built["crate-mhsa"].cfg.mlp) == ("mhsa", "ista")
    assert (built["crate"].cfg.attn, built["crate"].cfg.mlp) == ("mssa", "ista")
    assert type(built["crate-alpha"]).__name__ == "CrateAlpha"
    widths = {k: (m.cfg.embed_dim if hasattr(m, "cfg") else m.embed_dim) for k, m in built.items()}
    assert set(widths.values()) == {row.width}


def test_segmentation_interval_is_welchs_t():
    """The recipe's interval equals scipy's Welch t-test confidence interval (a '2 SE' rule would be 2-6x too
    narrow with 2-3 seeds)."""
    from scipy import stats

    import ratelab.recipes.segmentation.recipe as seg

    a, b = [0.21, 0.19, 0.24], [0.15, 0.16]
    d, half = seg._mean_diff(a, b)
    lo, hi = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert d == pytest.approx((lo + hi) / 2) and half == pytest.approx((hi - lo) / 2)
    assert seg._mean_diff([0.2], b)[1] == float("inf")
