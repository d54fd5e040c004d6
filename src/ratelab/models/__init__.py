"""Model families. Importing this package registers every family's entry points."""

from ratelab.models import (  # noqa: F401
    adventurer,
    crate,
    crate_alpha,
    crate_mae,
    dpcap,
    icl_gpt,
    mae_vit,
    mcr2_nets,
    var,
)
