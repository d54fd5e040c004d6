"""Every registered model name: the uniform model API and the save/load round trip.

For each name of ``ratelab.list_models()``:

* at full size on the meta device (no memory): ``model_args`` is JSON and ``entrypoint(**model_args)`` rebuilds the
  same architecture (config, parameter names and shapes);
* at a tiny size (the big entries get small depth/width/image overrides, the test-sized ones none): create ->
  forward -> ``save_model`` -> ``load_model`` -> identical outputs and ``model_args``;
  ``forward_head(forward_features)`` equals ``forward`` (masked autoencoders, which have no head, instead: the
  ``(loss, pred, mask)`` of a fixed masking noise, the encoder's features, and no classifier);
  ``forward_intermediates`` gives ``final == forward_features``, one intermediate per kept layer in the family's
  formats, attention maps where the family has them, and its errors.
"""

from __future__ import annotations

import json

import pytest
import torch

import ratelab
from ratelab.core.checkpoint import load_model, save_model
from ratelab.core.registry import model_entrypoint, registered_family

torch.set_num_threads(1)
NAMES = ratelab.list_models()
B = 2

# Formats each family supports, the default first (docs/models.md, "Model API").
FORMATS = {"crate": ("NLC", "NCHW"), "crate_alpha": ("NLC", "NCHW"), "adventurer": ("NLC", "NCHW"),
           "icl_gpt": ("NLC",), "mcr2_nets": None,
           "crate_mae": ("NLC", "NCHW"), "mae_vit": ("NLC", "NCHW"), "var": ("NLC",),
           "dpcap": ("NLC", "NCHW")}
# Masked autoencoders: ``model(x, mask_ratio, noise) -> (loss, pred, mask)``, no classifier head.
MAE_FAMILIES = ("crate_mae", "mae_vit")


def _family(name: str) -> str:
    return registered_family(name)


def _is_scale_ar(model) -> bool:
    from ratelab.models.var.var import ScaleAR

    return isinstance(model, ScaleAR)


def _is_tokenizer(model) -> bool:
    from ratelab.models.var.vqvae import VQVAE

    return isinstance(model, VQVAE)


def _tiny_overrides(name: str) -> dict:
    """Small depth/width/image for the ImageNet-sized entries (same code path, a fraction of the cost)."""
    if name.startswith("var_vae"):  # VAR's tokenizer: ch 16, f2, 8 px images
        return {"ch": 16, "vocab_size": 16, "z_channels": 8, "ch_mult": [1, 2], "patch_nums": [1, 2, 4]}
    if name.startswith(("var_d", "mvar_d")):  # VAR / M-VAR generators (up to 3.66B at full size)
        tiny = {"depth": 2, "embed_dim": 32, "num_heads": 2, "patch_nums": [1, 2, 3], "vocab_size": 16}
        return {**tiny, **({"d_state": 8, "headdim": 16} if name.startswith("mvar_") else {})}
    if not name.endswith("_224"):
        return {}
    with torch.device("meta"):
        cfg = ratelab.create_model(name).cfg
    fam = _family(name)
    mae = {"crate_mae": {"num_heads": 2, "decoder_depth": 2},
           "mae_vit": {"num_heads": 2, "decoder_depth": 2, "decoder_embed_dim": 32, "decoder_num_heads": 2},
           "dpcap": {"num_heads": 2, "decoder_depth": 1, "vocab_size": 64, "bos_id": 2, "eos_id": 3}}
    return {"depth": 2, "embed_dim": 64, "img_size": 2 * cfg.patch_size,
            **({"num_heads": 2} if fam in ("crate", "crate_alpha") else {}), **mae.get(fam, {})}


def _is_captioner(model) -> bool:
    return hasattr(model, "generate") and hasattr(model, "bos_id")


def _inputs(model) -> tuple:
    g = torch.Generator().manual_seed(0)
    if _is_tokenizer(model):  # VAR's tokenizer: images in [-1, 1]
        return (torch.rand(B, model.in_chans, model.img_size, model.img_size, generator=g) * 2 - 1,)
    if _is_captioner(model):  # DP-Cap: (images, caption tokens starting with BOS)
        tokens = torch.randint(4, model.cfg.vocab_size, (B, 5), generator=g)
        tokens[:, 0] = model.bos_id
        return (torch.randn(B, model.in_chans, model.img_size, model.img_size, generator=g), tokens)
    if _is_scale_ar(model):  # VAR / M-VAR: (labels, teacher-forcing input)
        return (torch.randint(0, model.num_classes, (B,), generator=g),
                torch.randn(B, model.L - model.first_l, model.c_vae, generator=g))
    if hasattr(model, "vocab_size"):  # icl_gpt: (x, y) few-shot sequences
        n = 5
        return (torch.randn(B, n, model.cfg.input_dim, generator=g),
                torch.randint(0, model.vocab_size, (B, n), generator=g))
    return (torch.randn(B, model.in_chans, model.img_size, model.img_size, generator=g),)


@pytest.mark.parametrize("name", NAMES)
def test_model_args_rebuild_the_full_size_architecture(name):
    with torch.device("meta"):
        model = ratelab.create_model(name)
        assert json.loads(json.dumps(model.model_args)) == model.model_args
        again = model_entrypoint(name)(**model.model_args)
    assert again.cfg == model.cfg
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def _mae_forward(model, x):
    n = model.patchify(x).shape[1]
    noise = torch.rand(x.shape[0], n, generator=torch.Generator().manual_seed(1))
    return model(x, mask_ratio=0.75, noise=noise)


def _check_mae(model, x):
    loss, pred, mask = out = _mae_forward(model, x)
    patches = model.patchify(x)
    n = patches.shape[1]
    assert loss.ndim == 0 and torch.isfinite(loss) and torch.isfinite(pred).all()
    assert pred.shape == patches.shape and mask.shape == (B, n)
    assert (mask.sum(1) == n - int(n * 0.25)).all()
    assert model.forward_features(x).shape == (B, n + 1, model.num_features)
    assert model.num_classes is None and not hasattr(model, "forward_head")
    return out


@pytest.mark.parametrize("name", NAMES)
def test_forward_save_load_round_trip(name, tmp_path):
    torch.manual_seed(0)
    model = ratelab.create_model(name, **_tiny_overrides(name)).eval()
    inputs = _inputs(model)
    mae = _family(name) in MAE_FAMILIES
    tok = _is_tokenizer(model)
    with torch.no_grad():
        if tok:  # no classifier: the latent, the token maps and the decoded images
            out = _tokenizer_forward(model, *inputs)
        elif mae:
            out = _check_mae(model, *inputs)
        else:
            out = model(*inputs)
            assert torch.isfinite(out).all()
            head_args = inputs[:1] if _is_scale_ar(model) else ()  # VAR's head is conditioned on the labels
            if _is_captioner(model):  # the head reads the decoder's states of the features and the tokens
                states = model.forward_decoder(model.forward_features(inputs[0]), inputs[1])
                torch.testing.assert_close(model.forward_head(states), out, atol=0, rtol=0)
            else:
                torch.testing.assert_close(model.forward_head(model.forward_features(*inputs), *head_args), out,
                                           atol=0, rtol=0)
    save_model(model, tmp_path)
    again = load_model(tmp_path).eval()
    assert type(again) is type(model) and again.model_args == model.model_args
    with torch.no_grad():
        again_out = _tokenizer_forward(again, *inputs) if tok else _mae_forward(again, *inputs) if mae else \
            again(*inputs)
        torch.testing.assert_close(again_out, out, atol=0, rtol=0)


def _tokenizer_forward(model, x):
    idx = model.img_to_idx(x)
    rec = model.idx_to_img(idx)
    assert [t.shape for t in idx] == [(B, p * p) for p in model.patch_nums] and rec.shape == x.shape
    assert torch.isfinite(rec).all() and rec.abs().max() <= 1
    return (model.forward_features(x), *idx, rec)


def _check_tokenizer(model, inputs):
    x = inputs[0]
    final, inter = model.forward_intermediates(x)
    torch.testing.assert_close(final, model.forward_features(x), atol=0, rtol=0)
    s, ch = model.img_size, model.cfg.ch
    assert [t.shape for t in inter] == [(B, ch * m, s >> i, s >> i) for i, m in enumerate(model.cfg.ch_mult)]
    for bad in ({"norm": True}, {"return_attn": True}):
        with pytest.raises(ValueError, match="has no"):
            model.forward_intermediates(x, **bad)
    return len(inter)


def _check_token_family(model, inputs, fam):
    x = inputs[0]
    feats = model.forward_features(*inputs)
    depth = len(model.blocks)
    final, inter = model.forward_intermediates(*inputs)
    torch.testing.assert_close(final, feats, atol=0, rtol=0)
    assert len(inter) == depth
    if fam == "icl_gpt" or _is_scale_ar(model):
        assert all(t.shape == feats.shape for t in inter)  # (B, 2n, D): every token, no prefix
        torch.testing.assert_close(inter[-1], final, atol=0, rtol=0)
        n_tokens = feats.shape[1]
    else:
        p = model.cfg.patch_size
        h, w = x.shape[-2] // p, x.shape[-1] // p
        D = model.num_features
        assert all(t.shape == (B, h * w, D) for t in inter)  # patch tokens, the class token split off
        _, maps = model.forward_intermediates(*inputs, output_fmt="NCHW")
        assert all(m.shape == (B, D, h, w) for m in maps)
        torch.testing.assert_close(maps[-1].flatten(2).transpose(1, 2), inter[-1], atol=0, rtol=0)
        n_tokens = h * w + model.num_prefix_tokens
    _, _, attn = model.forward_intermediates(*inputs, indices=1, return_attn=True)
    assert len(attn) == 1 and attn[0].shape[0] == B and attn[0].shape[-2:] == (n_tokens, n_tokens)
    normed = model.forward_intermediates(*inputs, indices=[-1], norm=True, intermediates_only=True)
    assert isinstance(normed, list) and normed[0].shape == inter[-1].shape
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(*inputs, output_fmt="NHWC")
    return depth


def _check_mcr2(model, inputs):
    x = inputs[0]
    feats = model.forward_features(x)
    final, inter = model.forward_intermediates(x)
    torch.testing.assert_close(final, feats, atol=0, rtol=0)
    if hasattr(model, "features"):  # CNN: three conv stages, NCHW by default
        w, s = model.cfg.width, model.img_size
        assert [t.shape for t in inter] == [(B, w, s, s), (B, w, s, s), (B, 2 * w, s // 2, s // 2)]
        _, flat = model.forward_intermediates(x, output_fmt="NLC")
        assert flat[-1].shape == (B, (s // 2) ** 2, 2 * w)
    else:  # MLP: two hidden layers
        assert [t.shape for t in inter] == [(B, model.cfg.hidden), (B, model.cfg.hidden // 2)]
        torch.testing.assert_close(inter[-1], feats, atol=0, rtol=0)
    for bad in ({"norm": True}, {"return_attn": True}):
        with pytest.raises(ValueError, match="has no"):
            model.forward_intermediates(x, **bad)
    return len(inter)


@pytest.mark.parametrize("name", NAMES)
def test_forward_intermediates_contract(name):
    torch.manual_seed(0)
    model = ratelab.create_model(name, **_tiny_overrides(name)).eval()
    inputs = _inputs(model)[:1] if _is_captioner(model) else _inputs(model)  # the encoder sees images only
    fam = _family(name)
    assert fam in FORMATS, f"{name}: family {fam!r} has no entry here; add its formats to FORMATS"
    with torch.no_grad():
        if _is_tokenizer(model):
            depth = _check_tokenizer(model, inputs)
        else:
            depth = _check_mcr2(model, inputs) if fam == "mcr2_nets" else _check_token_family(model, inputs, fam)
        _, last = model.forward_intermediates(*inputs, indices=1)
        _, every = model.forward_intermediates(*inputs)
        assert len(last) == 1
        torch.testing.assert_close(last[0], every[-1], atol=0, rtol=0)
        only = model.forward_intermediates(*inputs, indices=[0, -1], intermediates_only=True)
        assert len(only) == (1 if depth == 1 else 2)
    with pytest.raises(ValueError, match=f"out of range.*{depth}"):
        model.forward_intermediates(*inputs, indices=[depth])
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(*inputs, indices=0)
