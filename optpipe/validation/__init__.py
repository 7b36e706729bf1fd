"""Fidelity of an artifact against the model it came from: encoders, generators, and the graph itself."""

from optpipe.validation.validate import ValidationResult, validate

__all__ = ["ValidationResult", "validate"]
