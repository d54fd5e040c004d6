"""Architecture config of the in-context classification transformer and its named sizes."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ICLGPTConfig:
    """Architecture fields of :class:`~ratelab.models.icl_gpt.model.ICLGPT`.

    Attributes:
        embed_dim: token width.
        depth: number of transformer blocks.
        num_heads: attention heads (must divide ``embed_dim``).
        input_dim: d, dimension of the input vectors x (embedded by a linear map).
        vocab_size: number of label words (embedding rows of y tokens and width of the output head).
        max_pairs: longest sequence, in (x, y) pairs, the position table covers.
        mlp_ratio: hidden width of the MLP as a multiple of ``embed_dim``.
        label_sees_input: a y token also embeds the x it labels (``y_i`` token = E[y_i] + W' x_i). Causality is
            unchanged (x_i precedes y_i). It spares the model from first learning a previous-token attention head
            to pair each label with its input, which shortens the loss plateau before in-context learning
            emerges from hundreds of steps to tens (what makes CPU training in minutes possible); ``False`` is
            the plain interleaved sequence of an LM prompt.
    """

    embed_dim: int = 64
    depth: int = 3
    num_heads: int = 4
    input_dim: int = 8
    vocab_size: int = 8
    max_pairs: int = 32
    mlp_ratio: float = 4.0
    label_sees_input: bool = True

    def __post_init__(self) -> None:
        for name in ("embed_dim", "depth", "num_heads", "input_dim", "vocab_size", "max_pairs"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ICLGPTConfig.{name} must be positive, got {getattr(self, name)}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"ICLGPTConfig: embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"ICLGPTConfig.mlp_ratio must be positive, got {self.mlp_ratio}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def to_dict(self) -> dict:
        return asdict(self)


# Sizes for the model-size axis of the ICL calibration study (ratelab's own; CPU-trainable in minutes).
ICL_GPT_VARIANTS: dict[str, ICLGPTConfig] = {
    "tiny": ICLGPTConfig(embed_dim=32, depth=2, num_heads=2),
    "small": ICLGPTConfig(embed_dim=64, depth=3, num_heads=4),
    "base": ICLGPTConfig(embed_dim=128, depth=4, num_heads=4),
}
