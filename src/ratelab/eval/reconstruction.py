"""Masked-autoencoder reconstructions as a figure: original, masked input, reconstruction, reconstruction with the
visible patches pasted back (the four columns of the MAE paper's figures), one row per image.

Works with any model of the MAE convention (``model(imgs, mask_ratio, noise) -> (loss, pred, mask)``,
``patchify``/``unpatchify``; ``mask`` is 1 on masked patches). With ``norm_pix_loss`` the prediction lives in
per-patch normalized pixels; for display it is mapped back with each target patch's own mean and variance, as
MAE's visualization does (so the colours of masked patches are borrowed from the target; the structure is the
model's).
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["reconstruct", "reconstruction_figure"]


@torch.no_grad()
def reconstruct(model: nn.Module, imgs: torch.Tensor, *, mask_ratio: float = 0.75,
                noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """(B, C, H, W) images -> ``{"original", "masked", "reconstruction", "pasted", "mask", "loss"}`` images on
    CPU (masked input has masked patches zeroed)."""
    was_training = model.training
    model.eval()
    try:
        loss, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)
    finally:
        model.train(was_training)
    target = model.patchify(imgs)
    if getattr(model, "norm_pix_loss", False):
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        pred = pred * (var + 1e-6) ** 0.5 + mean
    m = mask.unsqueeze(-1).to(pred.dtype)
    return {
        "original": imgs.detach().cpu(),
        "masked": model.unpatchify(target * (1 - m)).cpu(),
        "reconstruction": model.unpatchify(pred).cpu(),
        "pasted": model.unpatchify(target * (1 - m) + pred * m).cpu(),
        "mask": mask.detach().cpu(),
        "loss": loss.detach().cpu(),
    }


def _to_display(img: torch.Tensor) -> torch.Tensor:
    """(C, H, W) normalized image -> (H, W, 3) in [0, 1], scaled by the original's range (set by the caller)."""
    img = img.float()
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    return img.permute(1, 2, 0)


def reconstruction_figure(parts: dict[str, torch.Tensor], *, max_rows: int = 8, title: str = ""):
    """A matplotlib Figure of :func:`reconstruct`'s output: one row per image, four columns. Every panel of a
    row shares the original's intensity range, so a reconstruction's contrast is comparable to the original's."""
    from matplotlib.figure import Figure

    cols = ("original", "masked", "reconstruction", "pasted")
    n = min(max_rows, parts["original"].shape[0])
    fig = Figure(figsize=(1.6 * len(cols), 1.6 * n + (0.4 if title else 0)))
    axes = fig.subplots(n, len(cols), squeeze=False)
    for i in range(n):
        lo, hi = parts["original"][i].min(), parts["original"][i].max()
        scale = (hi - lo).clamp_min(1e-8)
        for j, c in enumerate(cols):
            ax = axes[i][j]
            ax.imshow(((_to_display(parts[c][i]) - lo) / scale).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(c if c != "pasted" else "+ visible", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
