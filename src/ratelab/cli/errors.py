"""CLI error type (re-exported from :mod:`ratelab.core.errors`): printed as one line without a traceback."""

from ratelab.core.errors import UsageError

__all__ = ["UsageError"]
