"""DP-Cap recipe."""
