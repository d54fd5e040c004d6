"""Model families. Importing this package registers every family's entry points."""

from ratelab.models import crate  # noqa: F401
