"""A machine-wide reader/writer lock that keeps sweep jobs from disturbing each other's benches.

With isolation "machine" (the default) compiling takes the lock shared (any number of jobs compile side by side)
and a bench takes it exclusive: it waits for the compiles under way on this machine to finish and keeps new ones
from starting until it is done. With "bench" only benches take it (exclusive), so benches run one at a time but
compiles go on beside them: faster, noisier. A job never asks for the exclusive lock while it holds the shared
one, so jobs cannot deadlock, and the kernel drops the lock of a killed worker. The lock file sits in the temp
directory, so Ray nodes that share a machine (and its /tmp) share the lock; separate machines do not wait.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # Windows: no flock; benches are then not isolated and the record says so
    fcntl = None

MODES = {"machine": "exclusive-per-machine", "bench": "benches-one-at-a-time-per-machine"}
ISOLATION = {
    "exclusive-per-machine": "one job at a time on the machine while a bench runs: the bench waited for the "
                             "other optpipe sweep jobs there to finish compiling and none started until it ended "
                             "(processes outside the sweep were not stopped: load_1m_at_start shows how busy "
                             "the machine was)",
    "benches-one-at-a-time-per-machine": "no two benches at once on the machine, but other sweep jobs kept "
                                         "compiling beside each bench (load_1m_at_start shows how busy the "
                                         "machine was): latencies are noisier",
    "none": "no isolation: this platform has no flock, so other jobs may have run during the bench",
}


def lock_path() -> Path:
    return Path(tempfile.gettempdir()) / f"optpipe-sweep-bench-{os.getuid() if hasattr(os, 'getuid') else 0}.lock"


@contextlib.contextmanager
def _flock(exclusive: bool) -> Iterator[None]:
    fd = os.open(lock_path(), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


@contextlib.contextmanager
def compile_slot(isolation: str) -> Iterator[None]:
    """Held while a job compiles: shared with other compiles, never with a bench (isolation "machine")."""
    if fcntl is None or isolation != "machine":
        yield
        return
    with _flock(exclusive=False):
        yield


@contextlib.contextmanager
def bench_slot(isolation: str) -> Iterator[str]:
    """Held while a job benches; yields the isolation achieved (a key of ISOLATION)."""
    if fcntl is None:
        yield "none"
        return
    with _flock(exclusive=True):
        yield MODES[isolation]
