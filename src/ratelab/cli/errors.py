"""CLI error type: raised for mistakes in a user's input; printed as one line without a traceback."""


class UsageError(Exception):
    """An error caused by the user's input."""
