"""Accuracy-aware search over a target's options (neural-compressor's tuning loop)."""

from optpipe.tune.search import tune

__all__ = ["tune"]
