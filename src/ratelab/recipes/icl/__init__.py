"""Recipes for the in-context-learning calibration study (Zhang et al., NAACL 2024)."""
