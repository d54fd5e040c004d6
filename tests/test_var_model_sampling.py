"""top-k / top-p filters of VAR's sampler on hand-made cases, and the residual codec's update."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ratelab.models.var.sampling import ResidualCodec, sample_top_k_top_p, top_k_top_p_mask


def test_top_k_keeps_the_k_largest_and_ties():
    logits = torch.tensor([[[1.0, 5.0, 3.0, 4.0, 0.0]]])
    assert top_k_top_p_mask(logits, top_k=2).tolist() == [[[False, True, False, True, False]]]
    tied = torch.tensor([[[2.0, 2.0, 1.0]]])
    assert top_k_top_p_mask(tied, top_k=1).tolist() == [[[True, True, False]]]  # ties at the threshold stay
    assert top_k_top_p_mask(logits, top_k=0).all()
    assert top_k_top_p_mask(logits, top_k=99).all()


def test_top_p_on_hand_probabilities():
    # probabilities 0.5, 0.3, 0.15, 0.05: ascending cumsum 0.05, 0.20, 0.50, 1.0
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = p.log()[None, None]
    # p = 0.8 drops tokens whose cumulative mass <= 0.2: the 0.05 and the 0.15 ones
    assert top_k_top_p_mask(logits, top_p=0.8).tolist() == [[[True, True, False, False]]]
    # p = 0.96 drops only mass <= 0.04: nothing here
    assert top_k_top_p_mask(logits, top_p=0.96).all()
    # a tiny p keeps the argmax only (never everything removed)
    assert top_k_top_p_mask(logits, top_p=1e-6).tolist() == [[[True, False, False, False]]]


def test_top_k_then_top_p_renormalizes_after_k():
    p = torch.tensor([0.4, 0.3, 0.2, 0.1])
    logits = p.log()[None, None]
    # after top-2 the masses are 4/7, 3/7; top_p = 0.5 drops mass <= 0.5 -> the 3/7 token goes too
    assert top_k_top_p_mask(logits, top_k=2, top_p=0.5).tolist() == [[[True, False, False, False]]]
    assert top_k_top_p_mask(logits, top_k=2, top_p=0.7).tolist() == [[[True, True, False, False]]]


def test_sampling_respects_the_mask_and_the_seed():
    torch.manual_seed(0)
    logits = torch.randn(2, 50, 30)
    keep = top_k_top_p_mask(logits, top_k=7, top_p=0.8)
    g = torch.Generator().manual_seed(1)
    idx = sample_top_k_top_p(logits, 7, 0.8, generator=g)
    assert idx.shape == (2, 50)
    assert keep.gather(-1, idx[..., None]).all()
    again = sample_top_k_top_p(logits, 7, 0.8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(idx, again)


def test_residual_codec_update():
    E = torch.randn(6, 4)
    codec = ResidualCodec(E, (1, 2, 4))
    f = torch.zeros(1, 4, 4, 4)
    h = E[[3]].T.reshape(1, 4, 1, 1)
    f, nxt = codec.next_input(0, f, h)
    torch.testing.assert_close(f, F.interpolate(h, size=(4, 4), mode="bicubic"))
    torch.testing.assert_close(nxt, F.interpolate(f, size=(2, 2), mode="area"))
    last = torch.randn(1, 4, 4, 4)
    f2, out = codec.next_input(2, f, last)  # the last scale is added without resizing
    torch.testing.assert_close(f2, f + last)
    assert out is f2
