"""The library's own error types.

Everything ratelab raises for a user's mistake (a bad option, a missing file, an unknown name, a checkpoint that
does not fit) derives from :class:`RatelabError`; the CLI prints these as one line and shows a traceback for
anything else, which is then a bug. Each type also derives from the builtin a caller would expect (``ValueError``,
``KeyError``, ...), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DatasetError",
    "DatasetNotFound",
    "RatelabError",
    "TrainingDiverged",
    "UnknownNameError",
    "UsageError",
    "WeightsNotFound",
    "did_you_mean",
]


class RatelabError(Exception):
    """Base of every error ratelab raises for a problem with its input (options, files, names)."""


class UsageError(RatelabError, ValueError):
    """A command-line argument is wrong (a path that does not exist, a flag that does not apply)."""


class ConfigError(RatelabError, ValueError):
    """A configuration value, key or combination is invalid; the message names the key or option."""


class CheckpointError(RatelabError, RuntimeError):
    """A weight file could not be read or does not fit the model; the message names the file and the keys."""


class WeightsNotFound(CheckpointError, FileNotFoundError):
    """A pretrained weight file is not on disk; the message names the file and where to get it."""


class DatasetError(RatelabError, ValueError):
    """A dataset file is missing, unreadable or malformed; the message names the file (and line or key)."""


class DatasetNotFound(DatasetError, FileNotFoundError):
    """A dataset file or directory does not exist; the message names it."""


class UnknownNameError(RatelabError, KeyError):
    """An unknown registered name (model, dataset, task, recipe, plugin).

    ``str(e)`` is the plain message (``KeyError`` would otherwise quote it).
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class TrainingDiverged(RatelabError, RuntimeError):
    """The loss or the gradient became NaN/inf. The last good checkpoint on disk is left untouched.

    Attributes:
        step: the optimizer step (1-based) that failed.
        loss: the offending loss value (this rank's).
    """

    def __init__(self, message: str, *, step: int, loss: float) -> None:
        super().__init__(message)
        self.step, self.loss = step, loss


def did_you_mean(name: str, choices: Iterable[str], *, n: int = 5) -> str:
    """``"; did you mean 'a', 'b'?"`` by string similarity (difflib), or ``""`` when nothing is close."""
    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
