"""Recipes for CRATE (Yu et al., NeurIPS 2023 / JMLR 2024)."""
