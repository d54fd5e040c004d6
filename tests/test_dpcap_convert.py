"""DP-Cap converter: a state dict in the released layout, made by an independent module written here from the
official models_mae.py / torch_transformer.py (its names, its buffers, its unused parameters), loads into our model
and gives the same logits."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ratelab
from ratelab.core.errors import CheckpointError
from ratelab.models.dpcap.convert import checkpoint_filter_fn

torch.set_num_threads(1)
D, H, DEPTH, DEC, V, P, IMG, TXT = 32, 2, 2, 2, 40, 4, 8, 16


class _SelfAttn(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_attn = nn.Linear(D, 3 * D, bias=False)
        self.c_proj = nn.Linear(D, D, bias=False)
        self.register_buffer("bias", torch.tril(torch.ones(TXT, TXT)).view(1, 1, TXT, TXT))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(C // H)
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf")).softmax(-1)
        return self.c_proj((att @ v).transpose(1, 2).reshape(B, T, C))


class _CrossAttn(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(D, D, bias=False)
        self.kv_proj = nn.Linear(D, 2 * D, bias=False)
        self.c_proj = nn.Linear(D, D, bias=False)

    def forward(self, x, y):
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, H, C // H).transpose(1, 2)
        k, v = (t.view(B, y.shape[1], H, C // H).transpose(1, 2) for t in self.kv_proj(y).split(C, dim=2))
        att = ((q @ k.transpose(-2, -1)) / math.sqrt(C // H)).softmax(-1)
        return self.c_proj((att @ v).transpose(1, 2).reshape(B, T, C))


class _DecLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn, self.multihead_attn = _SelfAttn(), _CrossAttn()
        self.linear1, self.linear2 = nn.Linear(D, 4 * D, bias=False), nn.Linear(4 * D, D, bias=False)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(D), nn.LayerNorm(D), nn.LayerNorm(D)

    def forward(self, t, m):
        t = self.norm1(t + self.self_attn(t))
        t = self.norm2(t + self.multihead_attn(t, m))
        return self.norm3(t + self.linear2(F.gelu(self.linear1(t))))


class _Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_DecLayer() for _ in range(DEC)])


class OfficialLayout(nn.Module):
    """MaskedAutoencoderViT_autoregressive (nobias) in small, its parameter names and its unused entries."""

    def __init__(self):
        from timm.models.vision_transformer import Block, PatchEmbed

        super().__init__()
        n = (IMG // P) ** 2
        self.patch_embed = PatchEmbed(IMG, P, 3, D)
        self.text_embedding_layer_SimVLM = nn.Embedding(V, D)
        self.text_pos_embed = nn.Parameter(torch.randn(1, TXT, D), requires_grad=False)  # unused by captioning
        self.cls_token = nn.Parameter(torch.randn(1, 1, D) * 0.02, requires_grad=False)
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, D), requires_grad=False)
        self.blocks = nn.ModuleList([Block(D, H, 4.0, qkv_bias=False, norm_layer=partial(nn.LayerNorm, eps=1e-6))
                                     for _ in range(DEPTH)])
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self.decoder_embed = nn.Linear(D, D)
        self.mask_token = nn.Parameter(torch.randn(1, 1, D), requires_grad=False)
        self.mask_token_text = nn.Parameter(torch.randn(1, 1, D), requires_grad=False)
        self.decoder_pos_embed = nn.Parameter(torch.randn(1, n + 1, D), requires_grad=False)
        self.text_decoder_pos_embed = nn.Parameter(torch.randn(1, TXT, D), requires_grad=False)
        self.decoder = _Decoder()
        self.decoder_pred_text = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, V))
        for name in ("encoder_image_type_embedding", "decoder_image_type_embedding", "encoder_text_type_embedding",
                     "decoder_text_type_embedding"):
            setattr(self, name, nn.Parameter(torch.randn(1, 1, D) * 0.02, requires_grad=False))
        with torch.no_grad():  # non-trivial norms and biases
            for n_, p in self.named_parameters():
                if "norm" in n_ or n_.endswith("bias"):
                    p.add_(0.1 * torch.randn_like(p))

    def forward(self, imgs, texts):  # the released forward with mask_ratio 0, returning the logits
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        x = x + self.encoder_image_type_embedding
        for blk in self.blocks:
            x = blk(x)
        x = self.decoder_embed(self.norm(x)) + self.decoder_pos_embed + self.decoder_image_type_embedding
        t = self.text_embedding_layer_SimVLM(texts)
        t = t + self.text_decoder_pos_embed[:, :t.shape[1], :] + self.decoder_text_type_embedding
        for layer in self.decoder.layers:
            t = layer(t, x)
        return self.decoder_pred_text(t)


def test_released_layout_loads_and_gives_the_same_logits():
    torch.manual_seed(0)
    ref = OfficialLayout().eval()
    sd = {"model": ref.state_dict()}  # as base-eps7.pth stores it
    assert "decoder.layers.0.self_attn.bias" in sd["model"] and "mask_token_text" in sd["model"]
    model = ratelab.create_model("test_dpcap", max_text_len=TXT).eval()
    model.load_state_dict(checkpoint_filter_fn(sd, model), strict=True)
    imgs = torch.randn(2, 3, IMG, IMG)
    tokens = torch.randint(5, V, (2, 7))
    tokens[:, 0] = 2
    with torch.no_grad():
        torch.testing.assert_close(model(imgs, tokens), ref(imgs, tokens), atol=1e-5, rtol=1e-5)
    again = checkpoint_filter_fn(model.state_dict(), model)  # ratelab layout passes through
    assert again.keys() == model.state_dict().keys()


def test_misfits_are_named():
    torch.manual_seed(0)
    sd = OfficialLayout().state_dict()
    with pytest.raises(CheckpointError, match=r"text embedding \(40, 32\)"):
        checkpoint_filter_fn(sd, ratelab.create_model("test_dpcap", vocab_size=50, max_text_len=TXT))
    with pytest.raises(CheckpointError, match="decoder layers"):
        checkpoint_filter_fn(sd, ratelab.create_model("test_dpcap", decoder_depth=3, max_text_len=TXT))
    with pytest.raises(CheckpointError, match="not a DP-Cap checkpoint"):
        checkpoint_filter_fn({"foo.weight": torch.zeros(1)}, ratelab.create_model("test_dpcap"))


def test_released_file_loads_through_the_weights_registry(tmp_path, monkeypatch):
    """base-eps7.pth at its registry path ($RATELAB_WEIGHTS/facebookresearch/dpcap/) loads by name, through the
    entry's converter, into the base name with the test sizes (the released file itself is not at hand)."""
    torch.manual_seed(1)
    ref = OfficialLayout().eval()
    path = tmp_path / "facebookresearch" / "dpcap" / "base-eps7.pth"
    path.parent.mkdir(parents=True)
    torch.save({"model": ref.state_dict()}, path)
    monkeypatch.setenv("RATELAB_WEIGHTS", str(tmp_path))
    sizes = dict(embed_dim=D, depth=DEPTH, num_heads=H, decoder_depth=DEC, patch_size=P, vocab_size=V,
                 max_text_len=TXT, img_size=IMG, bos_id=2, eos_id=3)
    model = ratelab.create_model("dpcap_base_patch16_224.metaclip_eps7", pretrained=True, **sizes).eval()
    imgs = torch.randn(2, 3, IMG, IMG)
    tokens = torch.randint(5, V, (2, 7))
    tokens[:, 0] = 2
    with torch.no_grad():
        torch.testing.assert_close(model(imgs, tokens), ref(imgs, tokens), atol=1e-5, rtol=1e-5)
