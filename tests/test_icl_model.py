"""icl_gpt models, the synthetic few-shot data and the "icl" training task."""

from __future__ import annotations

import pytest
import torch

import ratelab.models.icl_gpt  # noqa: F401  (registers icl_gpt_*)
from ratelab.core.checkpoint import load_model, save_model
from ratelab.core.registry import create_model
from ratelab.data.fewshot import (
    FewShotConfig,
    FewShotSequences,
    corrupt_classes,
    sample_points,
    sample_sequence,
    sample_task,
)
from ratelab.kernels.attention import attention_ref
from ratelab.models.icl_gpt import ICLGPT, ICLGPTConfig

CFG = ICLGPTConfig(embed_dim=16, depth=2, num_heads=2, input_dim=3, vocab_size=6, max_pairs=8)
TOL_REF = dict(rtol=1e-5, atol=1e-5)  # explicit softmax vs SDPA on the same weights (return_attn uses the former)


def _batch(B=3, n=5, cfg=CFG, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, n, cfg.input_dim, generator=g), torch.randint(0, cfg.vocab_size, (B, n), generator=g)


def test_shapes_and_restricted_logits():
    m = ICLGPT(CFG).eval()
    x, y = _batch()
    out = m(x, y)
    assert out.shape == (3, 5, 6)
    words = torch.tensor([4, 1, 2])
    lab = m.label_logits(x, y, words)
    assert lab.shape == (3, 5, 3)
    torch.testing.assert_close(lab, out[..., words])
    per_row = torch.tensor([[0, 1], [5, 3], [2, 4]])
    lab2 = m.label_logits(x, y, per_row)
    for b in range(3):
        torch.testing.assert_close(lab2[b], out[b][:, per_row[b]])
    # The label after the last x is never an input to any prediction: (B, n - 1) labels give the same logits.
    torch.testing.assert_close(m(x, y[:, :-1]), out)


def test_causality():
    m = ICLGPT(CFG).eval()
    x, y = _batch(n=6)
    base = m(x, y)
    j = 3
    x2, y2 = x.clone(), y.clone()
    x2[:, j] += 1.0
    out = m(x2, y2)
    torch.testing.assert_close(out[:, :j], base[:, :j])  # predictions before x_j do not see it
    assert (out[:, j:] - base[:, j:]).abs().max() > 1e-4  # ... and from x_j on they do
    y2 = y.clone()
    y2[:, j] = (y2[:, j] + 1) % CFG.vocab_size
    out = m(x, y2)
    torch.testing.assert_close(out[:, : j + 1], base[:, : j + 1])  # y_j is first visible at x_{j+1}
    assert (out[:, j + 1:] - base[:, j + 1:]).abs().max() > 1e-4


def test_sdpa_matches_reference_outputs_and_grads():
    x, y = _batch(B=2, n=7)
    m = ICLGPT(CFG)
    outs, grads = [], []
    for backend in ("sdpa", "ref"):
        m.set_attn_backend(backend)
        m.zero_grad()
        out = m(x, y)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append([p.grad.clone() for p in m.parameters()])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    q, k, v = torch.randn(3, 1, 2, 4, 5).unbind(0)
    ref = attention_ref(q, k, v, is_causal=True)  # the kernel's reference twin, which the model's "ref" uses
    torch.testing.assert_close(ref[..., 0, :], v[..., 0, :])  # the first token can only attend to itself
    torch.testing.assert_close(ref, torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
    with pytest.raises(ValueError, match="backend"):
        m.set_attn_backend("flash")


def test_features_head_and_intermediates():
    m = ICLGPT(CFG).eval()
    x, y = _batch(n=6)
    with torch.no_grad():
        h = m.forward_features(x, y)  # before the final norm, as every family
        assert h.shape == (3, 12, CFG.embed_dim)
        torch.testing.assert_close(m.forward_head(h), m(x, y), atol=0, rtol=0)
        torch.testing.assert_close(m.forward_head(h, pre_logits=True), m.norm(h)[:, 0::2], atol=0, rtol=0)
        final, inter, attn = m.forward_intermediates(x, y, return_attn=True)
        torch.testing.assert_close(final, h, **TOL_REF)
        assert [t.shape for t in inter] == [(3, 12, CFG.embed_dim)] * CFG.depth
        torch.testing.assert_close(inter[-1], final, atol=0, rtol=0)
        assert [a.shape for a in attn] == [(3, CFG.num_heads, 12, 12)] * CFG.depth
        assert all(torch.equal(a.triu(1), torch.zeros_like(a)) for a in attn)  # causal
        torch.testing.assert_close(attn[0].sum(-1), torch.ones(3, CFG.num_heads, 12))
        # block 0's attention is the explicit causal softmax of its own q and k
        blk = m.blocks[0]
        q, k, _ = blk.attn.qkv(blk.norm1(m._tokens(x, y))).reshape(3, 12, 3, 2, 8).permute(2, 0, 3, 1, 4)
        logits = (q @ k.transpose(-1, -2)) / 8**0.5
        expect = logits.masked_fill(torch.ones(12, 12, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        torch.testing.assert_close(attn[0], expect)
        _, normed = m.forward_intermediates(x, y, indices=[-1], norm=True)
        torch.testing.assert_close(normed[0], m.norm(h), **TOL_REF)
        assert len(m.forward_intermediates(x, y, indices=1, intermediates_only=True)) == 1
    with pytest.raises(ValueError, match="NLC"):
        m.forward_intermediates(x, y, output_fmt="NCHW")
    with pytest.raises(ValueError, match="out of range"):
        m.forward_intermediates(x, y, indices=[2])


def test_bad_inputs():
    m = ICLGPT(CFG)
    x, y = _batch()
    with pytest.raises(ValueError, match="x must be"):
        m(x[..., :2], y)
    with pytest.raises(ValueError, match="y must be"):
        m(x, y[:, :2])
    with pytest.raises(ValueError, match="label tokens"):
        m(x, y + CFG.vocab_size)
    with pytest.raises(ValueError, match="max_pairs"):
        m(*_batch(n=9))
    with pytest.raises(ValueError, match="divisible"):
        ICLGPTConfig(embed_dim=10, num_heads=3)


def test_registry_and_save_load(tmp_path):
    m = create_model("icl_gpt_tiny", input_dim=3, vocab_size=6)
    assert m.cfg.embed_dim == 32 and m.cfg.depth == 2
    assert create_model("icl_gpt_small", num_classes=7).vocab_size == 7
    with pytest.raises(TypeError, match="unexpected"):
        create_model("icl_gpt_tiny", img_size=8)
    save_model(m, tmp_path)
    m2 = load_model(tmp_path).eval()
    x, y = _batch()
    torch.testing.assert_close(m2(x, y), m.eval()(x, y))
    sizes = [sum(p.numel() for p in create_model(f"icl_gpt_{s}").parameters()) for s in ("tiny", "small", "base")]
    assert sizes == sorted(sizes) and len(set(sizes)) == 3


def test_fewshot_generator():
    cfg = FewShotConfig(input_dim=4, vocab_size=6, min_classes=2, max_classes=4, n_pairs=9, label_noise=0.0)
    ds = FewShotSequences(cfg, 10, seed=3)
    x, y = ds[4]
    assert x.shape == (9, 4) and x.dtype == torch.float32 and y.shape == (9,) and y.dtype == torch.int64
    torch.testing.assert_close(ds[4][0], x)  # item i is a function of (seed, i)
    assert not torch.equal(ds[5][0], x)
    assert not torch.equal(FewShotSequences(cfg, 10, seed=4)[4][0], x)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        t = sample_task(cfg, g)
        assert 2 <= t.num_classes <= 4 and len(set(t.label_words.tolist())) == t.num_classes
        xs, ys = sample_sequence(cfg, g, t)
        assert set(ys.tolist()) <= set(t.label_words.tolist())
    # Inputs sit around their class center with the configured spread.
    t = sample_task(cfg, g, num_classes=3)
    xs, cls = sample_points(t, 4000, cfg, g)
    assert abs(float((xs - t.centers[cls]).std()) - cfg.noise_std) < 0.03
    cls = torch.randint(0, 3, (5000,), generator=g)
    flipped = corrupt_classes(cls, 3, 0.3, g)
    changed = flipped != cls
    assert abs(float(changed.float().mean()) - 0.3) < 0.03  # every flip goes to a different class
    with pytest.raises(ValueError, match="max_classes"):
        FewShotConfig(vocab_size=3, max_classes=5)
    with pytest.raises(IndexError):
        ds[10]


def test_icl_task_learns_in_context(tmp_path):
    """A few hundred steps on an easy task: accuracy with 8 demonstrations far above 0-shot (chance) accuracy."""
    from ratelab.train import TrainConfig, Trainer
    from ratelab.train.icl_task import ICLTask

    fs = FewShotConfig(input_dim=4, vocab_size=4, min_classes=2, max_classes=3, noise_std=0.3, n_pairs=9)
    cfg = TrainConfig(task="icl", model="icl_gpt_tiny", max_steps=150, batch_size=32, lr=3e-3, warmup_steps=10,
                      weight_decay=0.0, out_dir=str(tmp_path), ckpt_every=0, eval_every=0, progress=False,
                      log_every=50, device="cpu")
    res = Trainer(cfg, ICLTask(fs, val_sequences=256)).fit()
    assert res["val_acc_0shot"] < 0.45  # no demonstrations: the label words are unknown
    assert res["val_acc_8shot"] > 0.8, res
    assert load_model(tmp_path).cfg.vocab_size == 4
