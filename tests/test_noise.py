"""Label noise (ratelab.data.noise): rates, nesting, determinism, masks, and bit-compatibility with the three
inline implementations it replaced (reproduced here as reference twins, so the recipes' numbers stay the same)."""

from __future__ import annotations

import pytest
import torch

from ratelab.data.noise import (
    RelabeledDataset,
    asymmetric_noise,
    next_class_target,
    symmetric_noise,
)

# ---- reference twins: the implementations the recipes and the few-shot data used before -------------------------


def _ref_mcr2_corrupt_labels(labels, fraction, num_classes, seed):
    # recipes/mcr2/label_noise.py (official MCR² protocol: redraw from all classes)
    n = labels.shape[0]
    g = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(n, generator=g)
    redraw = torch.randint(0, num_classes, (n,), generator=g)
    out = labels.clone().long()
    chosen = order[: int(round(fraction * n))]
    out[chosen] = redraw[chosen]
    return out


def _ref_flip_labels(labels, rate, generator, num_classes=10):
    # recipes/wrong_line/digits.py (exact count, to another class)
    n = labels.shape[0]
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[torch.randperm(n, generator=generator)[: int(round(rate * n))]] = True
    shift = torch.randint(1, num_classes, (n,), generator=generator)
    return torch.where(flipped, (labels + shift) % num_classes, labels), flipped


def _ref_corrupt_classes(cls, num_classes, p, gen):
    # data/fewshot.py (each label independently, to another class)
    flip = torch.rand(cls.shape, generator=gen) < p
    shift = torch.randint(1, num_classes, cls.shape, generator=gen)
    return torch.where(flip, (cls + shift) % num_classes, cls)


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.4, 1.0])
def test_matches_the_implementations_it_replaced(rate):
    y = torch.randint(0, 10, (1000,), generator=torch.Generator().manual_seed(7))
    assert torch.equal(symmetric_noise(y, rate, 10, generator=3, to="any").labels,
                       _ref_mcr2_corrupt_labels(y, rate, 10, 3))
    new, mask = symmetric_noise(y, rate, 10, generator=torch.Generator().manual_seed(5))
    ref, ref_flipped = _ref_flip_labels(y, rate, torch.Generator().manual_seed(5))
    assert torch.equal(new, ref) and torch.equal(mask, ref_flipped)
    k = 4
    c = y % k
    got = symmetric_noise(c, rate, k, generator=torch.Generator().manual_seed(9), selection="bernoulli").labels
    assert torch.equal(got, _ref_corrupt_classes(c, k, rate, torch.Generator().manual_seed(9)))


def test_generator_is_consumed_like_the_reference():
    """Callers that draw more from the same generator afterwards (few-shot demonstrations) see the same stream."""
    y = torch.arange(50) % 5
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    symmetric_noise(y, 0.3, 5, generator=g1, selection="bernoulli")
    _ref_corrupt_classes(y, 5, 0.3, g2)
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))


def test_symmetric_exact_rate_mask_and_nesting():
    y = torch.arange(2000) % 10
    noisy, mask = symmetric_noise(y, 0.3, 10, generator=0)
    assert int(mask.sum()) == 600 and torch.equal(mask, noisy != y)  # "other": every corrupted label is wrong
    assert bool((noisy[~mask] == y[~mask]).all()) and noisy.min() >= 0 and noisy.max() <= 9
    lo = symmetric_noise(y, 0.1, 10, generator=0)
    assert bool((lo.mask <= mask).all())  # nested: the 10% set is inside the 30% set ...
    assert torch.equal(lo.labels[lo.mask], noisy[lo.mask])  # ... with the same new labels
    anyc = symmetric_noise(y, 0.4, 10, generator=3, to="any")
    assert abs(float(anyc.mask.float().mean()) - 0.4 * 0.9) < 0.04  # ~1/K of the redraws land on the true class
    assert torch.equal(anyc.mask, anyc.labels != y)
    assert torch.equal(symmetric_noise(y, 0.0, 10, generator=1).labels, y)
    assert torch.equal(symmetric_noise(y, 0.4, 10, generator=3).labels, symmetric_noise(y, 0.4, 10, generator=3).labels)
    assert not torch.equal(symmetric_noise(y, 0.4, 10, generator=3).labels,
                           symmetric_noise(y, 0.4, 10, generator=4).labels)
    # uniform over the other classes: every wrong class of label 0 gets a share near 1/9
    wrong = noisy[(y == 0) & mask]
    share = torch.bincount(wrong, minlength=10)[1:].float() / len(wrong)
    assert (share - 1 / 9).abs().max() < 0.08 and int(torch.bincount(wrong, minlength=10)[0]) == 0


def test_symmetric_bernoulli_rate():
    y = torch.randint(0, 5, (20_000,), generator=torch.Generator().manual_seed(0))
    out = symmetric_noise(y, 0.25, 5, generator=2, selection="bernoulli")
    assert abs(float(out.mask.float().mean()) - 0.25) < 0.01


def test_asymmetric_noise_per_class_counts_target_and_nesting():
    y = torch.cat([torch.full((n,), c) for c, n in enumerate((100, 50, 30, 20))])
    tgt = [1, 0, 2, 0]  # class 2 stays, 3 -> 0
    out = asymmetric_noise(y, 0.2, tgt, generator=0)
    for c, n in enumerate((100, 50, 30, 20)):
        moved = out.mask & (y == c)
        assert int(moved.sum()) == (0 if c == 2 else round(0.2 * n))
        assert bool((out.labels[moved] == tgt[c]).all())
    assert torch.equal(out.mask, out.labels != y)
    hi = asymmetric_noise(y, 0.5, tgt, generator=0)
    assert bool((out.mask <= hi.mask).all())
    pair = asymmetric_noise(y, 1.0, next_class_target(4), generator=1)
    assert torch.equal(pair.labels, (y + 1) % 4)
    bern = asymmetric_noise(torch.arange(40_000) % 4, 0.3, next_class_target(4), generator=5, selection="bernoulli")
    assert abs(float(bern.mask.float().mean()) - 0.3) < 0.01


def test_errors_name_the_argument():
    y = torch.arange(10) % 3
    with pytest.raises(ValueError, match="rate"):
        symmetric_noise(y, 1.5, 3, generator=0)
    with pytest.raises(ValueError, match="labels must lie in"):
        symmetric_noise(y, 0.1, 2, generator=0)
    with pytest.raises(ValueError, match="1-D"):
        symmetric_noise(y[None], 0.1, 3, generator=0)
    with pytest.raises(ValueError, match="integer"):
        symmetric_noise(y.float(), 0.1, 3, generator=0)
    with pytest.raises(ValueError, match="to must be"):
        symmetric_noise(y, 0.1, 3, generator=0, to="same")
    with pytest.raises(ValueError, match="selection"):
        symmetric_noise(y, 0.1, 3, generator=0, selection="poisson")
    with pytest.raises(TypeError, match="generator"):
        symmetric_noise(y, 0.1, 3, generator=0.5)
    with pytest.raises(ValueError, match="target entries"):
        asymmetric_noise(y, 0.1, [0, 1, 5], generator=0)


def test_relabeled_dataset():
    y = torch.arange(20) % 4
    base = torch.utils.data.TensorDataset(torch.randn(20, 1, 2, 2), y)
    base.num_classes = 4
    new = symmetric_noise(y, 0.5, 4, generator=0).labels
    ds = RelabeledDataset(base, new)
    assert len(ds) == 20 and ds[3][1] == int(new[3]) and torch.equal(ds[3][0], base[3][0])
    assert ds.num_classes == 4 and torch.equal(ds.labels(), new)
    with pytest.raises(ValueError, match="19 labels"):
        RelabeledDataset(base, new[:19])
