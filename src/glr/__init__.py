"""glr: the 2nd-place solution of Google Landmark Retrieval 2021 as a reproducible DVC pipeline."""

__version__ = "0.1.0"
