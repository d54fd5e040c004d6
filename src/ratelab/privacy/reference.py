"""The readable twin of per-sample clipping: ``torch.func`` per-example gradients of the whole model, no opacus.

``vmap(grad(loss of one example))`` materialises every example's full gradient (B x P memory), so this is for
tests on tiny batches: :func:`clipped_gradient_sum_ref` is what ``ratelab.privacy.clipping.clipped_backward`` must
equal, in every clipping mode and for every layer type.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from ratelab.privacy.clipping import CLIP_EPS

__all__ = ["clipped_gradient_sum_ref", "per_sample_gradients_ref"]


def per_sample_gradients_ref(model: nn.Module, loss_fn: Callable[..., torch.Tensor],
                             *batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{name: (n, *param.shape)}`` gradients of each example's own loss w.r.t. the trainable parameters.

    Args:
        model: the bare model (its frozen parameters and buffers are held constant).
        loss_fn: ``loss_fn(call, *example) -> scalar`` where ``call(*args)`` runs the model and every tensor of
            ``example`` is ONE example with a leading batch dimension of 1.
        batch: tensors with the examples along dim 0.
    """
    from torch.func import functional_call, grad, vmap

    trainable = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    fixed = {k: v.detach() for k, v in model.named_parameters() if not v.requires_grad}
    fixed.update(dict(model.named_buffers()))

    def one(params: dict[str, torch.Tensor], *example: torch.Tensor) -> torch.Tensor:
        def call(*args: torch.Tensor) -> torch.Tensor:
            return functional_call(model, {**params, **fixed}, args)

        return loss_fn(call, *(t.unsqueeze(0) for t in example))

    return vmap(grad(one), in_dims=(None, *([0] * len(batch))), randomness="different")(trainable, *batch)


def clipped_gradient_sum_ref(model: nn.Module, loss_fn: Callable[..., torch.Tensor], *batch: torch.Tensor,
                             max_grad_norm: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``(sum_i min(1, C / (||g_i|| + 1e-6)) g_i per parameter, (n,) norms ||g_i||)``; flat (all-parameter) norms."""
    grads = per_sample_gradients_ref(model, loss_fn, *batch)
    n = batch[0].shape[0]
    norms = torch.stack([g.reshape(n, -1).norm(2, dim=1) for g in grads.values()]).norm(2, dim=0)
    coef = (max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0)
    return {k: torch.einsum("i,i...->...", coef, g) for k, g in grads.items()}, norms
