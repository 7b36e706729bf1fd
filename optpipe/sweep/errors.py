"""The sweep's own errors; each is an OptpipeError, so the CLI prints one line and exits with its code."""

from __future__ import annotations

from optpipe.errors import OptpipeError

INSTALL_HINT = 'pip install "optpipe[sweep]"'


class MissingExtraError(OptpipeError):
    """An optional dependency of the `sweep` extra (Ray, matplotlib) is not installed."""


class ClusterError(OptpipeError):
    """The Ray cluster named with --address cannot be reached or joined."""


class SweepInterrupted(OptpipeError):
    """Ctrl-C during a sweep: results.json holds every finished job; the rest were cancelled."""

    exit_code = 130
