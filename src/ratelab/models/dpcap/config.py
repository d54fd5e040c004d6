"""DP-Cap architecture config and the named variants table."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

BERT_VOCAB_SIZE = 30522  # bert-base-uncased, the tokenizer of the released model


@dataclass(frozen=True)
class DPCapConfig:
    """Architecture-only fields of a DP-Cap captioner (runtime options are constructor kwargs).

    Attributes:
        embed_dim: ViT encoder width.
        depth: encoder blocks.
        num_heads: encoder attention heads.
        decoder_dim: text decoder width (the bridge maps ``embed_dim`` to it); defaults to ``embed_dim``, as in every
            released size.
        decoder_depth: text decoder layers (6 in every released size).
        decoder_num_heads: decoder heads; defaults to ``num_heads``.
        patch_size: square patch side in pixels.
        mlp_ratio: MLP / FFN hidden width over the block width (encoder and decoder).
        vocab_size: token vocabulary (the text embedding and the output head); 30,522 = bert-base-uncased.
        max_text_len: length of the fixed 1-D sin-cos text position table and so the longest caption (official 128).
        qkv_bias: biases on the encoder's q/k/v projection (False in the released ``nobias`` model).
        decoder_bias: biases on every decoder Linear (False in the released model; its LayerNorms keep theirs).
    """

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    decoder_dim: int | None = None
    decoder_depth: int = 6
    decoder_num_heads: int | None = None
    patch_size: int = 16
    mlp_ratio: float = 4.0
    vocab_size: int = BERT_VOCAB_SIZE
    max_text_len: int = 128
    qkv_bias: bool = False
    decoder_bias: bool = False

    def __post_init__(self) -> None:
        if self.decoder_dim is None:
            object.__setattr__(self, "decoder_dim", self.embed_dim)
        if self.decoder_num_heads is None:
            object.__setattr__(self, "decoder_num_heads", self.num_heads)
        for name in ("embed_dim", "depth", "num_heads", "decoder_dim", "decoder_depth", "decoder_num_heads",
                     "patch_size", "vocab_size", "max_text_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for width, heads in (("embed_dim", "num_heads"), ("decoder_dim", "decoder_num_heads")):
            if getattr(self, width) % getattr(self, heads):
                raise ValueError(f"{width}={getattr(self, width)} is not divisible by {heads}={getattr(self, heads)}")
        for width in ("embed_dim", "decoder_dim"):
            if getattr(self, width) % 4:
                raise ValueError(f"{width}={getattr(self, width)} must be divisible by 4 (2-D sin-cos position table)")
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio}")
        if self.vocab_size < 4:
            raise ValueError(f"vocab_size must be at least 4 (pad, BOS, EOS and one word), got {self.vocab_size}")

    def to_dict(self) -> dict:
        return asdict(self)

    def override(self, **changes: Any) -> DPCapConfig:
        """``dataclasses.replace`` that keeps the decoder's width / heads following the encoder's when they did."""
        if self.decoder_dim == self.embed_dim and "embed_dim" in changes and "decoder_dim" not in changes:
            changes["decoder_dim"] = None
        if (self.decoder_num_heads == self.num_heads and "num_heads" in changes
                and "decoder_num_heads" not in changes):
            changes["decoder_num_heads"] = None
        return replace(self, **changes)


# tiny / small / base: the released code's ``mae_vit_{tiny,small,base}_patch16_autoregressive_nobias`` (encoder
# 384/576/768 wide, 12 blocks; a 6-layer decoder as wide as the encoder). pico / test are ratelab's own sizes for
# 32 px shapes on a CPU and for unit tests; their vocabulary is sized by the tokenizer at hand (the task passes it).
DPCAP_VARIANTS: dict[str, DPCapConfig] = {
    "base": DPCapConfig(embed_dim=768, depth=12, num_heads=12, decoder_depth=6),
    "small": DPCapConfig(embed_dim=576, depth=12, num_heads=12, decoder_depth=6),
    "tiny": DPCapConfig(embed_dim=384, depth=12, num_heads=6, decoder_depth=6),
    "pico": DPCapConfig(embed_dim=64, depth=4, num_heads=4, decoder_depth=2, patch_size=4, vocab_size=128,
                        max_text_len=32),
    "test": DPCapConfig(embed_dim=32, depth=2, num_heads=2, decoder_depth=2, patch_size=4, vocab_size=40,
                        max_text_len=16),
}
