"""DP-Cap: a ViT image captioner, the model DP-SGD trains in "Differentially Private Representation Learning via
Image Captioning".

Paper: Sander*, Yu*, Sanjabi, Durmus, Ma, Chaudhuri, Guo, ICML 2024 (arXiv 2403.02506). Architecture: "Cap"
(Tschannen et al., NeurIPS 2023) as the released code builds it (facebookresearch/dpcap ``models_mae.py``,
``MaskedAutoencoderViT_autoregressive`` with ``mae_vit_base_patch16_autoregressive_nobias``, and
``model/torch_transformer.py``). Independent re-implementation; the encoder blocks are timm's ``Block``::

    z      = LN(ViT blocks([cls + P[0]; Conv_p(x) + P[1:]] + e_img))     encoder, (B, N+1, d); no qkv bias
    memory = Linear(z) + P_dec + e_img_dec                               the bridge, over ALL N+1 tokens
    h      = Embed(tokens) + P_text + e_text                              (B, L, d_dec), tokens = [BOS] w_1 .. [EOS]
    h      = LN1(h + CausalSelfAttn(h)); h = LN2(h + CrossAttn(h, memory)); h = LN3(h + W2 GELU(W1 h))   x 6
    logits = Linear(LN(h))                                                (B, L, V); logit t predicts token t+1

P and P_dec are MAE's fixed 2-D sin-cos tables (zero row for [CLS]), P_text a fixed 1-D sin-cos table; [CLS] and
the four type embeddings e are N(0, 0.02) and frozen (``requires_grad=False``), as in the released code. The
decoder is post-LN, without dropout, without biases in its attention and FFN Linears (its LayerNorms keep theirs)
and without a final norm; the output head (LayerNorm, then a Linear with bias) is not tied to the text embedding.

Per-example loss (:func:`caption_loss`): cross-entropy of tokens 2..L, summed over non-pad targets and divided by
their number -- one value per caption, the vector a DP engine clips per sample.

Trainable parameters of ``dpcap_base_patch16_224`` with the 30,522-token BERT vocabulary: 189,774,138 (about
189.8M): encoder 85,618,944 (patch embedding 590,592, 12 blocks x 7,085,568 without qkv bias, final norm 1,536),
bridge 590,592, decoder 56,650,752 (6 layers x 9,441,792), text embedding 23,440,896, output head 23,472,954
(LayerNorm 1,536 + Linear 23,471,418). ``tests/test_dpcap.py`` counts them; :meth:`DPCap.param_breakdown` gives
the split of any size.

Deviations from the released code (none changes what the trained model computes): attention goes through
:func:`ratelab.kernels.attention.attention` (SDPA by default, the readable reference with ``attn_backend="ref"``;
the released decoder writes its attention out by hand with a 128-long mask buffer, here the causal mask is a flag);
parameter names are ratelab's own (``convert.py`` maps the released layout); the parts of the released class that
captioning never uses (masking tokens, the encoder-side text table and type embedding, parallel decoding) are left
out; another input size gets the sin-cos tables of its own grid; token ids of BOS/EOS are runtime options (101/102
for the BERT vocabulary, the task passes the tokenizer's). Nothing in the model mixes examples (no BatchNorm), so
per-sample gradients are well defined.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ratelab.core.builder import build_model_with_cfg
from ratelab.core.errors import ConfigError
from ratelab.core.registry import register_model
from ratelab.kernels.attention import attention
from ratelab.layers.intermediates import check_output_fmt, pack_intermediates, resolve_indices, split_tokens
from ratelab.models.crate_mae.mae import sincos_pos_embed_2d
from ratelab.models.dpcap.config import DPCAP_VARIANTS, DPCapConfig

__all__ = ["CaptionDecoder", "CaptionDecoderLayer", "CausalSelfAttention", "CrossAttention", "DPCap",
           "caption_loss", "sincos_pos_embed_1d"]


def sincos_pos_embed_1d(dim: int, length: int, *, dtype: torch.dtype = torch.float32,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """Fixed 1-D sin-cos table (1, length, dim): position m gets ``[sin(m w_k), cos(m w_k)]``, ``w_k =
    10000^(-k/(dim/2))``, k = 0 .. dim/2 - 1 (MAE's ``get_1d_sincos_pos_embed``; computed in float64)."""
    if dim % 2:
        raise ValueError(f"a 1-D sin-cos table needs an even width, got {dim}")
    half = dim // 2
    omega = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64, device=device) / half)
    out = torch.arange(length, dtype=torch.float64, device=device)[:, None] * omega[None, :]
    return torch.cat([out.sin(), out.cos()], dim=1).to(dtype).unsqueeze(0)


def caption_loss(logits: torch.Tensor, tokens: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """Per-caption mean next-token cross-entropy: (B, L, V) logits, (B, L) tokens -> (B,) float32.

    Position t predicts token t+1; targets equal to ``pad_id`` are ignored, and each caption's sum is divided by its
    own number of targets (the released code's reduction). A caption without any target is an error (0/0).
    """
    if logits.ndim != 3 or tokens.ndim != 2 or logits.shape[:2] != tokens.shape:
        raise ValueError(f"caption_loss: logits (B, L, V) and tokens (B, L), got {tuple(logits.shape)} and "
                         f"{tuple(tokens.shape)}")
    targets = tokens[:, 1:]
    keep = targets != pad_id
    n = keep.sum(dim=1)
    if bool((n == 0).any()):
        raise ValueError("caption_loss: a caption has no token after BOS (only padding); every caption needs at "
                         "least EOS")
    ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=pad_id, reduction="none")
    return ce.sum(dim=1) / n


class CausalSelfAttention(nn.Module):
    """Masked self-attention of the text tokens: fused ``c_attn`` (d -> 3d) and ``c_proj``, no biases by default."""

    def __init__(self, dim: int, num_heads: int, bias: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.c_attn = nn.Linear(dim, 3 * dim, bias=bias)
        self.c_proj = nn.Linear(dim, dim, bias=bias)
        self.backend = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        q, k, v = self.c_attn(x).view(B, L, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        y = attention(q, k, v, is_causal=True, backend=self.backend)  # (B, H, L, hd)
        return self.c_proj(y.transpose(1, 2).reshape(B, L, C))


class CrossAttention(nn.Module):
    """Text queries (``q_proj``) over the image memory (``kv_proj``, d -> 2d), then ``c_proj``; no biases."""

    def __init__(self, dim: int, num_heads: int, bias: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.kv_proj = nn.Linear(dim, 2 * dim, bias=bias)
        self.c_proj = nn.Linear(dim, dim, bias=bias)
        self.backend = "auto"

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        H, hd = self.num_heads, C // self.num_heads
        q = self.q_proj(x).view(B, L, H, hd).transpose(1, 2)
        k, v = self.kv_proj(memory).view(B, memory.shape[1], 2, H, hd).permute(2, 0, 3, 1, 4)
        y = attention(q, k, v, backend=self.backend)
        return self.c_proj(y.transpose(1, 2).reshape(B, L, C))


class CaptionDecoderLayer(nn.Module):
    """Post-LN decoder layer: LN1(h + self-attn), LN2(h + cross-attn), LN3(h + FFN), GELU FFN without biases."""

    def __init__(self, dim: int, num_heads: int, hidden: int, bias: bool = False) -> None:
        super().__init__()
        self.self_attn = CausalSelfAttention(dim, num_heads, bias)
        self.multihead_attn = CrossAttention(dim, num_heads, bias)
        self.linear1 = nn.Linear(dim, hidden, bias=bias)
        self.linear2 = nn.Linear(hidden, dim, bias=bias)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, h: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        h = self.norm1(h + self.self_attn(h))
        h = self.norm2(h + self.multihead_attn(h, memory))
        return self.norm3(h + self.linear2(F.gelu(self.linear1(h))))


class CaptionDecoder(nn.Module):
    """A stack of :class:`CaptionDecoderLayer` (no final norm: the output head has its own)."""

    def __init__(self, dim: int, num_heads: int, depth: int, hidden: int, bias: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList([CaptionDecoderLayer(dim, num_heads, hidden, bias) for _ in range(depth)])

    def forward(self, h: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            h = layer(h, memory)
        return h


class DPCap(nn.Module):
    """ViT encoder + bridge + causal text decoder with cross-attention (see the module docstring).

    Args:
        cfg: architecture (:class:`DPCapConfig`).
        img_size: construction input size (grid of the fixed position tables).
        in_chans: input channels.
        num_classes: ``None`` (or 0): a captioner has no classifier; probe :meth:`features` instead.
        pad_id, bos_id, eos_id: token ids of padding, the first token and the end of a caption (BERT: 0, 101
            ([CLS]), 102 ([SEP])).
        attn_backend: ``"auto"`` / ``"sdpa"`` / ``"ref"`` for the decoder's attention (how, not what).

    Attributes:
        num_prefix_tokens: 1 ([CLS] first in the encoder and bridge tokens).
    """

    num_prefix_tokens = 1
    execution_args = ("attn_backend",)

    def __init__(self, cfg: DPCapConfig, *, img_size: int = 224, in_chans: int = 3, num_classes: int | None = None,
                 pad_id: int = 0, bos_id: int = 101, eos_id: int = 102, attn_backend: str = "auto") -> None:
        # deferred: `import timm` costs seconds (see adventurer's _timm_note)
        from timm.layers import PatchEmbed
        from timm.models.vision_transformer import Block

        super().__init__()
        if num_classes not in (None, 0):
            raise ConfigError(f"DPCap is a captioner without a classifier head: num_classes must be None (or 0), got "
                              f"{num_classes!r}; classify its frozen features() with a linear probe, or zero-shot "
                              "with ratelab.eval.zeroshot")
        ids = {"pad_id": pad_id, "bos_id": bos_id, "eos_id": eos_id}
        bad = {k: v for k, v in ids.items() if not (isinstance(v, int) and 0 <= v < cfg.vocab_size)}
        if bad:
            raise ConfigError(f"DPCap: token ids {bad} are outside the vocabulary of {cfg.vocab_size} tokens")
        if len(set(ids.values())) != 3:
            raise ConfigError(f"DPCap: pad, BOS and EOS need three different ids, got {ids}")
        p = cfg.patch_size
        if img_size % p:
            raise ValueError(f"img_size={img_size} is not divisible by patch_size={p}")
        self.cfg = cfg
        self.img_size, self.in_chans, self.patch_size = img_size, in_chans, p
        self.num_classes = None
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        self.grid_size = (img_size // p, img_size // p)
        d, dd = cfg.embed_dim, cfg.decoder_dim
        self.embed_dim = d
        self.num_features = dd  # forward_features / features() are bridge outputs
        n_tokens = self.grid_size[0] * self.grid_size[1] + 1
        frozen = partial(nn.Parameter, requires_grad=False)

        self.patch_embed = PatchEmbed(img_size, p, in_chans, d, strict_img_size=False)
        self.cls_token = frozen(torch.zeros(1, 1, d))
        self.pos_embed = frozen(torch.zeros(1, n_tokens, d))
        self.encoder_image_type_embedding = frozen(torch.zeros(1, 1, d))
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList([Block(d, cfg.num_heads, cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, norm_layer=norm)
                                     for _ in range(cfg.depth)])
        self.norm = norm(d)

        self.decoder_embed = nn.Linear(d, dd)  # the bridge (with bias, as released)
        self.decoder_pos_embed = frozen(torch.zeros(1, n_tokens, dd))
        self.decoder_image_type_embedding = frozen(torch.zeros(1, 1, dd))
        self.text_embed = nn.Embedding(cfg.vocab_size, dd)
        self.text_pos_embed = frozen(torch.zeros(1, cfg.max_text_len, dd))
        self.decoder_text_type_embedding = frozen(torch.zeros(1, 1, dd))
        self.decoder = CaptionDecoder(dd, cfg.decoder_num_heads, cfg.decoder_depth, int(dd * cfg.mlp_ratio),
                                      cfg.decoder_bias)
        self.head_norm = nn.LayerNorm(dd)
        self.head = nn.Linear(dd, cfg.vocab_size)
        self.set_attn_backend(attn_backend)
        self.init_weights()

    # ---- setup ------------------------------------------------------------------------------------------------
    def init_weights(self) -> None:
        """The released initialization: sin-cos tables; the conv stem as a flattened Linear and every Linear
        xavier-uniform, zero biases; LayerNorms (1, 0); [CLS], type embeddings and the text embedding N(0, 0.02)."""
        with torch.no_grad():
            for table in (self.pos_embed, self.decoder_pos_embed):
                table.copy_(sincos_pos_embed_2d(table.shape[-1], self.grid_size, device=table.device))
            t = self.text_pos_embed
            t.copy_(sincos_pos_embed_1d(t.shape[-1], t.shape[1], device=t.device))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for t in (self.cls_token, self.encoder_image_type_embedding, self.decoder_image_type_embedding,
                  self.decoder_text_type_embedding, self.text_embed.weight):
            nn.init.normal_(t, std=0.02)

    def set_attn_backend(self, backend: str) -> None:
        """Decoder attention through ``"auto"``/``"sdpa"`` (fused) or ``"ref"`` (the readable reference)."""
        from ratelab.kernels.attention import BACKENDS

        if backend not in BACKENDS:
            raise ConfigError(f"attn_backend must be one of {BACKENDS}, got {backend!r}")
        for m in self.decoder.modules():
            if isinstance(m, (CausalSelfAttention, CrossAttention)):
                m.backend = backend

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos_embed", "decoder_pos_embed", "text_pos_embed", "encoder_image_type_embedding",
                "decoder_image_type_embedding", "decoder_text_type_embedding"}

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return {"stem": r"^cls_token|^pos_embed|^patch_embed|^encoder_image_type", "blocks": r"^blocks\.(\d+)",
                "decoder": r"^decoder|^text_|^head"}

    def param_breakdown(self) -> dict[str, int]:
        """Trainable parameters per part: encoder, bridge, decoder, text_embedding, head (and their total)."""
        parts = {"encoder": ("patch_embed", "blocks", "norm"), "bridge": ("decoder_embed",),
                 "decoder": ("decoder",), "text_embedding": ("text_embed",), "head": ("head_norm", "head")}
        out = {k: sum(p.numel() for name in names for p in getattr(self, name).parameters() if p.requires_grad)
               for k, names in parts.items()}
        out["total"] = sum(out.values())
        return out

    # ---- encoder and bridge -------------------------------------------------------------------------------------
    def _check_images(self, imgs: torch.Tensor) -> tuple[int, int]:
        if imgs.ndim != 4 or imgs.shape[1] != self.in_chans:
            raise ValueError(f"expected images (B, {self.in_chans}, H, W), got {tuple(imgs.shape)}")
        if imgs.shape[2] % self.patch_size or imgs.shape[3] % self.patch_size:
            raise ValueError(f"image size {imgs.shape[2]}x{imgs.shape[3]} is not divisible by patch size "
                             f"{self.patch_size}")
        return imgs.shape[2] // self.patch_size, imgs.shape[3] // self.patch_size

    def _table(self, table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if tuple(grid) == self.grid_size:
            return table
        return sincos_pos_embed_2d(table.shape[-1], grid, dtype=table.dtype, device=table.device)

    def _embed_image(self, imgs: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        grid = self._check_images(imgs)
        pos = self._table(self.pos_embed, grid)
        x = self.patch_embed(imgs) + pos[:, 1:]
        cls = (self.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1) + self.encoder_image_type_embedding, grid

    def forward_encoder(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N+1, d): the ViT's tokens after its final norm ([CLS] first)."""
        z, _ = self._embed_image(imgs)
        for blk in self.blocks:
            z = blk(z)
        return self.norm(z)

    def bridge(self, z: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Encoder tokens (B, N+1, d) -> the decoder's memory (B, N+1, d_dec): Linear + fixed table + type."""
        if grid is None:
            grid = self.grid_size if z.shape[1] == self.pos_embed.shape[1] else _square(z.shape[1] - 1)
        return self.decoder_embed(z) + self._table(self.decoder_pos_embed, grid) + self.decoder_image_type_embedding

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N+1, d_dec): the bridge outputs, what the decoder attends to."""
        grid = self._check_images(imgs)
        return self.bridge(self.forward_encoder(imgs), grid)

    def features(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, d_dec): the bridge outputs averaged over all N+1 tokens (the paper's probe input)."""
        return self.forward_features(imgs).mean(dim=1)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        output_fmt: str = "NLC",
        intermediates_only: bool = False,
        return_attn: bool = False,
        return_prefix_tokens: bool = False,
    ) -> Any:
        """Encoder block outputs (timm's convention, docs/models.md); ``final`` is :meth:`forward_features`.

        ``return_attn`` gives each kept block's (B, H, N+1, N+1) softmax(q k^T / sqrt(h)), recomputed from its
        ``qkv`` (timm's fused attention does not return it).
        """
        from ratelab.models.mae_vit.mae_vit import block_attention

        check_output_fmt(output_fmt, ("NLC", "NCHW"), type(self).__name__)
        take = resolve_indices(len(self.blocks), indices)
        z, grid = self._embed_image(x)
        inter: list[Any] = []
        attn: list[torch.Tensor] | None = [] if return_attn else None
        for i, blk in enumerate(self.blocks):
            if attn is not None and i in take:
                attn.append(block_attention(blk, z))
            z = blk(z)
            if i in take:
                spatial, prefix = split_tokens(self.norm(z) if norm else z, output_fmt, num_prefix_tokens=1, grid=grid)
                inter.append((spatial, prefix) if return_prefix_tokens else spatial)
        return pack_intermediates(self.bridge(self.norm(z), grid), inter, attn, intermediates_only=intermediates_only)

    # ---- text decoder -------------------------------------------------------------------------------------------
    def embed_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> (B, L, d_dec) decoder inputs: embedding + fixed 1-D table + text type embedding."""
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be (B, L) ids, got shape {tuple(tokens.shape)}")
        L = tokens.shape[1]
        if L > self.text_pos_embed.shape[1]:
            raise ValueError(f"captions of {L} tokens exceed max_text_len={self.text_pos_embed.shape[1]}")
        return self.text_embed(tokens) + self.text_pos_embed[:, :L] + self.decoder_text_type_embedding

    def forward_decoder(self, memory: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Memory (B, N+1, d_dec), tokens (B, L) -> decoder states (B, L, d_dec)."""
        return self.decoder(self.embed_text(tokens), memory)

    def forward_head(self, h: torch.Tensor) -> torch.Tensor:
        """Decoder states (B, L, d_dec) -> next-token logits (B, L, V)."""
        return self.head(self.head_norm(h))

    def forward(self, imgs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: images (B, C, H, W), captions (B, L) starting with BOS -> logits (B, L, V), position t
        scoring token t+1 (see :func:`caption_loss`)."""
        if tokens.shape[0] != imgs.shape[0]:
            raise ValueError(f"{imgs.shape[0]} images but {tokens.shape[0]} captions")
        return self.forward_head(self.forward_decoder(self.forward_features(imgs), tokens))

    def loss(self, imgs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Per-caption mean cross-entropy over non-pad targets, shape (B,)."""
        return caption_loss(self(imgs, tokens), tokens, self.pad_id)

    # ---- generation ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, imgs: torch.Tensor, max_len: int = 40, method: str = "greedy", num_beams: int = 4,
                 length_penalty: float = 0.0) -> torch.Tensor:
        """Captions of images: (B, C, H, W) -> (B, <= max_len) ids starting with BOS, ending with EOS (when the model
        emitted it within ``max_len`` tokens), padded with ``pad_id``.

        Args:
            max_len: longest caption, BOS and EOS included (at most ``max_text_len``).
            method: ``"greedy"`` (argmax each step) or ``"beam"``.
            num_beams: beams per image for ``"beam"`` (1 is greedy).
            length_penalty: beam score = sum of log-probabilities / (generated length ** length_penalty); 0 ranks
                by the plain sum.

        The decoder re-runs on the whole prefix at each step (no key/value cache): captions are short.
        """
        if method not in ("greedy", "beam"):
            raise ValueError(f"method must be 'greedy' or 'beam', got {method!r}")
        if not 2 <= max_len <= self.text_pos_embed.shape[1]:
            raise ValueError(f"max_len must be in 2..{self.text_pos_embed.shape[1]} (max_text_len), got {max_len}")
        if method == "beam" and (isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1):
            raise ValueError(f"num_beams must be a positive int, got {num_beams!r}")
        was_training = self.training
        self.eval()
        try:
            memory = self.forward_features(imgs)
            if method == "greedy":
                return self._greedy(memory, max_len)
            rows = [self._beam(memory[i:i + 1], max_len, num_beams, length_penalty) for i in range(memory.shape[0])]
            return self._pad(rows, memory.device)
        finally:
            self.train(was_training)

    def _next_logprobs(self, memory: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
        logits = self.forward_head(self.forward_decoder(memory, seq)[:, -1:])[:, 0]
        return logits.float().log_softmax(dim=-1)

    def _greedy(self, memory: torch.Tensor, max_len: int) -> torch.Tensor:
        B = memory.shape[0]
        seq = torch.full((B, 1), self.bos_id, dtype=torch.long, device=memory.device)
        done = torch.zeros(B, dtype=torch.bool, device=memory.device)
        while seq.shape[1] < max_len and not bool(done.all()):
            nxt = self._next_logprobs(memory, seq).argmax(dim=-1)
            nxt = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            done |= nxt == self.eos_id
        return seq

    def _beam(self, memory: torch.Tensor, max_len: int, k: int, lp: float) -> list[int]:
        beams: list[tuple[float, list[int]]] = [(0.0, [self.bos_id])]
        finished: list[tuple[float, list[int]]] = []

        def rank(item: tuple[float, list[int]]) -> float:
            return item[0] / (max(len(item[1]) - 1, 1) ** lp)

        while beams:
            seq = torch.tensor([b[1] for b in beams], dtype=torch.long, device=memory.device)
            logp = self._next_logprobs(memory.expand(len(beams), -1, -1), seq)  # (n_beams, V)
            total = torch.tensor([b[0] for b in beams], device=logp.device, dtype=logp.dtype)[:, None] + logp
            top = total.flatten().topk(min(k, total.numel()))
            cands = []
            for score, idx in zip(top.values.tolist(), top.indices.tolist()):
                b, tok = divmod(idx, logp.shape[1])
                cands.append((score, beams[b][1] + [tok]))
            beams = []
            for c in cands:
                if c[1][-1] == self.eos_id or len(c[1]) >= max_len:
                    finished.append(c)
                else:
                    beams.append(c)
            # stop once no open beam can still beat the k-th best finished one (scores only fall as tokens add,
            # exact for length_penalty 0; with a penalty the loop runs until max_len)
            if len(finished) >= k and lp == 0:
                kth = sorted((rank(f) for f in finished), reverse=True)[k - 1]
                beams = [b for b in beams if b[0] > kth]
        return max(finished, key=rank)[1]

    def _pad(self, rows: list[list[int]], device: torch.device) -> torch.Tensor:
        L = max(len(r) for r in rows)
        out = torch.full((len(rows), L), self.pad_id, dtype=torch.long, device=device)
        for i, r in enumerate(rows):
            out[i, :len(r)] = torch.tensor(r, dtype=torch.long, device=device)
        return out

    @classmethod
    def checkpoint_filter_fn(cls, state_dict: dict[str, torch.Tensor], model: DPCap) -> dict[str, torch.Tensor]:
        from ratelab.models.dpcap.convert import checkpoint_filter_fn

        return checkpoint_filter_fn(state_dict, model)


def _square(n: int) -> tuple[int, int]:
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"cannot tell the patch grid of {n} patches (not a square); pass grid=")
    return side, side


def _create(variant: str, **kwargs: Any) -> DPCap:
    return build_model_with_cfg(DPCap, DPCapConfig, DPCAP_VARIANTS[variant], **kwargs)


@register_model
def dpcap_base_patch16_224(**kwargs: Any) -> DPCap:
    """DP-Cap's released captioner: ViT-B/16 encoder (no qkv bias), 6 x 768 decoder, BERT vocabulary. 189.8M
    trainable parameters."""
    return _create("base", **kwargs)


@register_model
def dpcap_small_patch16_224(**kwargs: Any) -> DPCap:
    """The released code's small size: 12 x 576 encoder (12 heads), 6 x 576 decoder, BERT vocabulary."""
    return _create("small", **kwargs)


@register_model
def dpcap_tiny_patch16_224(**kwargs: Any) -> DPCap:
    """The released code's tiny size: 12 x 384 encoder (6 heads), 6 x 384 decoder, BERT vocabulary."""
    return _create("tiny", **kwargs)


def _small_ids(kwargs: dict[str, Any]) -> dict[str, Any]:
    # a trained WordPiece puts its special tokens first: [PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3 (data.text_tokenizer)
    kwargs.setdefault("bos_id", 2)
    kwargs.setdefault("eos_id", 3)
    return kwargs


@register_model
def dpcap_pico_patch4_32(**kwargs: Any) -> DPCap:
    """ratelab's size for 32 px shapes: 4 x 64 encoder, 2 x 64 decoder, patch 4, a small trained vocabulary."""
    kwargs.setdefault("img_size", 32)
    return _create("pico", **_small_ids(kwargs))


@register_model
def test_dpcap(**kwargs: Any) -> DPCap:
    """2 + 2 layers x 32 on 8x8 RGB inputs, a 40-token vocabulary, for unit tests."""
    kwargs.setdefault("img_size", 8)
    return _create("test", **_small_ids(kwargs))
