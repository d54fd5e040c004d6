"""CRATE-MAE: the white-box masked autoencoder, as the official code computes it.

Paper: Pai, Wu, Buchanan, Yu, Ma, "Masked Completion via Structured Diffusion with White-Box Transformers", ICLR 2024
(arXiv 2404.02446). Official code: Ma-Lab-Berkeley/CRATE ``model/crate_ae/`` (``crate_ae.py``, ``crate_encoder.py``,
``crate_decoder.py``, ``pos_embed.py``); it reuses the masking and loss of FAIR's MAE (He et al., CVPR 2022). This
file is an independent re-implementation; the official block keys are renamed in ``convert.py``.

Encoder, on images (B, C, H, W) with N = HW / p^2 patches:

    x      = Conv_p(imgs)                          (B, N, d), timm PatchEmbed (official key names)
    keep   = argsort(noise)[:, :int(N (1 - r))]    MAE's masking, r = mask_ratio, default 0.75
    x      = mask_token where a patch is not kept  the encoder sees EVERY token (MAE drops the masked ones)
    z      = [cls; x] + P                          P: fixed 2-D sin-cos table, zero row for [CLS]
    z      = CRATE layer(z) x depth                MSSA (bias on W_out) + one ISTA step, eta 0.1, lambda 0.5
    latent = LN(z)                                 eps 1e-6

Decoder layer l (the approximate inverse of encoder layer L - 1 - l, same width d), on Y (B, N+1, d):

    Y_half = D~ LN2(Y)                             a d x d dictionary: no bias, no step size, no ReLU
    Y_next = Y_half - MSSA(LN1(Y_half))            the compression step run backwards: MSSA is subtracted

then LN (eps 1e-6) -> Linear(d, p^2 C) per token, [CLS] dropped: ``pred`` (B, N, p^2 C). Loss: MAE's per-patch MSE
averaged over masked patches only (``norm_pix_loss``: per-patch standardized targets). The decoder adds no position
embedding and ``decoder_embed`` is never applied (the encoder output feeds the decoder directly); both tables and the
Linear exist in the official model, so they are kept here: its checkpoints load and the parameter counts (which
include them) match the published ones.

The decoder block's submodules carry the names of the encoder submodules they invert (``norm1``/``attn`` the MSSA
pair, ``norm2`` + ``dictionary`` the sparse-coding pair, where the encoder has ``norm2`` + ``ista``), so in the
decoder ``norm2`` runs before ``norm1``. The correspondence D~^l ~ D^{L-1-l}, MSSA_dec^l ~ MSSA_enc^{L-1-l} is
the paper's intent, not a constraint: nothing is tied.

Deviations from the paper's equations, shared with the official code: the encoder's lambda is 0.5 (the book states
0.1); U, D, D~ and the MSSA output maps are free, untied and unconstrained (as in CRATE, issues #18, #31).
Deviations from the official code (none changes what a checkpoint computes):
  * masked slots are filled with ``torch.where``; the official code gathers the kept tokens, appends mask tokens and
    gathers them back with ``ids_restore``, which produces the same tensor;
  * the encoder adds ``pos_embed``; the official forward adds ``decoder_pos_embed``. Both are the same fixed table
    (the converter refuses an official file in which they differ);
  * the ISTA step and the attention take CRATE's fast paths (fewer products, SDPA; ``set_fused_ista(False)`` and
    ``set_attn_backend("ref")`` give the reference forms), so results differ by rounding only;
  * another input size gets the sin-cos table of its own grid (computed, exact); the official training forward
    needs the construction size. A checkpoint of another size loads with its fixed tables replaced by the model's;
  * ``patchify``/``unpatchify`` work for any channel count (the official ones assume 3);
  * ``forward_loss(imgs, pred, mask)`` has MAE's signature (the official one also takes the unused latent);
  * ``forward`` refuses a ``mask_ratio`` that masks no patch (the masked-patch mean would be 0/0);
  * ``no_weight_decay`` lists [CLS], the mask token and both tables (FAIR's optimizer rule decays the tokens);
  * there is no classifier: ``num_classes`` is ``None`` (0 is accepted as a synonym) and there is no
    ``forward_head``; ``forward_features`` is the encoder's latent of the unmasked image, after its final norm.

Model API (docs/models.md, "CRATE-MAE"): MAE's ``forward`` / ``forward_encoder`` / ``forward_decoder`` /
``forward_loss`` / ``patchify`` / ``unpatchify``; timm's ``forward_features`` and ``forward_intermediates`` for the
encoder; :meth:`CrateMAE.forward_layer_quantities` for the white-box quantities of encoder or decoder layers, and
:meth:`CrateMAE.layer_stack` to hand either stack to :func:`ratelab.analysis.layer_rates.measure_layers`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ratelab.core.builder import build_model_with_cfg
from ratelab.core.errors import ConfigError
from ratelab.core.registry import register_model
from ratelab.layers.intermediates import (
    check_output_fmt,
    collect_intermediates,
    pack_intermediates,
    resolve_indices,
)
from ratelab.layers.mssa import MSSA
from ratelab.models.crate.config import CrateConfig
from ratelab.models.crate.crate import CrateBlock
from ratelab.models.crate_mae import mae
from ratelab.models.crate_mae.config import CRATE_MAE_VARIANTS, CrateMAEConfig

PARTS = ("encoder", "decoder")
ENCODER_MEASURES = ("compression", "compression_half", "sparsity")
DECODER_MEASURES = ("compression", "compression_half")  # no ReLU in the decoder: no sparse codes to count


def no_classifier(num_classes: int | None, model: str) -> None:
    """``ConfigError`` for a classifier width on a masked autoencoder (which has no head to size)."""
    if num_classes not in (None, 0):
        raise ConfigError(
            f"{model} is a masked autoencoder without a classifier head: num_classes must be None (or 0), got "
            f"{num_classes!r}; classify its frozen forward_features with a linear probe (ratelab eval --linear-probe)"
        )


class Dictionary(nn.Module):
    """y -> D~ y for each token: the decoder's linear decoding of sparse codes. (B, N, d) -> (B, N, d).

    ``weight`` is D~ in ``F.linear`` orientation, as the official layout stores it; kaiming-uniform init, as there.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, dim))
        nn.init.kaiming_uniform_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class CrateMAEDecoderBlock(nn.Module):
    """Y -> Y_half - MSSA(LN1(Y_half)), Y_half = D~ LN2(Y). (B, N, d) -> (B, N, d)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm2 = nn.LayerNorm(dim)
        self.dictionary = Dictionary(dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MSSA(dim, num_heads, dim // num_heads, out_bias=True)

    def forward(
        self, y: torch.Tensor, *, return_attn: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(B, N, d) -> (B, N, d), and the (B, K, N, N) attention with ``return_attn`` (explicit softmax path)."""
        half = self.dictionary(self.norm2(y))
        if return_attn:
            a, attn = self.attn(self.norm1(half), return_attn=True)
            return half - a, attn
        return half - self.attn(self.norm1(half))

    def forward_quantities(self, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Same computation keeping ``half`` Y_half (B, N, d), ``proj`` U_k^T LN1(Y_half) (B, K, N, p), ``out``."""
        half = self.dictionary(self.norm2(y))
        a = self.norm1(half)
        return {"out": half - self.attn(a), "half": half, "proj": self.attn.project(a)}


class CrateMAE(mae.MaskedAutoencoderMixin, nn.Module):
    """CRATE-MAE masked autoencoder (see the module docstring).

    Args:
        cfg: architecture (:class:`CrateMAEConfig`).
        img_size: construction input size (grid of the fixed position tables); other sizes get their own table.
        in_chans: input channels (the prediction has ``patch_size**2 * in_chans`` values per patch).
        num_classes: ``None`` (or 0): there is no classifier; anything else is a ``ConfigError``.
        norm_pix_loss: regress per-patch standardized pixels (MAE's option; off in the official CRATE-MAE runs).

    Attributes:
        num_prefix_tokens: 1 ([CLS], first).
        layer_measures: the per-layer measures of :mod:`ratelab.analysis.layer_rates` the ENCODER supports (what
            ``measure_layers(model, ...)`` and ``ratelab measure`` compute); the decoder's go through
            :meth:`layer_stack`.
        model_args: set by the entry points (see :func:`ratelab.core.builder.build_model_with_cfg`).
    """

    num_prefix_tokens = 1
    layer_measures = ENCODER_MEASURES

    def __init__(self, cfg: CrateMAEConfig, *, img_size: int = 224, in_chans: int = 3, num_classes: int | None = None,
                 norm_pix_loss: bool = False) -> None:
        from timm.layers import PatchEmbed  # deferred: `import timm` costs seconds (see adventurer's _timm_note)

        super().__init__()
        no_classifier(num_classes, type(self).__name__)
        p = cfg.patch_size
        if img_size % p:
            raise ValueError(f"img_size={img_size} is not divisible by patch_size={p}")
        self.cfg = cfg
        self.img_size = img_size
        self.in_chans = in_chans
        self.num_classes = None
        self.norm_pix_loss = bool(norm_pix_loss)
        self.num_features = self.embed_dim = d = cfg.embed_dim
        self.patch_size = p
        self.grid_size = (img_size // p, img_size // p)
        n_tokens = self.grid_size[0] * self.grid_size[1] + 1

        self.patch_embed = PatchEmbed(img_size, p, in_chans, d, strict_img_size=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_tokens, d), requires_grad=False)  # fixed sin-cos
        enc = CrateConfig(embed_dim=d, depth=cfg.depth, num_heads=cfg.num_heads, patch_size=p,
                          ista_step=cfg.ista_step, ista_lambda=cfg.ista_lambda)
        self.blocks = nn.ModuleList([CrateBlock(enc) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(d, eps=1e-6)

        self.decoder_embed = nn.Linear(d, d)  # never applied (see the module docstring); kept for the official keys
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, n_tokens, d), requires_grad=False)  # never added
        self.decoder_blocks = nn.ModuleList(
            [CrateMAEDecoderBlock(d, cfg.decoder_num_heads) for _ in range(cfg.decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(d, eps=1e-6)
        self.decoder_pred = nn.Linear(d, p * p * in_chans)
        self.grad_checkpointing = False
        self.init_weights()

    # ---- configuration switches ---------------------------------------------------------------------------
    def set_attn_backend(self, backend: str) -> None:
        """``"auto"``/``"sdpa"`` (fast) or ``"ref"`` (explicit softmax) for every MSSA, encoder and decoder."""
        for blk in (*self.blocks, *self.decoder_blocks):
            blk.attn.attn_backend = backend

    def set_fused_ista(self, fused: bool) -> None:
        """Fast ISTA forms (default) or the paper's three-product reference, in every encoder layer."""
        for blk in self.blocks:
            blk.ista.fused = fused

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return {"stem": r"^cls_token|^mask_token|^pos_embed|^patch_embed", "blocks": r"^blocks\.(\d+)",
                "decoder": r"^decoder_"}

    # ---- MAE API --------------------------------------------------------------------------------------------
    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mask, then encode every token.

        Args:
            imgs: (B, C, H, W).
            mask_ratio: fraction of patches replaced by the mask token.
            noise: (B, N) masking scores (see :func:`ratelab.models.crate_mae.mae.random_masking`); default drawn
                from torch's global generator.

        Returns:
            ``(latent, mask, ids_restore)``: (B, N+1, d) normalized encoder output, [CLS] first and the patches in
            their original order (unlike MAE's, whose latent holds the kept tokens only); (B, N) mask, 1 = masked;
            (B, N) ``ids_restore`` (MAE's convention; the CRATE-MAE decoder does not need it).
        """
        z, mask, ids_restore = self._embed(imgs, mask_ratio, noise)
        for blk in self.blocks:
            z = self._run(blk, z)
        return self.norm(z), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N+1, d) latent -> (B, N, p*p*C) predicted patches. ``ids_restore`` is accepted for MAE's signature
        and unused: the latent is already in patch order."""
        y = latent
        for blk in self.decoder_blocks:
            y = self._run(blk, y)
        return self.decoder_pred(self.decoder_norm(y))[:, 1:]

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loss, pred, mask)``: scalar loss, (B, N, p*p*C) prediction for every patch, (B, N) mask (1 = masked).

        Raises:
            ValueError: a ``mask_ratio`` that masks no patch (the loss would be 0/0), bad images or noise.
        """
        self._check_masks_something(imgs, mask_ratio)
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask

    # ---- encoder features (timm conventions) -----------------------------------------------------------------
    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N+1, d): the encoder on the UNMASKED image, after its final norm ([CLS] first, then
        the patch tokens in raster order) -- what ``forward_encoder(imgs, 0.0)`` returns as ``latent``, without
        drawing noise. Linear probes read the [CLS] token or the mean of the patch tokens."""
        z = self._embed_visible(imgs)
        for blk in self.blocks:
            z = self._run(blk, z)
        return self.norm(z)

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
        """Encoder layer outputs on the unmasked image, without hooks (timm's convention, docs/models.md).

        Args:
            x: (B, C, H, W) images.
            indices: encoder layers to keep: ``None`` all, an int n the last n, a list those (negative from the end).
            norm: apply the encoder's final norm to each kept layer's tokens.
            output_fmt: ``"NLC"`` (B, h*w, d) patch tokens or ``"NCHW"`` (B, d, h, w); [CLS] is split off.
            intermediates_only: return only the intermediates (and the attention maps with ``return_attn``).
            return_attn: also return each kept layer's (B, K, N+1, N+1) MSSA attention ([CLS] is row/column 0),
                on the explicit-softmax path.
            return_prefix_tokens: each intermediate becomes ``(patch tokens, (B, 1, d) [CLS] token)``.

        Returns:
            ``(final, intermediates)``, ``(final, intermediates, attn)`` with ``return_attn``, or the list alone with
            ``intermediates_only``; ``final`` is :meth:`forward_features` (after the final norm, as timm's ViT).

        Raises:
            ValueError: out-of-range ``indices`` or another ``output_fmt``.

        Decoder layers: :meth:`forward_layer_quantities` with ``part="decoder"`` (its ``tokens``).
        """
        check_output_fmt(output_fmt, ("NLC", "NCHW"), type(self).__name__)
        take = resolve_indices(len(self.blocks), indices)
        grid = self._grid(x)
        z, inter, attn = collect_intermediates(
            self._embed_visible(x), self.blocks, take, self._run, norm=self.norm if norm else None,
            output_fmt=output_fmt, grid=grid, return_attn=return_attn, return_prefix_tokens=return_prefix_tokens)
        return pack_intermediates(self.norm(z), inter, attn, intermediates_only=intermediates_only)

    # ---- white-box quantities ---------------------------------------------------------------------------------
    def forward_layer_quantities(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        *,
        part: str = "encoder",
        mask_ratio: float = 0.0,
        noise: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """The white-box quantities of each kept layer of the encoder or of the decoder.

        Args:
            x: (B, C, H, W) images.
            indices: layers of ``part`` to keep (numbered from 0 within that stack), as in
                :meth:`forward_intermediates`.
            part: ``"encoder"`` or ``"decoder"``. The decoder runs on the encoder's latent of the same images.
            mask_ratio: masking before the encoder (default 0: the unmasked image, no noise drawn).
            noise: (B, N) masking scores for ``mask_ratio > 0``.

        Returns:
            dict with ``part``, ``indices`` (kept layers of that stack, forward order), ``mask`` (B, N), and lists
            over the kept layers, all N+1 tokens ([CLS] first):

            * encoder layer l (input Z^l): ``proj`` (B, K, N+1, p) = U_k^T LN1(Z^l); ``half`` (B, N+1, d) =
              Z^{l+1/2} = Z^l + MSSA(LN1(Z^l)); ``tokens`` = Z^{l+1} = ISTA(LN2(Z^{l+1/2})); ``codes`` = the sparse
              codes whose zeros "sparsity" counts (the same tensors as ``tokens``); ``features`` = the latent
              (:meth:`forward_features` when unmasked).
            * decoder layer l (input Y^l; mirrors encoder layer L-1-l): ``half`` = Y^{l+1/2} = D~ LN2(Y^l);
              ``proj`` = U_k^T LN1(Y^{l+1/2}), the decoder MSSA's own projection; ``tokens`` = Y^{l+1} =
              Y^{l+1/2} - MSSA(LN1(Y^{l+1/2})); ``latent`` = the encoder output Y^0; no ``codes`` (the decoder has
              no ReLU, hence no sparse codes).
        """
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        stack = self.blocks if part == "encoder" else self.decoder_blocks
        take = resolve_indices(len(stack), indices)
        ratio = mae.check_mask_ratio(mask_ratio)
        if ratio == 0.0 and noise is None:
            z = self._embed_visible(x)
            mask = z.new_zeros(z.shape[0], z.shape[1] - 1, dtype=torch.float32)
        else:
            z, mask, _ = self._embed(x, ratio, noise)
        res: dict[str, Any] = {"part": part, "indices": take, "mask": mask, "tokens": [], "half": [], "proj": []}
        if part == "decoder":
            for blk in self.blocks:
                z = self._run(blk, z)
            z = res["latent"] = self.norm(z)
        for i, blk in enumerate(stack):
            if i in take:
                out = blk.forward_quantities(z)
                z = out["out"]
                res["tokens"].append(z)
                res["half"].append(out["half"])
                res["proj"].append(out["proj"])
            else:
                z = self._run(blk, z)
        if part == "encoder":
            res["codes"] = res["tokens"]
            res["features"] = self.norm(z)
        return res

    def layer_stack(self, part: str, *, mask_ratio: float = 0.0, seed: int = 0) -> CrateMAELayers:
        """The encoder or decoder as a model :func:`ratelab.analysis.layer_rates.measure_layers` can measure.

        ``measure_layers(model, x)`` measures the encoder already; ``measure_layers(model.layer_stack("decoder"),
        x)`` the decoder (compression before and after each decoder MSSA step; no sparsity). The view shares this
        model's parameters. See :class:`CrateMAELayers`.
        """
        return CrateMAELayers(self, part, mask_ratio=mask_ratio, seed=seed)

    @classmethod
    def checkpoint_filter_fn(cls, state_dict: dict[str, torch.Tensor], model: CrateMAE) -> dict[str, torch.Tensor]:
        from ratelab.models.crate_mae.convert import checkpoint_filter_fn

        return checkpoint_filter_fn(state_dict, model)

    # ---- internals --------------------------------------------------------------------------------------------
    def _embed_visible(self, imgs: torch.Tensor) -> torch.Tensor:
        x = self._patch_tokens(imgs)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self._table(self.pos_embed, self._grid(imgs))

    def _embed(
        self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self._patch_tokens(imgs)
        B, N, _ = x.shape
        _, mask, ids_restore = mae.random_masking(B, N, mask_ratio, noise=noise, device=x.device)
        # The official shuffle -> keep -> append mask tokens -> unshuffle leaves every kept token in its own slot and
        # the mask token in every other one: exactly this select.
        x = torch.where(mask.unsqueeze(-1).bool(), self.mask_token, x)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
        return x + self._table(self.pos_embed, self._grid(imgs)), mask, ids_restore


class CrateMAELayers(nn.Module):
    """One stack of a :class:`CrateMAE` as a model of its own for :func:`~ratelab.analysis.layer_rates.measure_layers`.

    ``blocks`` are that stack's layers and ``forward_layer_quantities(x, indices)`` returns what ``measure_layers``
    reads: for the encoder exactly :meth:`CrateMAE.forward_layer_quantities`; for the decoder ``proj`` is
    U_k^T LN1(Y^{l+1/2}) (compression where the decoder MSSA reads) and ``half`` is the layer output Y^{l+1},
    so that ``compression_half`` (the same layer's LN1 and U applied to ``half``) is the compression right AFTER
    the MSSA step is subtracted -- the decoder's counterpart of the encoder's pair. Layers are numbered within the
    stack; decoder layer l mirrors encoder layer L-1-l.

    Args:
        model: the CRATE-MAE (a submodule: moving or switching modes of the view moves or switches the model).
        part: ``"encoder"`` or ``"decoder"``.
        mask_ratio: masking before the encoder (0: unmasked images). With a ratio, each call draws its noise from
            this view's own generator seeded by ``seed``, so a new view with the same seed repeats its masks.
        seed: see ``mask_ratio``.
    """

    num_prefix_tokens = 1

    def __init__(self, model: CrateMAE, part: str, *, mask_ratio: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        self.model = model
        self.part = part
        self.mask_ratio = mae.check_mask_ratio(mask_ratio)
        self.layer_measures = ENCODER_MEASURES if part == "encoder" else DECODER_MEASURES
        name = getattr(model, "model_name", None)
        if name is not None:
            self.model_name = name
        self._generator = torch.Generator().manual_seed(seed)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.blocks if self.part == "encoder" else self.model.decoder_blocks

    def forward_layer_quantities(self, x: torch.Tensor, indices: int | list[int] | None = None) -> dict[str, Any]:
        noise = None
        if self.mask_ratio > 0:
            n = (x.shape[-2] // self.model.patch_size) * (x.shape[-1] // self.model.patch_size)
            noise = torch.rand(x.shape[0], n, generator=self._generator).to(x.device)
        res = self.model.forward_layer_quantities(x, indices, part=self.part, mask_ratio=self.mask_ratio, noise=noise)
        if self.part == "decoder":
            res = {**res, "half": res["tokens"], "half_step": res["half"]}
        return res


def _create(variant: str, **kwargs: Any) -> CrateMAE:
    return build_model_with_cfg(CrateMAE, CrateMAEConfig, CRATE_MAE_VARIANTS[variant], **kwargs)


@register_model
def crate_mae_tiny_patch16_224(**kwargs: Any) -> CrateMAE:
    return _create("tiny", **kwargs)


@register_model
def crate_mae_small_patch16_224(**kwargs: Any) -> CrateMAE:
    return _create("small", **kwargs)


@register_model
def crate_mae_base_patch16_224(**kwargs: Any) -> CrateMAE:
    return _create("base", **kwargs)


@register_model
def crate_mae_large_patch16_224(**kwargs: Any) -> CrateMAE:
    return _create("large", **kwargs)


def _digits(kwargs: dict[str, Any]) -> dict[str, Any]:
    kwargs.setdefault("img_size", 16)
    kwargs.setdefault("in_chans", 1)
    return kwargs


@register_model
def crate_mae_nano_patch4_16(**kwargs: Any) -> CrateMAE:
    """6 + 6 layers x 128 for 16x16 one-channel inputs (digits)."""
    return _create("nano", **_digits(kwargs))


@register_model
def crate_mae_pico_patch4_16(**kwargs: Any) -> CrateMAE:
    """4 + 4 layers x 64 for 16x16 one-channel inputs."""
    return _create("pico", **_digits(kwargs))


@register_model
def test_crate_mae(**kwargs: Any) -> CrateMAE:
    """2 + 2 layers x 32 on 8x8 RGB inputs, for unit tests."""
    kwargs.setdefault("img_size", 8)
    return _create("test", **kwargs)


__all__ = ["CrateMAE", "CrateMAEDecoderBlock", "CrateMAELayers", "Dictionary", "no_classifier"]
