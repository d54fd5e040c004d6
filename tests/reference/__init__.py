"""Independent reference implementations used by the tests (never imported by the library)."""
