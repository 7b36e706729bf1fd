"""One machine-wide reader/writer lock so that a bench never shares its machine with another sweep job.

Compiling takes the lock shared (any number of jobs compile side by side); a bench takes it exclusive, so it
waits for the compiles under way on this machine to finish and keeps new ones from starting until it is done.
A job never asks for the exclusive lock while it holds the shared one, so jobs cannot deadlock, and the kernel
drops the lock of a killed worker. The lock file sits in the temp directory, so Ray nodes that share a machine
(and its /tmp) share the lock; separate machines do not wait for each other.
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

ISOLATION = {
    "exclusive-per-machine": "one job at a time on the machine while a bench runs: the bench waited for the "
                             "other optpipe sweep jobs there to finish compiling and none started until it ended "
                             "(processes outside the sweep were not stopped: load_1m_at_start shows how busy "
                             "the machine was)",
    "none": "no isolation: this platform has no flock, so other jobs may have run during the bench",
}


def lock_path() -> Path:
    return Path(tempfile.gettempdir()) / f"optpipe-sweep-bench-{os.getuid() if hasattr(os, 'getuid') else 0}.lock"


@contextlib.contextmanager
def machine_lock(exclusive: bool) -> Iterator[str]:
    """Hold the machine lock (shared to compile, exclusive to bench); yields the isolation mode achieved."""
    if fcntl is None:
        yield "none"
        return
    fd = os.open(lock_path(), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield "exclusive-per-machine"
    finally:
        os.close(fd)  # closing the descriptor releases the lock
