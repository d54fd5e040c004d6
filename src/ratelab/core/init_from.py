"""Initialize a model from another model's weights where the two differ in a few places: a fine-tuning start.

The case it is built for is CRATE-α's "light recipe" (Yang et al., NeurIPS 2024, §5.5 of the design note): train the
large-patch model first (cheap: 49 tokens at /32), then start the small-patch model (/16, /14, /8) from it, with
the patch embedding re-initialized (its kernel has another shape), the position embedding resampled to the new
grid and, for another label set, the head re-initialized. The same covers the usual "pre-train at one resolution
or on one label set, fine-tune at another".

Rules (:func:`init_from`): every parameter and buffer of the model is either copied from the source (same name and
shape), resampled (the learned position embedding, by the family's ``checkpoint_filter_fn``, when only its grid
differs), or left at its fresh initialization because its name starts with one of ``reinit``. Anything else -- a
key the source lacks, a shape mismatch not listed in ``reinit``, a source key the model does not have -- is an
error naming the keys, so a typo cannot silently leave half a network at random.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ratelab.core.checkpoint import read_state_dict
from ratelab.core.errors import CheckpointError

__all__ = ["InitReport", "init_from"]


@dataclass
class InitReport:
    """What :func:`init_from` did, key by key (names in the model's layout)."""

    source: str
    copied: list[str] = field(default_factory=list)
    resampled: list[str] = field(default_factory=list)
    reinitialized: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def line(self) -> str:
        parts = [f"{len(self.copied)} tensors copied"]
        if self.resampled:
            parts.append(f"resampled {', '.join(self.resampled)}")
        if self.reinitialized:
            parts.append(f"re-initialized {', '.join(self.reinitialized)}")
        if self.ignored:
            parts.append(f"source keys not used {', '.join(self.ignored[:6])}{' ...' if len(self.ignored) > 6 else ''}")
        return f"init from {self.source}: " + "; ".join(parts)


def _matches(key: str, prefixes: Sequence[str]) -> bool:
    """``key`` is one of ``prefixes`` or lies under one, by whole dotted components (``head`` covers
    ``head.weight``, not ``head_norm.weight``)."""
    return any(key == p.rstrip(".") or key.startswith(p.rstrip(".") + ".") for p in prefixes)


def init_from(model: nn.Module, source: str | os.PathLike | Mapping[str, torch.Tensor], *,
              reinit: Sequence[str] = ()) -> InitReport:
    """Load ``source``'s weights into ``model`` except the keys under the ``reinit`` prefixes (module rules above).

    Args:
        model: the freshly built model (its initialization stays where ``reinit`` says).
        source: a run directory, ``model.safetensors``, a trainer checkpoint, an official file of the model's family
            (converted by the family's ``checkpoint_filter_fn``), or a state dict.
        reinit: parameter-name prefixes to keep freshly initialized, e.g. ``("patch_embed", "head")``; their source
            tensors may have any shape or be absent.

    Raises:
        CheckpointError: keys missing from the source, shape mismatches outside ``reinit``, or source keys the model
            does not have (each listed, with the hint to add the prefix to ``reinit``).
    """
    name = str(source) if not isinstance(source, Mapping) else "a state dict"
    sd = dict(source) if isinstance(source, Mapping) else read_state_dict(Path(source))
    reinit = tuple(p for p in (s.strip() for s in reinit) if p)
    # The family's converter renames official keys and resamples pos_embed to the model's grid; it checks depth
    # and width only, so a patch embedding of another shape passes it (and is then re-initialized or an error).
    filt = getattr(type(model), "checkpoint_filter_fn", None)
    shapes_before = {k: tuple(v.shape) for k, v in sd.items()}
    if callable(filt):
        try:
            sd = filt(sd, model)
        except CheckpointError as e:
            raise CheckpointError(f"init_from {name}: {e}") from None
    kept = {k: v for k, v in sd.items() if not _matches(k, reinit)}
    own = model.state_dict()
    report = InitReport(source=name)
    missing, shape, new_sd = [], [], {}
    for k, t in own.items():
        if _matches(k, reinit):
            report.reinitialized.append(k)
            continue
        if k not in kept:
            missing.append(k)
            continue
        v = kept[k]
        if tuple(v.shape) != tuple(t.shape):
            shape.append(f"{k}: source {tuple(v.shape)} vs model {tuple(t.shape)}")
            continue
        new_sd[k] = v.to(dtype=t.dtype)
        (report.resampled if shapes_before.get(k, tuple(v.shape)) != tuple(v.shape) else report.copied).append(k)
    unexpected = sorted(set(kept) - set(own))
    if missing or shape or unexpected:
        parts = [f"init_from {name}: the weights do not fit {type(model).__name__}"]
        if missing:
            parts.append(f"missing in the source ({len(missing)}): {missing[:10]}")
        if shape:
            parts.append(f"shape mismatches ({len(shape)}): {shape[:10]}")
        if unexpected:
            parts.append(f"source keys the model lacks ({len(unexpected)}): {unexpected[:10]}")
        parts.append("list the prefixes to re-initialize in init_reinit (e.g. --init-reinit patch_embed,head)")
        raise CheckpointError("; ".join(parts))
    report.reinitialized = _prefixes_used(report.reinitialized, reinit)
    report.ignored = sorted(k for k in sd if _matches(k, reinit))
    missing_reinit = [p for p in reinit if not any(_matches(k, (p,)) for k in own)]
    if missing_reinit:
        raise CheckpointError(f"init_reinit: no parameter of {type(model).__name__} starts with "
                              f"{missing_reinit}; its top-level modules are "
                              f"{sorted({k.split('.')[0] for k in own})}")
    model.load_state_dict(new_sd, strict=False)
    return report


def _prefixes_used(keys: list[str], prefixes: tuple[str, ...]) -> list[str]:
    return [p for p in prefixes if any(_matches(k, (p,)) for k in keys)]
