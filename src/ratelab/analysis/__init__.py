"""Measurements on trained or random models (pure functions; matplotlib is imported only when plotting)."""

from ratelab.analysis.layer_rates import (
    block_projector,
    compression,
    measure_layers,
    plot_layer_rates,
    rates_to_arrays,
    sparsity,
)

__all__ = ["block_projector", "compression", "measure_layers", "plot_layer_rates", "rates_to_arrays", "sparsity"]
