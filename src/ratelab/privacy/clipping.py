"""Per-sample gradient clipping on opacus' machinery: the backward of one micro-batch's per-example losses.

:func:`clipped_backward` adds ``sum_i min(1, C / (||g_i|| + 1e-6)) g_i`` to ``p.grad`` for every trainable parameter,
where ``g_i`` is the gradient of example i's loss over ALL parameters together (flat clipping), and leaves nothing
else behind: no raw gradient, no per-sample tensor. Calling it once per micro-batch accumulates the clipped sum of
the whole logical batch; the noise and the division by the expected batch size come after (one draw per logical
step, in opacus' ``DPOptimizerFastGradientClipping`` as :func:`ratelab.privacy.noise.make_dp_optimizer` builds it,
with the noise added in place).

Three ways to get the per-sample norms, as opacus' ``grad_sample_mode``:

* ``ghost`` (default; Li et al. 2022, on opacus' ``GradSampleModuleFastGradientClipping`` and its hooks): the
  norms of Linear and Embedding per-sample gradients from Gram matrices without forming them (or, per Linear layer,
  by forming them where they take no more memory than what the Gram route keeps: mixed ghost clipping), other
  layers (LayerNorm, Conv) from their per-sample gradients. One backward pass, which computes no weight gradients;
  the clipped sum is then assembled from what the hooks kept (book-keeping, Bu et al. 2023) instead of opacus'
  second backward of ``sum_i c_i loss_i``: per Linear layer one weight-gradient product with the coefficients
  folded into the narrower operand.
* ``hooks`` (opacus' ``GradSampleModule``): per-layer closed-form per-sample gradients ``p.grad_sample`` (B x P
  memory), clipped and summed here; one backward.
* ``functorch``: the same with opacus' per-layer ``vmap(grad)`` for every layer.

fp16 with a loss scaler: an example whose per-sample norm is non-finite contributes zero (see
:func:`_finite_coefficients`), so the clipped sum is always finite and the scaler's skip / back-off decision cannot
depend on the data without noise.

The readable twin is :func:`ratelab.privacy.reference.clipped_gradient_sum_ref` (``torch.func`` over the whole
model); ``tests/test_privacy.py`` compares the three modes with it layer type by layer type, and
``tests/test_privacy_fast.py`` the fp16 drop rule.
"""

from __future__ import annotations

import warnings
from functools import partial
from typing import Any

import torch
import torch.nn as nn

from ratelab.core.errors import ConfigError, TrainingDiverged
from ratelab.privacy.config import CLIPPING_MODES

__all__ = ["CLIP_EPS", "check_private_module", "clipped_backward", "make_per_sample_module", "non_leaf_parameters"]

# opacus' stability constant in min(1, C / (||g|| + eps)); DP-Cap's patched engine uses 1e-4.
CLIP_EPS = 1e-6

# Mixed ghost clipping (see _linear_ghost): a Linear layer forms its per-sample gradients when they take at most this
# many times the memory of the activations and output gradients that the Gram route keeps instead (1: the rule that
# also never costs more time than the Gram route).
DIRECT_MEMORY_RATIO = 1.0


def check_private_module(model: nn.Module, clipping: str = "ghost") -> None:
    """Refuse what breaks per-example sensitivity, naming every offending module.

    * layers that mix examples (BatchNorm and the others opacus' ``ModuleValidator`` rejects, e.g. LSTM without its
      DP twin, ``nn.MultiheadAttention``, InstanceNorm with running statistics);
    * under ``ghost`` clipping, a parameter owned by two modules or a module registered twice (parameter tying):
      ghost norms need each parameter's activations from exactly one call.

    Raises:
        ConfigError: the message lists each problem as ``module name (Type): why``.
    """
    if clipping not in CLIPPING_MODES:
        raise ConfigError(f"privacy.clipping: must be one of {list(CLIPPING_MODES)}, got {clipping!r}")
    from opacus.validators import ModuleValidator

    problems = []
    for name, m in model.named_modules():
        # By isinstance, not by exact type (opacus' own lookup): a BatchNorm subclass, e.g. timm's BatchNormAct2d,
        # mixes examples just the same.
        validator = ModuleValidator.VALIDATORS.get(type(m))
        if validator is None:
            validator = next((v for t, v in ModuleValidator.VALIDATORS.items() if isinstance(m, t)), None)
        if validator is None and isinstance(m, nn.modules.batchnorm._BatchNorm):
            problems.append(f"{name or '<model>'} ({type(m).__name__}): BatchNorm mixes the examples of a batch")
            continue
        if validator is None:
            continue
        for err in validator(m):
            why = str(err).split(". ")[0].rstrip(".")
            problems.append(f"{name or '<model>'} ({type(m).__name__}): {why}")
    if problems:
        raise ConfigError("privacy: the model has layers that mix examples or that per-sample clipping cannot "
                          "handle: " + "; ".join(problems) + ". Replace them (e.g. BatchNorm -> GroupNorm/LayerNorm; "
                          "opacus.validators.ModuleValidator.fix does it) before training with DP.")
    if clipping == "ghost":
        odd = [name for name, m in model.named_modules()
               if isinstance(m, nn.Embedding) and (m.scale_grad_by_freq or m.sparse or m.max_norm is not None)]
        if odd:
            raise ConfigError(f"privacy.clipping: ghost clipping supports plain nn.Embedding only; {odd} use "
                              "scale_grad_by_freq, sparse or max_norm. Use clipping='hooks'.")
        owners: dict[int, list[str]] = {}
        for name, m in model.named_modules(remove_duplicate=False):
            for pn, p in m.named_parameters(recurse=False):
                if p.requires_grad:
                    owners.setdefault(id(p), []).append(f"{name}.{pn}" if name else pn)
        tied = [names for names in owners.values() if len(names) > 1]
        if tied:
            listed = "; ".join(" = ".join(names) for names in tied)
            raise ConfigError(f"privacy.clipping: ghost clipping does not support parameter tying, and these "
                              f"parameters are shared: {listed}. Untie them or use clipping='hooks'.")


def non_leaf_parameters(model: nn.Module) -> list[str]:
    """Trainable parameters held directly by a module that has submodules (a ViT's ``cls_token``, ``pos_embed``).

    opacus computes their per-sample gradients with ``vmap`` over that module's WHOLE forward (exact, but about one
    more forward and backward per step); DP-Cap freezes its [CLS] token and uses fixed positions, which avoids it.
    """
    out = []
    for name, m in model.named_modules():
        if next(m.children(), None) is None:
            continue
        out += [f"{name}.{pn}" if name else pn for pn, p in m.named_parameters(recurse=False) if p.requires_grad]
    return out


def make_per_sample_module(model: nn.Module, clipping: str = "ghost") -> nn.Module:
    """Wrap ``model`` in the opacus module that computes per-sample norms (``ghost``) or gradients (the others).

    The wrapper's ``state_dict`` keys carry a ``_module.`` prefix; :func:`ratelab.core.checkpoint.unwrap_model` peels
    it, so checkpoints keep the model's own names. Losses are summed (``loss_reduction="sum"``): the per-sample
    gradients are those of each example's own loss.
    """
    check_private_module(model, clipping)
    from opacus.grad_sample import GradSampleModule

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="opacus")
        if clipping == "ghost":
            return _GhostClippingModule(model, batch_first=True, loss_reduction="sum", strict=False,
                                        use_ghost_clipping=True)
        return GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=False,
                                force_functorch=clipping == "functorch")


def linear_norm_sample(layer: nn.Linear, activations: list[torch.Tensor],
                       backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradient norms of a Linear layer (opacus' norm-sampler signature); see :func:`_linear_ghost`."""
    return _linear_ghost(layer, activations, backprops)[0]


def _linear_ghost(layer: nn.Linear, activations: list[torch.Tensor],
                  backprops: torch.Tensor) -> tuple[dict[nn.Parameter, torch.Tensor], list[tuple[Any, ...]]]:
    """Per-sample gradient norms of a Linear layer by one of two exact routes, and what book-keeping needs.

    With activations A_i (T x d_in) and output gradients G_i (T x d_out) of example i, the weight gradient is
    G_i^T A_i. Ghost norm (opacus' only route): ||G_i^T A_i||^2 = <A_i A_i^T, G_i G_i^T>, T^2 (d_in + d_out) work on
    top of the weight-gradient product that book-keeping does later with A and G kept. Direct: form G_i^T A_i (that
    product itself, T d_in d_out, done here instead of in book-keeping), take its norm and keep it, d_in d_out memory
    per example. Counted in time the direct route nearly always wins once the product is kept; counted in memory it
    wins only while d_in d_out <= T (d_in + d_out), and the rule is the memory one (``DIRECT_MEMORY_RATIO`` = 1, Bu et
    al. 2022's mixed ghost clipping): the Gram route for DP-Cap's 30k-way head over a short caption and for the ViT's
    wide layers (qkv, MLP), the direct one for narrow layers over many tokens (attn.proj, the bridge). Forming the
    ViT-Ti encoder's qkv/MLP gradients too measured 5 % faster at dpcap_tiny (batch 8) for +535 MiB peak (+57 %).
    The bias gradient sum_t g_t is formed directly, O(T d_out).

    Returns:
        ``({param: (n,) norms}, book entries)`` with entries ``("sample", p, per-sample grads)`` or
        ``("linear", p, activations (n, T, d_in), output grads (n, T, d_out))``.
    """
    a = activations[0].to(backprops.dtype)
    g = backprops
    n = g.shape[0]
    norms: dict[nn.Parameter, torch.Tensor] = {}
    book: list[tuple[Any, ...]] = []
    g = g.reshape(n, -1, g.shape[-1])
    a = a.reshape(n, -1, a.shape[-1])
    if layer.weight.requires_grad:
        t, d_in, d_out = a.shape[1], a.shape[2], g.shape[2]
        if d_in * d_out > DIRECT_MEMORY_RATIO * t * (d_in + d_out):
            gram = (torch.bmm(g, g.transpose(1, 2)).float() * torch.bmm(a, a.transpose(1, 2)).float()).sum((1, 2))
            norms[layer.weight] = gram.clamp(min=0).sqrt()
            book.append(("linear", layer.weight, a, g))
        else:
            gs = torch.bmm(g.transpose(1, 2), a)
            norms[layer.weight] = torch.linalg.vector_norm(gs, dim=(1, 2), dtype=torch.float32)
            book.append(("sample", layer.weight, gs))
    if layer.bias is not None and layer.bias.requires_grad:
        gb = g.sum(1)
        norms[layer.bias] = torch.linalg.vector_norm(gb, dim=1, dtype=torch.float32)
        book.append(("sample", layer.bias, gb))
    return norms, book


def _ghost_class() -> type:
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.grad_sample.functorch import ft_compute_per_sample_gradient

    class GhostClippingModule(GradSampleModuleFastGradientClipping):
        """opacus' ghost-clipping module with book-keeping instead of the second backward pass.

        The backward hooks keep what they saw (Linear / Embedding: activations and output gradients; every other
        layer: its per-sample gradients, which opacus forms anyway to take their norms); once the clipping
        coefficients c are known, :func:`_book_keeping` contracts them into the clipped sum (Bu et al. 2023,
        "Differentially private optimization on large model at small cost"). That replaces the second backward
        (opacus' loss.backward of sum_i c_i loss_i) by one weighted weight-gradient product per layer. Also a
        cheaper Linear norm (:func:`linear_norm_sample`) and a reuse error naming the module.
        """

        NORM_SAMPLERS = {**GradSampleModuleFastGradientClipping.NORM_SAMPLERS, nn.Linear: linear_norm_sample}

        def add_hooks(self, *, loss_reduction: str = "mean", batch_first: bool = True,
                      force_functorch: bool = False) -> None:
            # opacus' hooks minus its full backward hooks: the output gradient is read by a tensor hook on each
            # layer's output (registered in capture_activations_hook), which costs a fraction of a full backward
            # hook's wrapping of every layer's inputs and outputs.
            from opacus.grad_sample.functorch import prepare_layer

            if hasattr(self._module, "autograd_grad_sample_hooks"):
                raise ValueError("Trying to add hooks twice to the same model")
            self._module.autograd_grad_sample_hooks = []
            self.autograd_grad_sample_hooks = self._module.autograd_grad_sample_hooks
            self._hook_args = {"loss_reduction": loss_reduction, "batch_first": batch_first}
            for module in self.iterate_submodules(self._module):
                if force_functorch or self._get_module_type(module) not in self.GRAD_SAMPLERS:
                    prepare_layer(module, batch_first=batch_first)
                self.autograd_grad_sample_hooks.append(module.register_forward_hook(self.capture_activations_hook))
            self.enable_hooks()

        def _output_grad_hook(self, module: nn.Module, grad: torch.Tensor) -> None:
            self.capture_backprops_hook(module, None, (grad,), **self._hook_args)

        def capture_backprops_hook(self, module: nn.Module, _forward_input: Any, forward_output: Any,
                                   loss_reduction: str, batch_first: bool) -> None:
            if not self.hooks_enabled:
                return
            activations, backprops = self.rearrange_grad_samples(
                module=module, backprops=forward_output[0].detach(), loss_reduction=loss_reduction,
                batch_first=batch_first)
            if backprops.dtype == torch.float16:
                # fp16 (loss scaling): the per-sample work in float32, where a scaled gradient does not overflow
                backprops = backprops.float()
                activations = [a.float() if isinstance(a, torch.Tensor) and a.dtype == torch.float16 else a
                               for a in activations]
            if type(module) is nn.Linear:
                norms, entries = _linear_ghost(module, activations, backprops)
            elif type(module) is nn.Embedding:
                if module.padding_idx is not None:  # its row gets no gradient (torch's rule), so no norm either
                    keep = (activations[0] != module.padding_idx).unsqueeze(-1)
                    backprops = backprops * keep.to(backprops.dtype)
                norms = self.NORM_SAMPLERS[nn.Embedding](module, activations, backprops)
                entries = [("embedding", module.weight, activations[0], backprops)]
            else:
                sampler = self.GRAD_SAMPLERS.get(type(module), ft_compute_per_sample_gradient)
                grads = {p: gs for p, gs in sampler(module, activations, backprops).items() if p.requires_grad}
                norms = {p: torch.linalg.vector_norm(gs.reshape(len(gs), -1), dim=1, dtype=torch.float32)
                         for p, gs in grads.items()}
                entries = [("sample", p, gs) for p, gs in grads.items()]
            for p, ns in norms.items():
                if p.requires_grad:
                    p._norm_sample = ns
                    p._forward_counter -= 1
            self.book += entries
            if not module.activations and hasattr(module, "max_batch_len"):
                del module.max_batch_len

        def __init__(self, m: nn.Module, **kwargs: Any) -> None:
            super().__init__(m, **kwargs)
            self._names = {id(mod): name for name, mod in m.named_modules()}
            self.layer_outputs: list[torch.Tensor] = []
            self.book: list[tuple[Any, ...]] = []

        def capture_activations_hook(self, module: nn.Module, forward_input: Any, _forward_output: Any) -> None:
            before = len(getattr(module, "activations", ()))
            try:
                super().capture_activations_hook(module, forward_input, _forward_output)
            except NotImplementedError:
                raise ConfigError(
                    f"privacy.clipping: module {self._names.get(id(module), type(module).__name__)!r} "
                    f"({type(module).__name__}) ran twice in one forward pass (parameter tying); ghost clipping "
                    "needs one call per module. Use clipping='hooks'.") from None
            if len(getattr(module, "activations", ())) > before:
                # The backward pass needs gradients down to the layers' outputs only, never the weight gradients
                # (see _ghost_backward); the tensor hook hands the output gradient to opacus' per-sample hook.
                outs = _forward_output if isinstance(_forward_output, (tuple, list)) else (_forward_output,)
                outs = [t for t in outs if isinstance(t, torch.Tensor) and t.requires_grad]
                if not outs:  # nothing to differentiate (a non-tensor output): no per-sample gradient flows here
                    module.activations.pop()
                    for p in module.parameters(recurse=False):
                        if p.requires_grad:
                            p._forward_counter -= 1
                    return
                outs[0].register_hook(partial(self._output_grad_hook, module))
                self.layer_outputs.append(outs[0])

    return GhostClippingModule


class _LazyGhost:
    # The subclass is built on first use: importing ratelab.privacy must not import opacus.
    cls: type | None = None

    def __call__(self, m: nn.Module, **kwargs: Any) -> nn.Module:
        if _LazyGhost.cls is None:
            _LazyGhost.cls = _ghost_class()
        return _LazyGhost.cls(m, **kwargs)


_GhostClippingModule = _LazyGhost()


def _is_ghost(module: nn.Module) -> bool:
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    return isinstance(module, GradSampleModuleFastGradientClipping)


def _clip_coefficients(norms: torch.Tensor, max_grad_norm: float, scale: float) -> torch.Tensor:
    # Norms of gradients of the scaled loss (AMP): the threshold scales with them.
    return (max_grad_norm / (norms / scale + CLIP_EPS)).clamp(max=1.0)


def clipped_backward(module: nn.Module, losses: torch.Tensor, *, max_grad_norm: float, scaler: Any = None) -> None:
    """Add the clipped sum of the per-example gradients of ``losses`` to ``p.grad`` (of ``module``'s parameters).

    Args:
        module: the wrapper :func:`make_per_sample_module` returned (the forward that produced ``losses`` ran
            through it, possibly inside DDP).
        losses: ``(n,)`` per-example losses, each a function of its own example only.
        max_grad_norm: C.
        scaler: a ``torch.amp.GradScaler`` (fp16) or None. The backward runs on the scaled losses, the threshold is
            scaled alike, and ``p.grad`` holds the scaled clipped sum for the scaler to unscale. An example whose
            per-sample norm is non-finite (its scaled backward overflowed) contributes zero, so the sum stays
            finite: the scaler never skips a DP step nor lowers its scale because of the data (that event was
            released without noise); its scale only grows on its schedule, so an example that overflows is
            dropped, not retried (keep ``init_scale`` / growth modest, or prefer bf16, which needs no scaler).

    Raises:
        TrainingDiverged: a per-sample gradient norm is non-finite without a loss scaler.
    """
    if losses.ndim != 1:
        raise ValueError(f"losses: expected a (n,) vector of per-example losses, got shape {tuple(losses.shape)}")
    scale = float(scaler.get_scale()) if scaler is not None else 1.0
    params = [p for p in module.parameters() if p.requires_grad]
    prev = [p.grad for p in params]
    for p in params:
        p.grad = None
    with warnings.catch_warnings():
        # opacus reads the gradient at each layer's output through full backward hooks; torch warns when no input of
        # a layer requires grad (the first layer), which is exactly the case it handles.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        # opacus' functorch path vmaps layers whose ops (SDPA on CPU) have no batching rule yet: slower, still exact.
        warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
        # opacus' functorch path re-enters autocast with the lowest dtype it saw, which torch flags on CPU for fp32.
        warnings.filterwarnings("ignore", message=r"In \w+ autocast, but the target dtype is not supported")
        if _is_ghost(module):
            _ghost_backward(module, params, losses, max_grad_norm, scale, scaler is not None)
        else:
            # opacus' Embedding sampler fills the padding row, which torch's gradient leaves at zero.
            padding = {id(m.weight): m.padding_idx for m in module.modules()
                       if isinstance(m, nn.Embedding) and m.padding_idx is not None}
            _grad_sample_backward(params, losses, max_grad_norm, scale, scaler is not None, padding)
    for p, g in zip(params, prev):
        if p.grad is None:
            p.grad = g if g is not None else torch.zeros_like(p)
        elif g is not None:
            p.grad.add_(g)


def _total_norms(per_param: list[torch.Tensor], n: int, device: torch.device) -> torch.Tensor:
    if not per_param:
        return torch.zeros(n, device=device)
    return torch.stack([t.to(device=device, dtype=torch.float32) for t in per_param]).norm(2, dim=0)


def _finite_coefficients(norms: torch.Tensor, max_grad_norm: float, scale: float,
                         scaled: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Clipping coefficients, and (only when some norm is non-finite) the mask of the examples that are kept.

    Without a loss scaler a non-finite norm is a diverged run (TrainingDiverged). With one (fp16) the example is
    dropped: coefficient 0 and, in the contraction, its rows zeroed (0 * inf would be NaN). Whether example i is
    dropped depends on example i alone, and its contribution is then 0, within the bound C that the noise is
    calibrated to; every other example's contribution is finite. So the clipped sum is always finite and the
    scaler's inf check -- the skip / back-off decision, taken on this sum and then on the noised gradient -- sees
    nothing that depends on the data (opacus' and our earlier behaviour, a non-finite sum that made the scaler skip
    the step, released that event without noise).
    """
    coef = _clip_coefficients(norms, max_grad_norm, scale)
    bad = ~torch.isfinite(norms)
    if not bool(bad.any()):
        return coef, None
    if not scaled:
        raise TrainingDiverged(f"privacy: {int(bad.sum())} per-sample gradient norm(s) are not finite", step=-1,
                               loss=float("nan"))
    keep = ~bad
    return torch.where(keep, coef, torch.zeros_like(coef)), keep


def _zero_dropped(t: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    # Rows (dim 0 = example) of dropped examples to exact zeros; torch.where, not a product: inf * 0 is NaN.
    if keep is None:
        return t
    return torch.where(keep.view(-1, *([1] * (t.dim() - 1))), t, torch.zeros((), dtype=t.dtype, device=t.device))


def _ghost_backward(module: nn.Module, params: list[torch.Tensor], losses: torch.Tensor, max_grad_norm: float,
                    scale: float, scaled: bool) -> None:
    for p in params:
        if hasattr(p, "_norm_sample"):
            del p._norm_sample  # a parameter this forward did not reach must not bring an old micro-batch's norms
    # The backward needs the gradient at every hooked layer's output (the hooks turn it into per-sample norms and
    # keep it), not the weight gradients: asking autograd for the former only skips the weight-gradient products.
    outputs, module.layer_outputs, module.book = module.layer_outputs, [], []
    if outputs:
        torch.autograd.grad(losses.sum() * scale, outputs, allow_unused=True)
    else:
        (losses.sum() * scale).backward()
    del outputs
    norms = _total_norms([p._norm_sample for p in params if getattr(p, "_norm_sample", None) is not None],
                         losses.shape[0], losses.device)
    coef, keep = _finite_coefficients(norms, max_grad_norm, scale, scaled)
    for p in params:
        p.grad = None
        if hasattr(p, "_norm_sample"):
            del p._norm_sample
    book, module.book = module.book, []
    _book_keeping(book, coef, keep)


def _book_keeping(book: list[tuple[Any, ...]], coef: torch.Tensor, keep: torch.Tensor | None = None) -> None:
    """Write ``sum_i c_i g_i`` into ``p.grad`` from what the backward hooks kept (see GhostClippingModule).

    ``keep``: the examples not dropped for a non-finite norm (None: all), see :func:`_finite_coefficients`. A Linear
    layer's sum is the weight-gradient product with the coefficients folded into the narrower operand (the
    activations for a 384 -> 30,522 head: 80x fewer multiplications than scaling its output gradients).
    """
    book.reverse()  # the order the hooks ran in (output side first), popped: each entry is freed once contracted
    while book:
        kind, p, *data = book.pop()
        data = [_zero_dropped(t, keep) if t.is_floating_point() else t for t in data]
        if kind == "sample":  # per-sample gradients (n, *shape)
            (gs,) = data
            g = torch.einsum("i,i...->...", coef.to(gs.dtype), gs)
        else:
            x, back = data  # layer input (n, ..., d_in) or token ids (n, ...); output gradients (n, ..., d_out)
            c = coef.to(back.dtype).view(-1, *([1] * (back.dim() - 1)))
            if kind == "linear":
                if x.shape[-1] < back.shape[-1]:
                    g = back.reshape(-1, back.shape[-1]).t() @ (x * c).reshape(-1, x.shape[-1])
                else:
                    g = (back * c).reshape(-1, back.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
            else:  # embedding: every token's row receives its example's weighted output gradient
                cg = (back * c).reshape(-1, back.shape[-1])
                g = torch.zeros(p.shape, dtype=cg.dtype, device=cg.device).index_add_(0, x.reshape(-1), cg)
        g = g.to(p.dtype)
        p.grad = g if p.grad is None else p.grad + g


def _grad_sample_backward(params: list[torch.Tensor], losses: torch.Tensor, max_grad_norm: float,
                          scale: float, scaled: bool, padding: dict[int, int]) -> None:
    (losses.sum() * scale).backward()
    n = losses.shape[0]
    samples = [(p, p.grad_sample) for p in params if getattr(p, "grad_sample", None) is not None]
    for p, gs in samples:
        if id(p) in padding and isinstance(gs, torch.Tensor):
            gs[:, padding[id(p)]] = 0
    for _, gs in samples:
        if isinstance(gs, list):  # opacus stacks the per-sample gradients of repeated calls (tied parameters)
            raise ConfigError("privacy: a module ran twice in one forward pass; its per-sample gradients were "
                              "stacked, not summed")
    norms = _total_norms([torch.linalg.vector_norm(gs.reshape(n, -1), dim=1, dtype=torch.float32)
                          for _, gs in samples], n, losses.device)
    coef, keep = _finite_coefficients(norms, max_grad_norm, scale, scaled)
    for p in params:
        p.grad = None
    for p, gs in samples:
        # Under autocast the per-sample gradients come in the activations' dtype; the sum is the parameter's (fp16:
        # summed in float32, where a sum of n contributions of norm <= C * scale cannot overflow).
        gs = _zero_dropped(gs.float() if gs.dtype == torch.float16 else gs, keep)
        p.grad = torch.einsum("i,i...->...", coef.to(gs.dtype), gs).to(p.dtype)
        p.grad_sample = None
