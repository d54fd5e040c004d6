"""DP-Cap captioner: parameter count of the released size, the architecture against an independent reference written
from the released code, causality, per-sample losses, generation (greedy, beam against exhaustive search)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import ratelab
from ratelab.core.errors import ConfigError
from ratelab.models.dpcap import DPCap, caption_loss, sincos_pos_embed_1d

torch.set_num_threads(1)


def _tiny(**kw) -> DPCap:
    torch.manual_seed(0)
    return ratelab.create_model("test_dpcap", **kw).eval()


def _tokens(B: int, L: int, V: int = 40, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(5, V, (B, L), generator=g)
    t[:, 0] = 2
    return t


def test_base_has_189_8m_trainable_parameters_with_the_stated_breakdown():
    with torch.device("meta"):
        m = ratelab.create_model("dpcap_base_patch16_224")
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert trainable == 189_774_138 and round(trainable / 1e6, 1) == 189.8
    assert m.param_breakdown() == {"encoder": 85_618_944, "bridge": 590_592, "decoder": 56_650_752,
                                   "text_embedding": 23_440_896, "head": 23_472_954, "total": 189_774_138}
    # closed forms: a ViT block without qkv bias 12d^2 + 10d; a decoder layer 8d^2 + 2 d (4d) + 6d (3 LayerNorms)
    d, V = 768, 30522
    assert sum(p.numel() for p in m.blocks[0].parameters()) == 12 * d * d + 10 * d
    assert sum(p.numel() for p in m.decoder.layers[0].parameters()) == 8 * d * d + 8 * d * d + 6 * d
    assert m.head.weight.shape == (V, d) and m.text_embed.weight.shape == (V, d)
    frozen = sorted(n for n, p in m.named_parameters() if not p.requires_grad)
    assert frozen == sorted(["cls_token", "pos_embed", "encoder_image_type_embedding", "decoder_pos_embed",
                             "decoder_image_type_embedding", "text_pos_embed", "decoder_text_type_embedding"])


@pytest.mark.parametrize("name,width,heads", [("dpcap_tiny_patch16_224", 384, 6), ("dpcap_small_patch16_224", 576, 12)])
def test_released_sizes(name, width, heads):
    with torch.device("meta"):
        m = ratelab.create_model(name)
    assert (m.cfg.embed_dim, m.cfg.num_heads, m.cfg.depth) == (width, heads, 12)
    assert (m.cfg.decoder_dim, m.cfg.decoder_depth, m.cfg.vocab_size) == (width, 6, 30522)


def test_no_biases_where_the_release_has_none_no_batchnorm_untied_head():
    m = _tiny()
    assert all(blk.attn.qkv.bias is None for blk in m.blocks)
    lin = [mod for mod in m.decoder.modules() if isinstance(mod, torch.nn.Linear)]
    assert lin and all(mod.bias is None for mod in lin)
    assert m.decoder_embed.bias is not None and m.head.bias is not None  # bridge and head keep theirs
    assert not any(isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) for mod in m.modules())
    assert m.head.weight.data_ptr() != m.text_embed.weight.data_ptr()


def _ln(x, w, b, eps):
    return F.layer_norm(x, x.shape[-1:], w, b, eps)


def _mha(q, k, v, H, causal):
    B, Lq, C = q.shape
    hd = C // H
    q, k, v = (t.reshape(B, t.shape[1], H, hd).transpose(1, 2) for t in (q, k, v))
    s = q @ k.transpose(-1, -2) / math.sqrt(hd)
    if causal:
        s = s.masked_fill(torch.ones(Lq, Lq, dtype=torch.bool).tril().logical_not(), float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2).reshape(B, Lq, C)


def reference_forward(sd: dict, imgs: torch.Tensor, tokens: torch.Tensor, *, depth: int, dec_depth: int, H: int,
                      Hd: int, p: int) -> torch.Tensor:
    """The released MaskedAutoencoderViT_autoregressive.forward (mask ratio 0) and its decoder, written from the
    official models_mae.py / torch_transformer.py on plain tensors (our key names)."""
    x = F.conv2d(imgs, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    x = x + sd["pos_embed"][:, 1:]
    cls = (sd["cls_token"] + sd["pos_embed"][:, :1]).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], 1) + sd["encoder_image_type_embedding"]
    for i in range(depth):
        b = f"blocks.{i}."
        h = _ln(x, sd[b + "norm1.weight"], sd[b + "norm1.bias"], 1e-6)
        q, k, v = F.linear(h, sd[b + "attn.qkv.weight"]).chunk(3, -1)
        x = x + F.linear(_mha(q, k, v, H, False), sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        h = _ln(x, sd[b + "norm2.weight"], sd[b + "norm2.bias"], 1e-6)
        h = F.gelu(F.linear(h, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"]))
        x = x + F.linear(h, sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
    x = _ln(x, sd["norm.weight"], sd["norm.bias"], 1e-6)
    mem = F.linear(x, sd["decoder_embed.weight"], sd["decoder_embed.bias"]) + sd["decoder_pos_embed"]
    mem = mem + sd["decoder_image_type_embedding"]
    t = sd["text_embed.weight"][tokens] + sd["text_pos_embed"][:, : tokens.shape[1]] + sd["decoder_text_type_embedding"]
    for i in range(dec_depth):
        b = f"decoder.layers.{i}."
        q, k, v = F.linear(t, sd[b + "self_attn.c_attn.weight"]).chunk(3, -1)
        t = _ln(t + F.linear(_mha(q, k, v, Hd, True), sd[b + "self_attn.c_proj.weight"]),
                sd[b + "norm1.weight"], sd[b + "norm1.bias"], 1e-5)
        q = F.linear(t, sd[b + "multihead_attn.q_proj.weight"])
        k, v = F.linear(mem, sd[b + "multihead_attn.kv_proj.weight"]).chunk(2, -1)
        t = _ln(t + F.linear(_mha(q, k, v, Hd, False), sd[b + "multihead_attn.c_proj.weight"]),
                sd[b + "norm2.weight"], sd[b + "norm2.bias"], 1e-5)
        h = F.linear(F.gelu(F.linear(t, sd[b + "linear1.weight"])), sd[b + "linear2.weight"])
        t = _ln(t + h, sd[b + "norm3.weight"], sd[b + "norm3.bias"], 1e-5)
    t = _ln(t, sd["head_norm.weight"], sd["head_norm.bias"], 1e-5)
    return F.linear(t, sd["head.weight"], sd["head.bias"])


@pytest.mark.parametrize("backend", ["sdpa", "ref"])
def test_forward_equals_the_reference_written_from_the_released_code(backend):
    m = _tiny(attn_backend=backend)
    with torch.no_grad():  # non-trivial LayerNorm affine and biases, so every term is exercised
        for n, p in m.named_parameters():
            if p.requires_grad and ("norm" in n or n.endswith("bias")):
                p.add_(0.1 * torch.randn_like(p))
    imgs, tokens = torch.randn(2, 3, 8, 8), _tokens(2, 6)
    ref = reference_forward(m.state_dict(), imgs, tokens, depth=2, dec_depth=2, H=2, Hd=2, p=4)
    torch.testing.assert_close(m(imgs, tokens), ref, atol=1e-5, rtol=1e-5)


def test_sdpa_and_reference_attention_agree_in_outputs_and_gradients():
    imgs, tokens = torch.randn(3, 3, 8, 8), _tokens(3, 7)
    outs = []
    for backend in ("sdpa", "ref"):
        m = _tiny(attn_backend=backend).train()
        loss = m.loss(imgs, tokens).sum()
        loss.backward()
        outs.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-6, rtol=1e-6)
    assert outs[0][1].keys() == outs[1][1].keys()
    for n in outs[0][1]:
        torch.testing.assert_close(outs[0][1][n], outs[1][1][n], atol=1e-5, rtol=1e-4, msg=n)


def test_sincos_tables():
    t = sincos_pos_embed_1d(8, 5)[0]
    m, k = 3, 1
    assert t.shape == (5, 8)
    assert t[m, k].item() == pytest.approx(math.sin(m / 10000 ** (k / 4)), abs=1e-6)
    assert t[m, 4 + k].item() == pytest.approx(math.cos(m / 10000 ** (k / 4)), abs=1e-6)
    m_ = _tiny()
    torch.testing.assert_close(m_.text_pos_embed, sincos_pos_embed_1d(32, 16))


def test_decoder_is_causal_and_images_matter():
    m = _tiny()
    imgs, tokens = torch.randn(2, 3, 8, 8), _tokens(2, 8)
    other = tokens.clone()
    other[:, 5:] = _tokens(2, 3, seed=7)
    with torch.no_grad():
        a, b = m(imgs, tokens), m(imgs, other)
        torch.testing.assert_close(a[:, :5], b[:, :5], atol=0, rtol=0)  # positions <= 4 never see tokens >= 5
        assert not torch.allclose(a[:, 5:], b[:, 5:])
        assert not torch.allclose(m(imgs.flip(0), tokens), a)


def test_caption_loss_is_a_per_caption_mean_over_non_pad_targets():
    m = _tiny()
    imgs, tokens = torch.randn(3, 3, 8, 8), _tokens(3, 8)
    tokens[0, 4], tokens[0, 5:] = 3, 0  # [BOS] w w w [SEP] pad pad pad
    tokens[1, 7] = 3
    with torch.no_grad():
        logits = m(imgs, tokens)
        per = caption_loss(logits, tokens)
        manual = []
        for i in range(3):
            n = int((tokens[i, 1:] != 0).sum())
            manual.append(F.cross_entropy(logits[i, :n], tokens[i, 1:n + 1]))
        torch.testing.assert_close(per, torch.stack(manual))
        # an example's loss is the same alone or in a batch (nothing mixes examples)
        torch.testing.assert_close(m.loss(imgs[:1], tokens[:1]), per[:1], atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="no token after BOS"):
        caption_loss(logits, torch.cat([tokens[:, :1], torch.zeros_like(tokens[:, 1:])], 1))


def test_per_sample_gradients_only_see_their_own_example():
    m = _tiny().train()
    imgs, tokens = torch.randn(2, 3, 8, 8), _tokens(2, 6)
    imgs.requires_grad_(True)
    m.loss(imgs, tokens)[0].backward()
    assert imgs.grad[0].abs().sum() > 0 and imgs.grad[1].abs().sum() == 0


def test_features_forward_features_and_intermediates():
    m = _tiny()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ff = m.forward_features(x)
        assert ff.shape == (2, 5, 32)
        torch.testing.assert_close(m.features(x), ff.mean(1))
        final, inter = m.forward_intermediates(x)
        torch.testing.assert_close(final, ff, atol=0, rtol=0)
        assert len(inter) == 2 and inter[0].shape == (2, 4, 32)
        _, maps = m.forward_intermediates(x, output_fmt="NCHW")
        assert maps[-1].shape == (2, 32, 2, 2)
        _, _, attn = m.forward_intermediates(x, indices=1, return_attn=True)
        assert attn[0].shape == (2, 2, 5, 5)
        assert m.features(torch.randn(1, 3, 16, 16)).shape == (1, 32)  # another grid: its own sin-cos table


def test_generate_greedy_matches_stepwise_argmax_and_stops_at_eos():
    m = _tiny()
    x = torch.randn(3, 3, 8, 8)
    out = m.generate(x, max_len=6)
    assert out.shape[0] == 3 and out.shape[1] <= 6 and (out[:, 0] == m.bos_id).all()
    with torch.no_grad():
        for i in range(3):
            seq = [m.bos_id]
            while len(seq) < 6 and seq[-1] != m.eos_id:
                seq.append(int(m(x[i:i + 1], torch.tensor([seq]))[0, -1].argmax()))
            row = out[i].tolist()
            assert row[:len(seq)] == seq and all(t == m.pad_id for t in row[len(seq):])
    # a head that always says EOS ends every caption after one token
    with torch.no_grad():
        m.head.bias.fill_(-1e4)
        m.head.bias[m.eos_id] = 1e4
    assert m.generate(x, max_len=6).tolist() == [[m.bos_id, m.eos_id]] * 3


def test_beam_search_finds_the_exhaustive_best_and_one_beam_is_greedy():
    m = _tiny()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(m.generate(x, 5, method="beam", num_beams=1), m.generate(x, 5))
    V = m.cfg.vocab_size
    beam = m.generate(x, max_len=3, method="beam", num_beams=V * V)
    with torch.no_grad():
        for i in range(2):
            # every caption of at most 3 tokens: [BOS] EOS, and [BOS] a b (b any, a != EOS)
            two = torch.tensor([[m.bos_id, m.eos_id]])
            a, b = torch.meshgrid(torch.arange(V), torch.arange(V), indexing="ij")
            three = torch.stack([torch.full((V * V,), m.bos_id), a.flatten(), b.flatten()], 1)
            three = three[three[:, 1] != m.eos_id]

            def score(seqs, i=i):
                lp = m(x[i:i + 1].expand(len(seqs), -1, -1, -1), seqs).log_softmax(-1)
                return lp[:, :-1].gather(2, seqs[:, 1:, None])[..., 0].sum(1)

            s2, s3 = score(two), score(three)
            best = two[0].tolist() if s2.max() >= s3.max() else three[s3.argmax()].tolist()
            assert [t for t in beam[i].tolist() if t != m.pad_id] == best


def test_bad_arguments_are_named():
    with pytest.raises(ConfigError, match="num_classes"):
        ratelab.create_model("test_dpcap", num_classes=10)
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        ratelab.create_model("test_dpcap", bos_id=101)
    m = _tiny()
    with pytest.raises(ValueError, match="max_text_len"):
        m(torch.randn(1, 3, 8, 8), _tokens(1, 17))
    with pytest.raises(ValueError, match="method"):
        m.generate(torch.randn(1, 3, 8, 8), 5, method="sample")
    with pytest.raises(ValueError, match="images"):
        m(torch.randn(2, 3, 8, 8), _tokens(3, 4))
