"""Model families. Importing this package registers every family's entry points."""

from ratelab.models import adventurer, crate, crate_alpha, crate_mae, icl_gpt, mae_vit, mcr2_nets, var  # noqa: F401
