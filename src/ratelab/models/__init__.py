"""Model families. Importing this package registers every family's entry points."""

from ratelab.models import adventurer, crate, icl_gpt, mcr2_nets  # noqa: F401
