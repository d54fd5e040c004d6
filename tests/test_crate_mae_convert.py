"""Official CRATE-MAE checkpoints (Ma-Lab-Berkeley/CRATE ``model/crate_ae``) and FAIR MAE checkpoints
(facebookresearch/mae ``models_mae``) -> ratelab, against independent references.

The references below are written here from the equations of the papers, with the parameter names and shapes of the
official layouts and MAE's masking done the reference way (gather the kept tokens, append mask tokens, gather back
with ``ids_restore``); ratelab's models compute the same thing by other means (a select, fused ISTA, SDPA), so the
comparisons hold to fp32 rounding. Files are saved the way the official training saves them (``{"model": ...}``).
"""

from __future__ import annotations

import argparse
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn as nn

import ratelab
from ratelab.core.checkpoint import CheckpointError, load_model
from ratelab.models import _pretrained as pt
from ratelab.models.crate_mae.convert import OFFICIAL_KEY_MAP, checkpoint_filter_fn, convert_official, detect_layout
from ratelab.models.mae_vit.convert import FAIR_KEYS

torch.set_num_threads(1)
ATOL = RTOL = 1e-5


# ---- independent references -------------------------------------------------------------------------------------
def sincos_table(dim: int, side: int) -> torch.Tensor:
    """MAE's fixed table from its definition: [CLS] zero row, then per patch (column code | row code)."""
    def code(pos, n):
        freq = 1.0 / 10000 ** (np.arange(n // 2, dtype=np.float64) / (n // 2))
        ang = np.asarray(pos, dtype=np.float64)[:, None] * freq
        return np.concatenate([np.sin(ang), np.cos(ang)], axis=1)

    r, c = np.divmod(np.arange(side * side), side)
    grid = np.concatenate([code(c, dim // 2), code(r, dim // 2)], axis=1)
    return torch.from_numpy(np.concatenate([np.zeros((1, dim)), grid])).float()[None]


def mae_mask_tokens(x, cls, mask_token, noise, keep):
    """MAE's way: kept tokens by ``ids_shuffle``, mask tokens appended, unshuffled by ``ids_restore``."""
    order = noise.argsort(dim=1)
    restore = order.argsort(dim=1)
    kept = x.gather(1, order[:, :keep, None].expand(-1, -1, x.shape[-1]))
    filled = torch.cat([kept, mask_token.expand(x.shape[0], x.shape[1] - keep, -1)], dim=1)
    filled = filled.gather(1, restore[..., None].expand(-1, -1, x.shape[-1]))
    mask = torch.ones(x.shape[:2])
    mask[:, :keep] = 0
    return torch.cat([cls.expand(x.shape[0], -1, -1), filled], 1), mask.gather(1, restore), order, restore


def pixel_patches(imgs, p):
    B, C, H, W = imgs.shape
    return imgs.view(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), -1)


def masked_mse(imgs, pred, mask, p):
    err = ((pred - pixel_patches(imgs, p)) ** 2).mean(-1)
    return (err * mask).sum() / mask.sum()


class Normed(nn.Module):  # the official PreNorm's attributes: norm, fn
    def __init__(self, dim, fn):
        super().__init__()
        self.norm, self.fn = nn.LayerNorm(dim), fn

    def forward(self, x):
        return self.fn(self.norm(x))


class TiedQKV(nn.Module):  # qkv (bias-free), to_out.0 (absent with one full-width head)
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0)) if heads > 1 else nn.Identity()

    def forward(self, x):
        B, N, D = x.shape
        w = self.qkv(x).view(B, N, self.heads, D // self.heads).permute(0, 2, 1, 3)
        a = torch.softmax(torch.einsum("bhid,bhjd->bhij", w, w) * (D // self.heads) ** -0.5, dim=-1)
        return self.to_out(torch.einsum("bhij,bhjd->bihd", a, w).reshape(B, N, D))


class SparseStep(nn.Module):  # weight: D; ReLU(b + eta D^T (b - D b) - eta lambda), tokens as rows
    def __init__(self, dim, eta=0.1, lam=0.5):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim, dim) / dim**0.5)
        self.eta, self.lam = eta, lam

    def forward(self, b):
        return torch.relu(b + self.eta * ((b - b @ self.weight.T) @ self.weight) - self.eta * self.lam)


class LinearDecode(nn.Module):  # weight: D~; y -> D~ y
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim, dim) / dim**0.5)

    def forward(self, y):
        return y @ self.weight.T


class EncoderLayer(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.layers = nn.ModuleList([nn.ModuleList([Normed(dim, TiedQKV(dim, heads)), Normed(dim, SparseStep(dim))])])

    def forward(self, z):
        compress, sparsify = self.layers[0]
        return sparsify(z + compress(z))


class DecoderLayer(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.layers = nn.ModuleList([nn.ModuleList([Normed(dim, LinearDecode(dim)), Normed(dim, TiedQKV(dim, heads))])])

    def forward(self, y):
        decode, compress = self.layers[0]
        y = decode(y)
        return y - compress(y)


class OfficialLayoutCrateMAE(nn.Module):
    """CRATE-MAE in the official key layout; the encoder adds ``decoder_pos_embed`` as the official forward does."""

    def __init__(self, *, img=8, patch=4, chans=3, dim=32, depth=2, heads=2, dec_depth=2, dec_heads=None):
        from timm.layers import PatchEmbed

        super().__init__()
        n = (img // patch) ** 2
        self.p = patch
        self.patch_embed = PatchEmbed(img, patch, chans, dim)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(sincos_table(dim, img // patch), requires_grad=False)
        self.blocks = nn.ModuleList([EncoderLayer(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.decoder_embed = nn.Linear(dim, dim)
        self.mask_token = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.decoder_pos_embed = nn.Parameter(sincos_table(dim, img // patch), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([DecoderLayer(dim, dec_heads or heads) for _ in range(dec_depth)])
        self.decoder_norm = nn.LayerNorm(dim, eps=1e-6)
        self.decoder_pred = nn.Linear(dim, patch * patch * chans)
        assert self.pos_embed.shape[1] == n + 1

    def forward(self, imgs, noise, mask_ratio=0.75):
        x = self.patch_embed(imgs)
        keep = int(x.shape[1] * (1 - mask_ratio))
        z, mask, _, _ = mae_mask_tokens(x, self.cls_token, self.mask_token, noise, keep)
        z = z + self.decoder_pos_embed
        for blk in self.blocks:
            z = blk(z)
        latent = y = self.norm(z)
        for blk in self.decoder_blocks:
            y = blk(y)
        pred = self.decoder_pred(self.decoder_norm(y))[:, 1:]
        return masked_mse(imgs, pred, mask, self.p), pred, mask, latent


class FairLayoutMAE(nn.Module):
    """FAIR's MaskedAutoencoderViT from timm Blocks: masked patches dropped before the encoder."""

    def __init__(self, *, img=8, patch=4, chans=3, dim=32, depth=2, heads=2, dec_dim=16, dec_depth=2, dec_heads=2):
        from timm.layers import PatchEmbed
        from timm.models.vision_transformer import Block

        super().__init__()
        self.p = patch
        ln = partial(nn.LayerNorm, eps=1e-6)
        self.patch_embed = PatchEmbed(img, patch, chans, dim)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(sincos_table(dim, img // patch), requires_grad=False)
        self.blocks = nn.ModuleList([Block(dim, heads, 4.0, qkv_bias=True, norm_layer=ln) for _ in range(depth)])
        self.norm = ln(dim)
        self.decoder_embed = nn.Linear(dim, dec_dim)
        self.mask_token = nn.Parameter(0.02 * torch.randn(1, 1, dec_dim))
        self.decoder_pos_embed = nn.Parameter(sincos_table(dec_dim, img // patch), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([Block(dec_dim, dec_heads, 4.0, qkv_bias=True, norm_layer=ln)
                                             for _ in range(dec_depth)])
        self.decoder_norm = ln(dec_dim)
        self.decoder_pred = nn.Linear(dec_dim, patch * patch * chans)

    def forward(self, imgs, noise, mask_ratio=0.75):
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        B, N, D = x.shape
        keep = int(N * (1 - mask_ratio))
        order = noise.argsort(dim=1)
        restore = order.argsort(dim=1)
        x = x.gather(1, order[:, :keep, None].expand(-1, -1, D))
        x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(B, -1, -1), x], 1)
        for blk in self.blocks:
            x = blk(x)
        latent = self.norm(x)
        y = self.decoder_embed(latent)
        rest = torch.cat([y[:, 1:], self.mask_token.expand(B, N - keep, -1)], 1)
        rest = rest.gather(1, restore[..., None].expand(-1, -1, y.shape[-1]))
        y = torch.cat([y[:, :1], rest], 1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            y = blk(y)
        pred = self.decoder_pred(self.decoder_norm(y))[:, 1:]
        mask = torch.ones(B, N)
        mask[:, :keep] = 0
        mask = mask.gather(1, restore)
        return masked_mse(imgs, pred, mask, self.p), pred, mask, latent


def randomize(module: nn.Module, seed: int = 1) -> nn.Module:
    # Norm gains and biases random too, so a swapped or dropped key changes the output; fixed tables stay sin-cos.
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight") or ".norm1." in name or ".norm2." in name:
                p.copy_(1 + 0.2 * torch.randn_like(p) if p.ndim == 1 else p)
            if name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
    return module.eval()


def crate_mae_reference(seed: int = 0, **kw) -> OfficialLayoutCrateMAE:
    torch.manual_seed(seed)
    return randomize(OfficialLayoutCrateMAE(**kw), seed + 1)


def fair_reference(seed: int = 0, **kw) -> FairLayoutMAE:
    torch.manual_seed(seed)
    return randomize(FairLayoutMAE(**kw), seed + 1)


def batch(img: int = 8, chans: int = 3, n: int = 3, patch: int = 4, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, chans, img, img, generator=g)
    return x, torch.rand(n, (img // patch) ** 2, generator=g)


def save(tmp_path, obj, name="ckpt.pth"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


def assert_parity(model, ref, x, noise, ratio=0.75):
    with torch.no_grad():
        loss, pred, mask = model(x, mask_ratio=ratio, noise=noise)
        r_loss, r_pred, r_mask, r_latent = ref(x, noise, ratio)
        latent, _, _ = model.forward_encoder(x, ratio, noise)
    assert torch.equal(mask, r_mask)
    torch.testing.assert_close(latent, r_latent, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(pred, r_pred, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(loss, r_loss, atol=ATOL, rtol=RTOL)


# ---- CRATE-MAE: official layout --------------------------------------------------------------------------------
def test_key_map_covers_every_official_key():
    ref = crate_mae_reference()
    model = ratelab.create_model("test_crate_mae")
    sd = ref.state_dict()
    assert detect_layout(sd) == "official" and detect_layout(model.state_dict()) == "ratelab"
    mapped = checkpoint_filter_fn(sd, model)
    assert set(mapped) == set(model.state_dict())
    assert all(mapped[k].shape == v.shape for k, v in model.state_dict().items())
    assert {k.replace("{i}", "0") for k in OFFICIAL_KEY_MAP} <= set(sd)  # no dead template


@pytest.mark.parametrize("wrap", ["model", "plain", "module", "training"])
def test_official_checkpoint_matches_the_reference(tmp_path, wrap):
    ref = crate_mae_reference()
    sd = ref.state_dict()
    obj = {"model": sd} if wrap == "model" else sd if wrap == "plain" else {f"module.{k}": v for k, v in sd.items()}
    if wrap == "training":  # what MAE's main_pretrain saves, without its argparse Namespace (see below)
        opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad])
        obj = {"model": sd, "optimizer": opt.state_dict(), "epoch": 799, "scaler": {"scale": 65536.0}}
    model = ratelab.create_model("test_crate_mae", checkpoint_path=str(save(tmp_path, obj))).eval()
    x, noise = batch()
    assert_parity(model, ref, x, noise)
    assert_parity(model, ref, x, noise, ratio=0.5)


@pytest.mark.parametrize("overrides", [dict(heads=1), dict(heads=4, dec_heads=2), dict(depth=3, dec_depth=1),
                                       dict(chans=1, img=16)])
def test_official_parity_other_shapes(tmp_path, overrides):
    # heads=1: the official Attention has no output map (no to_out keys), filled in as identity.
    ref = crate_mae_reference(**overrides)
    if overrides.get("heads") == 1:
        assert not any("to_out" in k for k in ref.state_dict())
    ours = dict(num_heads=overrides.get("heads", 2), decoder_num_heads=overrides.get("dec_heads") or
                overrides.get("heads", 2), depth=overrides.get("depth", 2), decoder_depth=overrides.get("dec_depth", 2),
                in_chans=overrides.get("chans", 3), img_size=overrides.get("img", 8))
    model = ratelab.create_model("test_crate_mae", checkpoint_path=str(save(tmp_path, {"model": ref.state_dict()})),
                                 **ours).eval()
    x, noise = batch(img=ours["img_size"], chans=ours["in_chans"])
    assert_parity(model, ref, x, noise)


def test_release_through_the_weights_registry(tmp_path, monkeypatch):
    # The release's real width (768, 12 heads, 16 px patches at 224) at one layer per stack.
    monkeypatch.setenv(pt.ENV_VAR, str(tmp_path))
    ref = crate_mae_reference(img=224, patch=16, dim=768, depth=1, heads=12, dec_depth=1)
    path = tmp_path / pt.get_pretrained_cfg("crate_mae_base_patch16_224.in1k").file
    path.parent.mkdir(parents=True)
    torch.save({"model": ref.state_dict()}, path)
    model = ratelab.create_model("crate_mae_base_patch16_224", pretrained=True, depth=1, decoder_depth=1).eval()
    assert model.pretrained_cfg["tag"] == "in1k" and model.num_classes is None
    x, noise = batch(img=224, patch=16, n=1)
    assert_parity(model, ref, x, noise)


def test_file_trained_at_another_size_gets_the_models_tables(tmp_path):
    ref = crate_mae_reference(img=8)
    model = ratelab.create_model("test_crate_mae", img_size=16,
                                 checkpoint_path=str(save(tmp_path, {"model": ref.state_dict()}))).eval()
    torch.testing.assert_close(model.pos_embed, sincos_table(32, 4), atol=1e-6, rtol=0)
    assert torch.equal(model.blocks[1].ista.weight, ref.blocks[1].layers[0][1].fn.weight)
    # at the reference's own size the computation is the reference's (the table for 2 x 2 is computed)
    x, noise = batch(img=8)
    with torch.no_grad():
        torch.testing.assert_close(model(x, noise=noise)[1], ref(x, noise)[1], atol=ATOL, rtol=RTOL)


def test_files_that_do_not_fit_are_refused(tmp_path):
    def refused(ref_kw, *match, model="test_crate_mae", **model_kw):
        path = save(tmp_path, {"model": crate_mae_reference(**ref_kw).state_dict()})
        with pytest.raises(CheckpointError) as e:
            ratelab.create_model(model, checkpoint_path=str(path), **model_kw)
        for m in match:
            assert m in str(e.value), (m, str(e.value))

    refused(dict(depth=3), "depth 3 + decoder_depth 2 and width 32", "the model has 2 + 2 and 32")
    refused(dict(dec_depth=1), "depth 2 + decoder_depth 1")
    refused(dict(dim=64), "width 64")
    sd = crate_mae_reference().state_dict()
    sd["blocks.0.layers.0.2.fn.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"outside the official CRATE-MAE layout.*blocks\.0\.layers\.0\.2"):
        ratelab.create_model("test_crate_mae", checkpoint_path=str(save(tmp_path, sd)))
    sd = crate_mae_reference().state_dict()
    sd["decoder_pos_embed"] = sd["decoder_pos_embed"] + 0.5
    with pytest.raises(CheckpointError, match="pos_embed and decoder_pos_embed differ"):
        ratelab.create_model("test_crate_mae", checkpoint_path=str(save(tmp_path, sd)))


def test_other_families_are_named(tmp_path):
    crate = ratelab.create_model("test_crate")
    with pytest.raises(CheckpointError, match=r"not a CRATE-MAE checkpoint.*These keys match a CRATE checkpoint"):
        ratelab.create_model("test_crate_mae", checkpoint_path=str(save(tmp_path, crate.state_dict(), "crate.pth")))
    ref = crate_mae_reference()
    path = save(tmp_path, {"model": ref.state_dict()}, "crate_mae.pth")
    with pytest.raises(CheckpointError, match=r"not a CRATE checkpoint.*a CRATE-MAE checkpoint \(official "
                                              r"Ma-Lab-Berkeley/CRATE \(model/crate_ae\) layout; use a crate_mae_\*"):
        ratelab.create_model("test_crate", checkpoint_path=str(path))
    with pytest.raises(CheckpointError, match=r"not a ViT-MAE checkpoint.*a CRATE-MAE checkpoint"):
        ratelab.create_model("test_mae_vit", checkpoint_path=str(path))
    fair = save(tmp_path, {"model": fair_reference().state_dict()}, "fair.pth")
    with pytest.raises(CheckpointError, match=r"not a CRATE-MAE checkpoint.*a ViT-MAE checkpoint"):
        ratelab.create_model("test_crate_mae", checkpoint_path=str(fair))


def test_mae_training_checkpoint_with_its_namespace_loads(tmp_path):
    # MAE's main_pretrain also pickles its argparse Namespace; the weights-only loader allows that one class.
    ref = crate_mae_reference()
    obj = {"model": ref.state_dict(), "args": argparse.Namespace(mask_ratio=0.75), "epoch": 799}
    model = ratelab.create_model("test_crate_mae", checkpoint_path=str(save(tmp_path, obj))).eval()
    x, noise = batch()
    assert_parity(model, ref, x, noise)


def test_a_pickle_with_other_objects_is_still_refused(tmp_path):
    import fractions

    obj = {"model": crate_mae_reference().state_dict(), "meta": fractions.Fraction(1, 3)}
    with pytest.raises(CheckpointError, match="re-save just its state dict"):
        ratelab.create_model("test_crate_mae", checkpoint_path=str(save(tmp_path, obj)))


def test_convert_official_writes_ratelab_format(tmp_path):
    ref = crate_mae_reference()
    out = convert_official(save(tmp_path, {"model": ref.state_dict()}), tmp_path / "conv", "test_crate_mae")
    assert out.name == "model.safetensors"
    model = load_model(tmp_path / "conv").eval()
    x, noise = batch()
    assert_parity(model, ref, x, noise)


# ---- ViT-MAE: FAIR layout -----------------------------------------------------------------------------------------
FAIR_SMALL = dict(qkv_bias=True, decoder_embed_dim=16)


def test_fair_names_are_the_models_own():
    model = ratelab.create_model("test_mae_vit", **FAIR_SMALL)
    assert set(model.state_dict()) == set(fair_reference().state_dict())
    templates = {k.replace("{i}", "0") for k in FAIR_KEYS}
    assert {k for k in model.state_dict() if ".1." not in k} == templates


@pytest.mark.parametrize("wrap", ["model", "module"])
def test_fair_checkpoint_matches_the_reference(tmp_path, wrap):
    ref = fair_reference()
    sd = ref.state_dict()
    obj = {"model": sd} if wrap == "model" else {"model": {f"module.{k}": v for k, v in sd.items()}}
    model = ratelab.create_model("test_mae_vit", checkpoint_path=str(save(tmp_path, obj)), **FAIR_SMALL).eval()
    x, noise = batch()
    assert_parity(model, ref, x, noise)


def test_fair_misfits_are_explained(tmp_path):
    path = save(tmp_path, {"model": fair_reference().state_dict()})
    with pytest.raises(CheckpointError, match=r"has qkv biases.*qkv_bias=True.*decoder 2 x 16; model: .*decoder 2 x 32"
                       ):
        ratelab.create_model("test_mae_vit", checkpoint_path=str(path))
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=8, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    enc_only = save(tmp_path, {"model": vit.state_dict()}, "mae_pretrain.pth")
    with pytest.raises(CheckpointError, match="not a ViT-MAE checkpoint.*timm/DeiT ViT"):
        ratelab.create_model("test_mae_vit", checkpoint_path=str(enc_only))


def test_fair_file_of_another_size_gets_the_models_tables(tmp_path):
    path = save(tmp_path, {"model": fair_reference().state_dict()})
    model = ratelab.create_model("test_mae_vit", checkpoint_path=str(path), img_size=16, **FAIR_SMALL)
    torch.testing.assert_close(model.decoder_pos_embed, sincos_table(16, 4), atol=1e-6, rtol=0)
