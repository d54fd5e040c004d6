"""ratelab: white-box transformers, rate reduction and the systems around them, in PyTorch.

Public entry points are re-exported here; heavy submodules (models, data, training) are imported lazily.
"""

from ratelab.core.registry import create_model, list_models

__version__ = "0.1.0"

__all__ = ["__version__", "create_model", "list_models"]
