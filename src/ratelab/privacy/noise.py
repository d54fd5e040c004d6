"""The noise step of DP-SGD: opacus' ``DPOptimizerFastGradientClipping`` with the Gaussian added in place.

``p.grad`` arrives holding the clipped sum S (:func:`ratelab.privacy.clipped_backward`, all-reduced under DDP). The
step is opacus' exactly -- ``p.grad = (S + N(0, (sigma C)^2)) / B`` with B the expected batch size, one
``torch.normal`` draw per parameter, in ``params`` order, from the optimizer's generator -- without opacus' extra
passes over the 59M-entry gradient of a DP-Cap tiny: opacus allocates a zero tensor (only for its shape), a
``deepcopy`` of S as ``p.summed_grad``, the noise, and S + noise; here the noise goes, chunk by chunk, through one
small reused buffer into S itself, and the division follows while the chunk is in cache.

Why the values are the same: torch's CPU ``normal_`` on a contiguous tensor of at least 16 entries draws one
uniform per entry in order, then transforms blocks of 16 (Box-Muller pairs inside a block) and, when the size is
not a multiple of 16, draws 16 more uniforms for the last 16 entries. Chunks that are multiples of 16 long, with a
last chunk of at least 16, therefore consume the same uniforms and produce the same values as one draw over the
whole tensor, and leave the generator in the same state. :func:`add_gaussian_` is the fast path,
:func:`add_gaussian_ref` (one ``torch.normal`` draw, as opacus) its twin; ``tests/test_privacy_fast.py`` checks
bit-equality and the generator state on this machine's torch. Anything else (CUDA, whose Philox offsets depend on
the call pattern; other dtypes; a non-contiguous gradient; pending opacus skip signals or an accumulation in
progress; ``secure_mode``) takes opacus' own path unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["NOISE_CHUNK", "add_gaussian_", "add_gaussian_ref", "make_dp_optimizer"]

# Entries per noise chunk: a multiple of 16 (torch's normal_ block), 1 MiB of float32 -- with the matching chunk of
# the gradient it stays in a core's L2 cache.
NOISE_CHUNK = 1 << 18


def add_gaussian_ref(grad: torch.Tensor, std: float, generator: torch.Generator | None, denom: float) -> torch.Tensor:
    """opacus' arithmetic: ``(grad + torch.normal(0, std, grad.shape)) / denom`` (a new tensor; ``denom`` 1: none)."""
    noise = torch.normal(mean=0, std=std, size=grad.shape, device=grad.device, generator=generator, dtype=grad.dtype)
    out = grad + noise
    if denom != 1:
        out /= denom
    return out


def _chunkable(grad: torch.Tensor) -> bool:
    return grad.device.type == "cpu" and grad.dtype == torch.float32 and grad.is_contiguous() and grad.numel() >= 16


def add_gaussian_(grad: torch.Tensor, std: float, generator: torch.Generator | None, denom: float,
                  chunk: int = NOISE_CHUNK, buf: torch.Tensor | None = None) -> torch.Tensor:
    """In place: ``grad <- (grad + N(0, std^2)) / denom``, the same values and generator use as
    :func:`add_gaussian_ref` (see the module docstring); returns ``grad``."""
    if chunk % 16 or chunk < 16:
        raise ValueError(f"chunk: must be a positive multiple of 16, got {chunk}")
    if not _chunkable(grad):
        noise = torch.normal(mean=0, std=std, size=grad.shape, device=grad.device, generator=generator,
                             dtype=grad.dtype)
        grad.add_(noise)
        if denom != 1:
            grad.div_(denom)
        return grad
    flat = grad.view(-1)
    n = flat.numel()
    # Full chunks, then one last chunk of 16 .. chunk + 15 entries (never fewer than 16: torch draws a shorter
    # tensor by another route).
    starts = list(range(0, max(n - 16, 0) // chunk * chunk, chunk))
    bounds = [(s, chunk) for s in starts] + [(len(starts) * chunk, n - len(starts) * chunk)]
    longest = max(size for _, size in bounds)
    if buf is None or buf.numel() < longest:
        buf = torch.empty(longest, dtype=grad.dtype)
    for start, size in bounds:
        noise = buf[:size].normal_(0, std, generator=generator)
        seg = flat[start:start + size]
        seg.add_(noise)
        if denom != 1:
            seg.div_(denom)
    return grad


def _noise_class() -> type:
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.optimizers.optimizer import _check_processed_flag_tensor, _mark_as_processed

    class InPlaceNoiseDPOptimizer(DPOptimizerFastGradientClipping):
        """opacus' fast-gradient-clipping DP optimizer whose noise step writes into ``p.grad`` (module docstring)."""

        def _fast_path_ok(self) -> bool:
            return (not self.secure_mode and not self._step_skip_queue and not self._is_last_step_skipped
                    and all(p.grad is not None and getattr(p, "summed_grad", None) is None for p in self.params))

        def zero_grad(self, set_to_none: bool = False) -> None:
            # A gradient zeroed in place (set_to_none=False) is a fresh one: drop the mark of its last step.
            for p in self.params:
                if p.grad is not None and hasattr(p.grad, "_processed"):
                    del p.grad._processed
            super().zero_grad(set_to_none)

        def pre_step(self, closure: Any = None) -> bool:
            if not self._fast_path_ok():
                return super().pre_step(closure)
            std = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier) * self.max_grad_norm
            denom = self.expected_batch_size * self.accumulated_iterations if self.loss_reduction == "mean" else 1
            buf = None
            for p in self.params:
                _check_processed_flag_tensor(p.grad)  # a second step on the same gradient would noise it twice
            for p in self.params:
                if std == 0:
                    if denom != 1:
                        p.grad /= denom
                elif _chunkable(p.grad):
                    if buf is None:
                        buf = torch.empty(min(NOISE_CHUNK + 15, max(q.numel() for q in self.params)),
                                          dtype=torch.float32)
                    add_gaussian_(p.grad, std, self.generator, denom, buf=buf)
                else:
                    add_gaussian_(p.grad, std, self.generator, denom)
                _mark_as_processed(p.grad)
            if self.step_hook:
                self.step_hook(self)
            self._is_last_step_skipped = False
            return True

    return InPlaceNoiseDPOptimizer


_NOISE_CLASS: list[type] = []


def make_dp_optimizer(optimizer: torch.optim.Optimizer, *, noise_multiplier: float, max_grad_norm: float,
                      expected_batch_size: int, generator: torch.Generator | None = None,
                      loss_reduction: str = "mean") -> Any:
    """``DPOptimizerFastGradientClipping(optimizer, ...)`` (same arguments, same results) with the in-place noise
    step; built on first use so that importing ``ratelab.privacy`` does not import opacus."""
    if not _NOISE_CLASS:
        _NOISE_CLASS.append(_noise_class())
    return _NOISE_CLASS[0](optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                           expected_batch_size=expected_batch_size, loss_reduction=loss_reduction,
                           generator=generator)
