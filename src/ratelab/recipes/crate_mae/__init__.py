"""Recipe ``crate-mae`` (CRATE-MAE, Pai et al., ICLR 2024)."""
