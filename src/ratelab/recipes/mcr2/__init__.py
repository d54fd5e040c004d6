"""Recipes for maximal coding rate reduction (MCR², Yu et al., NeurIPS 2020) and its global geometric analysis
(Wang et al., ICML 2024)."""
