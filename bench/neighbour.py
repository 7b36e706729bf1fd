"""A noisy neighbour: processes that keep cores busy the way parallel CI jobs on the same runner do.

Each worker is one single-threaded process (OMP/OpenBLAS/MKL threads set to 1) that alternates two phases:

- **DRAM traffic**: copies a 256 MB float64 array into another (512 MB per worker), about 0.1-0.3 s per copy;
  this evicts the shared last-level cache and competes for memory bandwidth, as compilers, linkers and test
  suites with large working sets do;
- **compute**: a loop of 512x512 float64 matmuls (268 MFLOP each) for about as long as a copy, which keeps the
  core's vector units busy and the core itself taken, as a build job's compiler does.

So a core with a neighbour is both taken (the timed process is preempted when the scheduler has more runnable
threads than cores) and shares its cache and memory bus. `optpipe check --measure cpu` removes the first effect,
not the second: the gate study (bench/gate_study.py) measures what is left.

    python bench/neighbour.py                    # one worker per core, until Ctrl-C
    python bench/neighbour.py --workers 1 --seconds 60

From Python (the study starts and stops them itself):

    from neighbour import neighbours             # with bench/ on sys.path
    with neighbours(2):
        ...                                      # both cores busy; the workers are stopped on leaving,
                                                 # on an exception or Ctrl-C too

A worker also exits by itself when its parent disappears (it checks between phases), so a killed study leaves
no orphans burning cores.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

ARRAY_MB = 256
MATMUL = 512
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
               "NUMEXPR_NUM_THREADS")


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def worker(seconds: float | None = None, parent: int | None = None) -> int:
    """One neighbour's loop, in this process: copy, matmul, copy, ... until `seconds`, SIGTERM/SIGINT, or until
    `parent` (a pid) is gone. Returns the number of cycles done."""
    for var in THREAD_VARS:  # before numpy loads BLAS (the parent sets them too: this is for direct use)
        os.environ.setdefault(var, "1")
    import numpy as np

    stopping = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.append(True))
    src = np.ones(ARRAY_MB * 2**20 // 8)
    dst = np.empty_like(src)
    a = np.random.default_rng(os.getpid()).standard_normal((MATMUL, MATMUL))
    b = a.T.copy()
    deadline = time.monotonic() + seconds if seconds else None
    cycles = 0
    while not stopping and (deadline is None or time.monotonic() < deadline):
        if parent is not None and os.getppid() != parent:
            break  # orphaned: the study that started us is gone
        started = time.perf_counter()
        np.copyto(dst, src)  # DRAM: read 256 MB, write 256 MB
        copy_s = time.perf_counter() - started
        until = time.perf_counter() + max(copy_s, 0.05)
        while time.perf_counter() < until and not stopping:
            np.matmul(a, b)  # compute: the same product each time (no drift into subnormals)
        cycles += 1
    return cycles


def start(n: int | None = None) -> list[subprocess.Popen]:
    """Start `n` worker processes (default one per core), each single-threaded."""
    n = cores() if n is None else n
    env = {**os.environ, **{var: "1" for var in THREAD_VARS}}
    return [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", "--parent", str(os.getpid())],
                             env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             # own session: Ctrl-C in the terminal reaches the study, which stops them in order
                             start_new_session=True)
            for _ in range(n)]


def stop(procs: list[subprocess.Popen], grace: float = 5.0) -> None:
    """SIGTERM every worker, wait up to `grace` seconds, then SIGKILL whatever is left; reap them all."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()


@contextlib.contextmanager
def neighbours(n: int | None = None, settle: float = 1.0) -> Iterator[list[subprocess.Popen]]:
    """`n` neighbour workers (default one per core; 0 = none) for the duration of the block; `settle` seconds
    to let them allocate their arrays and reach their loop before the block starts timing."""
    procs = start(n) if n else []
    try:
        if procs:
            time.sleep(settle)
            dead = [p.pid for p in procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"neighbour workers {dead} exited at start (out of memory?)")
        yield procs
    finally:
        stop(procs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=None, help=f"processes (default one per core: {cores()})")
    parser.add_argument("--seconds", type=float, default=None, help="stop after this long (default: until killed)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one worker, in this process
    parser.add_argument("--parent", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.seconds, args.parent)
        return 0
    n = cores() if args.workers is None else args.workers
    print(f"{n} neighbour worker(s): {ARRAY_MB} MB copies and {MATMUL}x{MATMUL} matmuls, single-threaded; "
          f"{'for %gs' % args.seconds if args.seconds else 'Ctrl-C to stop'}", flush=True)
    with contextlib.suppress(KeyboardInterrupt), neighbours(n, settle=0.0) as procs:
        print("pids:", " ".join(str(p.pid) for p in procs), flush=True)
        deadline = time.monotonic() + args.seconds if args.seconds else None
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.2)
            if any(p.poll() is not None for p in procs):
                print("a worker exited early", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
