"""Literal key maps and the converter skeleton shared by every family's ``convert.py``.

A map is a table of templates, ``"layers.{i}.norm.weight" -> "blocks.{i}.norm1.weight"``, where ``{i}`` stands for a
block index that is carried over unchanged. Layouts are told apart by a few signature keys that only one of them has.

:class:`OfficialConverter` is the ``checkpoint_filter_fn`` every family needs around its map: wrapper prefixes
stripped, layout detected (an error listing the file's keys when it is neither), official keys renamed with the
left-over keys and a depth/width mismatch reported, the classifier dropped for a features-only model, and the
position embedding resampled to the model's grid. A family's ``convert.py`` is then its key map plus its quirks,
passed as hooks (``check_official`` for extra fit checks, ``fix_official`` to fill what the official layout leaves
out). It lives in ``core`` and imports nothing above it: the position-embedding resampler is handed in by the family.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ratelab.core.errors import CheckpointError

Tensors = dict[str, torch.Tensor]

# Wrapper prefixes (DDP, torch.compile, opacus); read_state_dict strips them already, the converter again so that it
# also works when called directly (e.g. through timm's load_checkpoint(filter_fn=...)).
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_module.")

# Every OfficialConverter built so far, in creation order: a file refused by one family is tried against the others
# to say which family it belongs to. Families register by defining their converter (their package imports its
# ``convert`` module), so the table is complete once ``ratelab.models`` is imported.
_CONVERTERS: list[OfficialConverter] = []

# Layouts of checkpoints that no ratelab family reads, by keys that all of their state dicts have: naming them
# saves a user from guessing which model a foreign file is for.
FOREIGN_LAYOUTS: dict[str, tuple[str, ...]] = {
    "a timm/DeiT ViT checkpoint (no ratelab family has this layout)": (
        "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight"),
}


def _article(word: str) -> str:
    return "an" if word[:1].upper() in "AEIOU" else "a"


def identify_checkpoint(state_dict: Mapping[str, torch.Tensor], *, exclude: Any = None) -> list[str]:
    """What ``state_dict``'s keys match, as phrases: ``["an Adventurer checkpoint (ratelab layout; use an
    adventurer_* model)"]``; empty when nothing known matches.

    Tried: the converter of every family registered so far (both layouts; ``exclude`` skips one), then, when no
    family matched, :data:`FOREIGN_LAYOUTS`.
    """
    sd = strip_prefixes(state_dict)
    found = []
    for conv in _CONVERTERS:
        if conv is exclude:
            continue
        layout = conv.key_map.detect_layout(sd)
        if layout is not None:
            where = "ratelab layout" if layout == "ratelab" else f"official {conv.source} layout"
            pattern = conv.model_pattern or f"{conv.family.lower()}_*"
            found.append(f"{conv.article or _article(conv.family)} {conv.family} checkpoint ({where}; use "
                         f"{_article(pattern)} {pattern} model)")
    if not found:  # a family that reads these keys (ViT-MAE reads timm blocks) makes the foreign label wrong
        found += [what for what, keys in FOREIGN_LAYOUTS.items() if all(k in sd for k in keys)]
    return found


class KeyMap:
    """Official -> ratelab key renaming from a literal template table, plus layout detection.

    Args:
        table: official template -> ratelab template (``{i}`` = block index).
        ratelab_signature: keys that every ratelab-layout state dict of the family has.
        official_signature: keys that every official-layout state dict has.
    """

    def __init__(self, table: Mapping[str, str], *, ratelab_signature: Sequence[str],
                 official_signature: Sequence[str]) -> None:
        self.table = dict(table)
        self.ratelab_signature = tuple(ratelab_signature)
        self.official_signature = tuple(official_signature)
        self._patterns = [(self._compile(src), dst) for src, dst in self.table.items()]
        self._ratelab_patterns = [self._compile(dst) for dst in self.table.values() if "{i}" in dst]

    @staticmethod
    def _compile(template: str) -> re.Pattern[str]:
        return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$")

    def detect_layout(self, state_dict: Mapping[str, torch.Tensor]) -> str | None:
        """``"ratelab"``, ``"official"`` or ``None`` when the keys match neither signature."""
        if all(k in state_dict for k in self.ratelab_signature):
            return "ratelab"
        if all(k in state_dict for k in self.official_signature):
            return "official"
        return None

    def to_ratelab_key(self, key: str) -> str | None:
        """The ratelab key for one official key, or ``None`` when no template matches."""
        for pattern, dst in self._patterns:
            m = pattern.match(key)
            if m:
                return dst.replace("{i}", m.group("i")) if "{i}" in dst else dst
        return None

    def official_block(self, key: str) -> int | None:
        """Block index of an official key (``None``: not a per-block key of the map)."""
        for pattern, dst in self._patterns:
            m = pattern.match(key)
            if m and "{i}" in dst:
                return int(m.group("i"))
        return None

    def ratelab_block(self, key: str) -> int | None:
        """Block index of a ratelab key (``None``: not a per-block key of the map)."""
        for pattern in self._ratelab_patterns:
            m = pattern.match(key)
            if m:
                return int(m.group("i"))
        return None

    def map_keys(self, state_dict: Mapping[str, torch.Tensor]) -> tuple[Tensors, list[str]]:
        """Rename official keys. Returns (renamed dict, sorted official keys that matched no template)."""
        out: Tensors = {}
        leftover: list[str] = []
        for key, value in state_dict.items():
            new = self.to_ratelab_key(key)
            if new is None:
                leftover.append(key)
            else:
                out[new] = value
        return out, sorted(leftover)


def strip_prefixes(state_dict: Mapping[str, torch.Tensor], prefixes: Sequence[str] = WRAPPER_PREFIXES) -> Tensors:
    """Keys without leading wrapper prefixes (repeated ones too: ``module.module.x`` -> ``x``)."""
    out: Tensors = {}
    for k, v in state_dict.items():
        stripped = True
        while stripped:
            stripped = False
            for p in prefixes:
                if k.startswith(p):
                    k, stripped = k[len(p):], True
        out[k] = v
    return out


def drop_head(state_dict: Mapping[str, torch.Tensor], prefixes: Sequence[str] = ("head.",)) -> Tensors:
    """The state dict without the classifier's keys (for a features-only model or a new head)."""
    return {k: v for k, v in state_dict.items() if not k.startswith(tuple(prefixes))}


def fit_pos_embed(
    state_dict: Tensors,
    model: Any,
    resample: Callable[..., torch.Tensor],
    *,
    key: str = "pos_embed",
    prefix_last: bool = False,
) -> None:
    """Resample ``state_dict[key]`` in place when its patch grid differs from the model's.

    Args:
        state_dict: ratelab-layout tensors.
        model: has ``pos_embed`` (1, prefix + N, D), ``grid_size`` and ``num_prefix_tokens``.
        resample: ``resample(pe, grid_size, num_prefix_tokens=..., prefix_last=...)``, e.g.
            :func:`ratelab.layers.patch.resample_pos_embed`.
        key: the position embedding's key.
        prefix_last: the prefix (class) tokens are the LAST rows (Adventurer), not the first.
    """
    pe = state_dict.get(key)
    own = getattr(model, key)
    if pe is None or pe.ndim != 3 or pe.shape[1:] == own.shape[1:] or pe.shape[-1] != own.shape[-1]:
        return  # equal, absent, or a width mismatch the strict loader reports
    try:
        state_dict[key] = resample(pe, model.grid_size, num_prefix_tokens=model.num_prefix_tokens,
                                   prefix_last=prefix_last)
    except ValueError as e:
        raise CheckpointError(f"{key} {tuple(pe.shape)} cannot be resampled to grid {model.grid_size}: {e}") from e


@dataclass(frozen=True)
class OfficialConverter:
    """A family's ``checkpoint_filter_fn``: ratelab or official layout in, ``model``'s keys out.

    Call it as ``converter(state_dict, model)``. The model is expected to carry ``cfg.depth`` and ``cfg.embed_dim``
    (checked against the official file when ``width_key`` is given) and ``num_classes``.

    Attributes:
        family: display name, e.g. ``"CRATE"`` (errors read "not a CRATE checkpoint").
        source: upstream repository, e.g. ``"Ma-Lab-Berkeley/CRATE"``.
        key_map: the literal official -> ratelab map with both layout signatures.
        width_key: ``(official key, dim)`` whose size is the model width; ``None`` skips the depth/width check.
        head_prefixes: ratelab key prefixes of the classifier, dropped when ``model.num_classes == 0``.
        pos_embed_key: ratelab key of a learned position embedding to resample (``None``: none).
        resample_pos_embed: the resampler (see :func:`fit_pos_embed`); required with ``pos_embed_key``.
        prefix_last: the class token's row is the last one of the position embedding.
        foreign_hints: key present in an unrecognized file -> sentence appended to the error (what it looks like),
            used when the file matches no registered family (:func:`identify_checkpoint`) and no foreign layout.
        check_official: ``(official_state_dict, model) -> problems`` for family-specific fit checks.
        fix_official: ``(mapped_state_dict, model) -> None``, in place: fill what the official layout omits.
        article: ``"a"`` / ``"an"`` before ``family`` in messages (default: by its first letter).
        model_pattern: the family's registry names, for "use a crate_* model" (default: ``family.lower() + "_*"``).
    """

    family: str
    source: str
    key_map: KeyMap
    width_key: tuple[str, int] | None = None
    head_prefixes: tuple[str, ...] = ("head.",)
    pos_embed_key: str | None = "pos_embed"
    resample_pos_embed: Callable[..., torch.Tensor] | None = None
    prefix_last: bool = False
    foreign_hints: Mapping[str, str] = field(default_factory=dict)
    check_official: Callable[[Tensors, Any], list[str]] | None = None
    fix_official: Callable[[Tensors, Any], None] | None = None
    article: str | None = None
    model_pattern: str | None = None

    def __post_init__(self) -> None:
        if self.pos_embed_key is not None and self.resample_pos_embed is None:
            raise ValueError(f"{self.family}: pos_embed_key needs a resample_pos_embed function")
        _CONVERTERS.append(self)

    def __call__(self, state_dict: Mapping[str, torch.Tensor], model: Any) -> Tensors:
        """Turn a state dict (ratelab or official layout) into ``model``'s keys.

        Raises:
            CheckpointError: the keys match neither layout, or an official file has keys outside the map or does
                not fit the model (depth, width, family checks). The message lists the offending keys.
        """
        sd = strip_prefixes(state_dict)
        layout = self.key_map.detect_layout(sd)
        if layout is None:
            keys = sorted(sd)
            matches = identify_checkpoint(sd, exclude=self)
            if matches:
                hint = f" These keys match {' or '.join(matches)}."
            else:
                hint = "".join(text for k, text in self.foreign_hints.items() if k in sd)
            article = self.article or _article(self.family)
            raise CheckpointError(
                f"not {article} {self.family} checkpoint: expected ratelab keys {list(self.key_map.ratelab_signature)}"
                f" or official {self.source} keys {list(self.key_map.official_signature)}.{hint} File keys "
                f"({len(keys)}): {keys[:16]}"
            )
        if layout == "ratelab":
            out = dict(sd)
        else:
            out, leftover = self.key_map.map_keys(sd)
            problems = []
            if leftover:
                problems.append(f"keys outside the official {self.family} layout ({len(leftover)}): {leftover[:12]}")
            problems += self._shape_problems(sd, model)
            if self.check_official is not None:
                problems += self.check_official(sd, model)
            if problems:
                raise CheckpointError(f"official {self.family} checkpoint does not fit: " + "; ".join(problems))
            if self.fix_official is not None:
                self.fix_official(out, model)
        if getattr(model, "num_classes", None) == 0:
            out = drop_head(out, self.head_prefixes)
        if self.pos_embed_key is not None:
            assert self.resample_pos_embed is not None
            fit_pos_embed(out, model, self.resample_pos_embed, key=self.pos_embed_key, prefix_last=self.prefix_last)
        return out

    def _shape_problems(self, sd: Tensors, model: Any) -> list[str]:
        # Depth from the per-block keys of the map, width from one tensor: the two numbers a user picks a model by.
        if self.width_key is None:
            return []
        blocks = {i for k in sd if (i := self.key_map.official_block(k)) is not None}
        depth = max(blocks) + 1 if blocks else 0
        wkey, wdim = self.width_key
        width = sd[wkey].shape[wdim] if wkey in sd else -1
        m_depth, m_width = model.cfg.depth, model.cfg.embed_dim
        if (depth, width) == (m_depth, m_width):
            return []
        extra = sorted(k for k in sd if (i := self.key_map.official_block(k)) is not None and i >= m_depth)
        own = model.state_dict()
        missing = sorted(k for k in own if (i := self.key_map.ratelab_block(k)) is not None and i >= depth)
        problems = [
            f"file is an official {self.family} with depth {depth} and width {width}, the model has depth {m_depth} "
            f"and width {m_width} (pick the matching model or pass depth=/embed_dim=)"
            + (f"; file layers beyond the model ({len(extra)} keys): {extra[:8]}" if extra else "")
            + (f"; model layers missing from the file ({len(missing)} keys): {missing[:8]}" if missing else "")
        ]
        if width != m_width:
            wrong = sorted(
                f"{k} {tuple(v.shape)} vs model {tuple(own[new].shape)}"
                for k, v in sd.items()
                if (new := self.key_map.to_ratelab_key(k)) in own and v.shape != own[new].shape
            )
            problems.append(f"shape mismatches ({len(wrong)}): {wrong[:6]}")
        return problems
