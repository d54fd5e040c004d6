"""Opt-in bridges to other libraries (nothing here runs at ``import ratelab``)."""
