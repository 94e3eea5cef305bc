"""Tally: a gRPC quota authority for prepaid usage credits."""

__version__ = "0.1.0"
