"""Recipe ``crate-alpha`` (CRATE-α, Yang et al., NeurIPS 2024)."""
