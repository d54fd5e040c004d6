"""Generation metrics: the Fréchet distance against closed forms, the offline classifier pair, and the
torch-fidelity wiring (the missing-file error, and a full run on randomly initialized Inception weights)."""

import numpy as np
import pytest
import torch

from ratelab.core.errors import WeightsNotFound
from ratelab.eval.generation import (
    INCEPTION_FILE,
    OFFLINE_NOTE,
    feature_statistics,
    fidelity_metrics,
    fit_feature_classifier,
    frechet_distance,
    offline_generation_metrics,
)


def _spd(d, rng):
    a = rng.standard_normal((d, d))
    return a @ a.T + 0.5 * np.eye(d)


def _closed_form(mu1, s1, mu2, s2):
    # tr((S1 S2)^{1/2}) = tr((S1^{1/2} S2 S1^{1/2})^{1/2}), with symmetric square roots from eigh
    def sqrt_sym(m):
        w, v = np.linalg.eigh(m)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    r = sqrt_sym(s1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(sqrt_sym(r @ s2 @ r)))


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    d = 6
    mu, s = rng.standard_normal(d), _spd(d, rng)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-8
    # diagonal: |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2, also after a common rotation
    a, b = rng.uniform(0.2, 3, d), rng.uniform(0.2, 3, d)
    mu2 = rng.standard_normal(d)
    want = float(np.sum((mu - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))
    assert frechet_distance(mu, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-9)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    assert frechet_distance(mu, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T) == pytest.approx(want, rel=1e-7)
    # general, non-commuting covariances
    s2 = _spd(d, rng)
    assert frechet_distance(mu, s, mu2, s2) == pytest.approx(_closed_form(mu, s, mu2, s2), rel=1e-7)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 1)
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(mu, s, mu[:3], s[:3, :3])


def test_frechet_distance_of_samples():
    g = torch.Generator().manual_seed(0)
    d, n = 4, 20000
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(n, d, generator=g, dtype=torch.float64)
    assert frechet_distance(*feature_statistics(x), *feature_statistics(y)) < 0.01
    scale = torch.tensor([1.0, 2.0, 0.5, 1.0], dtype=torch.float64)
    shift = torch.tensor([1.0, 0.0, 0.0, -1.0], dtype=torch.float64)
    z = torch.randn(n, d, generator=g, dtype=torch.float64) * scale + shift
    want = 2.0 + (2 - 1) ** 2 + (0.5 - 1) ** 2  # |shift|^2 + sum (sqrt(var) - 1)^2
    assert frechet_distance(*feature_statistics(x), *feature_statistics(z)) == pytest.approx(want, abs=0.05)
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(x[:1])


def _blobs(n, seed):
    # two classes of 12 px images: a bright square top-left or bottom-right
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.rand(n, 3, 12, 12, generator=g) * 0.2
    for i in range(n):
        r = slice(1, 6) if y[i] == 0 else slice(6, 11)
        x[i, :, r, r] += 0.7
    return x, y


def test_offline_metrics_rank_good_and_bad_samples():
    x, y = _blobs(256, 0)
    clf = fit_feature_classifier(x, y, epochs=4, batch_size=64)
    real, real_y = _blobs(200, 1)
    good, good_y = _blobs(200, 2)                      # same distribution
    noise = torch.rand(200, 3, 12, 12)                 # not images of the data
    wrong = 1 - good_y                                 # right images, wrong conditioning labels
    m_good = offline_generation_metrics(clf, real, good, good_y, real_labels=real_y)
    m_noise = offline_generation_metrics(clf, real, noise, good_y)
    m_wrong = offline_generation_metrics(clf, real, good, wrong)
    assert m_good["note"] == OFFLINE_NOTE and all(k.startswith("offline_") for k in m_good if k != "note")
    assert m_good["offline_real_acc"] > 0.95 and m_good["offline_class_acc"] > 0.95
    assert m_wrong["offline_class_acc"] < 0.05
    assert m_good["offline_fd"] < 0.2 * m_noise["offline_fd"]
    # deterministic given the seed
    clf2 = fit_feature_classifier(x, y, epochs=4, batch_size=64)
    assert offline_generation_metrics(clf2, real, good)["offline_fd"] == pytest.approx(m_good["offline_fd"])


def test_fidelity_needs_the_inception_file(tmp_path, monkeypatch):
    monkeypatch.setenv("RATELAB_WEIGHTS", str(tmp_path))
    imgs = torch.rand(4, 3, 16, 16)
    with pytest.raises(WeightsNotFound, match="weights-inception-2015-12-05-6726825d.pth") as e:
        fidelity_metrics(imgs, imgs)
    assert str(tmp_path / INCEPTION_FILE) in str(e.value) and "github.com/toshas/torch-fidelity" in str(e.value)
    with pytest.raises(WeightsNotFound, match="elsewhere.pth"):
        fidelity_metrics(imgs, imgs, inception_weights=tmp_path / "elsewhere.pth")


def test_fidelity_wiring_with_random_inception(tmp_path, monkeypatch):
    """The real torch-fidelity pipeline on a randomly initialized Inception file (no download is possible
    here): identical sets give FID ~ 0 and precision = recall = 1; a different set gives FID > 0."""
    pytest.importorskip("torch_fidelity")
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    # build the extractor once without weights to get a state dict of the right layout
    monkeypatch.setattr(fe.torch, "load", lambda *a, **k: {})
    monkeypatch.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
    torch.manual_seed(0)
    net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="x")
    sd = net.state_dict()
    monkeypatch.undo()
    # variance-preserving random weights (the default init fades the signal out over ~50 layers)
    g = torch.Generator().manual_seed(0)
    for k, v in sd.items():
        if k.endswith("conv.weight"):
            sd[k] = torch.randn(v.shape, generator=g) * (2.0 / v[0].numel()) ** 0.5
    path = tmp_path / "inception.pth"
    torch.save(sd, path)
    def no_download(*a, **k):
        pytest.fail("tried to download")

    monkeypatch.setattr(fe, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    g = torch.Generator().manual_seed(0)
    a = torch.rand(4, 3, 16, 16, generator=g)
    b = torch.rand(4, 3, 16, 16, generator=g) * 0.3
    same = fidelity_metrics(a, a, inception_weights=path, isc_splits=2, device="cpu")
    assert set(same) == {"fid", "isc_mean", "isc_std", "precision", "recall"}
    assert abs(same["fid"]) < 1e-3 and same["precision"] == 1.0 and same["recall"] == 1.0
    assert same["isc_mean"] >= 1.0 - 1e-6
    diff = fidelity_metrics(b, a, inception_weights=path, isc=False, device="cpu")
    assert diff["fid"] > 1e-3 and set(diff) == {"fid", "precision", "recall"}
