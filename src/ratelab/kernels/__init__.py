"""Low-level ops, one subpackage per op, each with a readable ``ref`` twin beside its fast backend(s)."""
