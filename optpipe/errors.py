"""Errors a user can act on. The CLI prints their message on one line and exits with `exit_code`.

Exit codes (the table in optpipe/cli/main.py and the README): 1 bad input, 2 usage error (argparse's), 3 a check
failed (validation, tuning budget, latency regression), 4 missing runtime or execution provider, 130 interrupted.
"""

from __future__ import annotations


class OptpipeError(Exception):
    """Base class: something the user can fix (bad input, missing provider, failed validation)."""

    exit_code = 1


class UnknownTargetError(OptpipeError):
    pass


class ModelNotFoundError(OptpipeError):
    pass


class UnsupportedModelError(OptpipeError):
    pass


class CorruptModelError(OptpipeError):
    """A model file that cannot be read (a truncated or corrupt GGUF): re-download it."""


class InvalidOptionError(OptpipeError):
    """A bad pass option, pipeline string or `--set` override."""


class PipelineOrderError(OptpipeError):
    pass


class OutputError(OptpipeError):
    """The destination exists (without --overwrite), is not writable, or the disk is full."""


class PassFailedError(OptpipeError):
    pass


class ValidationFailedError(OptpipeError):
    exit_code = 3


class ProviderUnavailableError(OptpipeError):
    """No ONNX Runtime, or the target's execution provider does not start here: what to install (exit 4)."""

    exit_code = 4


class CalibrationDataError(OptpipeError):
    pass


class EvalDataError(OptpipeError):
    """A bad `optpipe tune --eval` file (missing, unreadable, no text/label, unknown label)."""


class TuningFailedError(OptpipeError):
    """No candidate recipe met the loss budget."""

    exit_code = 3


class ArtifactError(OptpipeError):
    """A published artifact is missing, corrupt, or not an optpipe artifact."""


class BaselineError(OptpipeError):
    """`optpipe check` could not judge: no or unreadable baseline, or a different machine class (bad input: 1)."""
