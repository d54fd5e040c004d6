"""Recipes for Adventurer (Wang et al., "Causal Image Modeling for Efficient Visual Understanding", 2024/2025)."""
