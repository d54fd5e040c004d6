"""Literal key maps between an official checkpoint layout and ratelab's, shared by every family's ``convert.py``.

A map is a table of templates, ``"layers.{i}.norm.weight" -> "blocks.{i}.norm1.weight"``, where ``{i}`` stands for a
block index that is carried over unchanged. Layouts are told apart by a few signature keys that only one of them has.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch


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

    def map_keys(self, state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Rename official keys. Returns (renamed dict, sorted official keys that matched no template)."""
        out: dict[str, torch.Tensor] = {}
        leftover: list[str] = []
        for key, value in state_dict.items():
            new = self.to_ratelab_key(key)
            if new is None:
                leftover.append(key)
            else:
                out[new] = value
        return out, sorted(leftover)
