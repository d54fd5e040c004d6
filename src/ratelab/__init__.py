"""ratelab: white-box transformers, rate reduction and the systems around them, in PyTorch.

Public entry points are re-exported here and resolved on first use (PEP 562), so ``import ratelab`` imports neither
torch models nor any family: ``create_model`` / ``list_models`` come from :mod:`ratelab.models._factory` and
``list_pretrained`` from the weights registry :mod:`ratelab.models._pretrained`.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "create_model", "list_models", "list_pretrained"]


def __getattr__(name: str) -> Any:
    # Plain import statements (not importlib) so the layering test sees these dependencies.
    if name in ("create_model", "list_models"):
        from ratelab.models import _factory

        return getattr(_factory, name)
    if name == "list_pretrained":
        from ratelab.models import _pretrained

        return _pretrained.list_pretrained
    raise AttributeError(f"module 'ratelab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
