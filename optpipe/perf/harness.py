"""Latency measurement of published artifacts: realistic inputs, warm-up, interleaving, paired statistics.

Several artifacts are always measured in one process, interleaved: each round runs every artifact once, in a
freshly shuffled order, with ONNX Runtime's thread spinning off by default (idle sessions' spinning threads
otherwise steal the cores of the one being timed; `spinning="parked"` lets threads spin during a session's own
runs only, as a deployed session does: optpipe/session.py SPINNING). Drift on a shared machine then hits every
artifact of a round alike, and the ratio of paired times within a round cancels it; the ratio comes with a
bootstrap interval.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from optpipe.artifact import Artifact
from optpipe.errors import ArtifactError, InvalidOptionError
from optpipe.passbase import track
from optpipe.perf.inputs import (REAL, REAL_SEQ, Workload, next_step_feed, pick_workload, seq_name, seq_value,
                                 workloads)
from optpipe.perf.stats import RatioEstimate, paired_ratio
from optpipe.session import require_provider, target_session

log = logging.getLogger("optpipe.perf.harness")

WARMUP = 5
MIN_ROUNDS = 10
# What Measured.run times. "wall": perf_counter around session.run (bench, compare, and check with threads != 1).
# "cpu": the calling thread's CPU time (time.thread_time_ns): with exactly one intra-op thread ONNX Runtime's CPU
# provider computes on the calling thread, so this is the inference's own compute, without the time the thread
# sat preempted on a busy machine (it still includes cache and memory-bandwidth contention). With more threads
# the work runs on ORT's pool threads and the calling thread's CPU time misses it: then only "wall" is meaningful.
CLOCKS = ("wall", "cpu")

__all__ = ["BenchResult", "BenchRow", "Measured", "RatioEstimate", "bench", "compare", "interleaved_ratios", "open_artifact",
           "machine_facts"]


@dataclass(frozen=True)
class BenchRow:
    """One artifact on one workload (batch, sequence length, and for decoders prefill or decode)."""

    artifact: str
    target: str
    providers: tuple[str, ...]
    workload: str
    batch: int
    seq: int
    runs: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    sequences_per_s: float
    memory_mb: float  # RSS growth from creating the session and warming it up on every workload
    ratio: RatioEstimate | None  # latency / the first artifact's, paired over the same rounds
    label: str = ""  # "real": held-out texts at their own token lengths (seq is the batch's padded length)


@dataclass(frozen=True)
class BenchResult:
    rows: tuple[BenchRow, ...]
    machine: dict[str, Any]
    settings: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"machine": self.machine, "settings": self.settings, "rows": [asdict(r) for r in self.rows]}


@dataclass
class Measured:
    """An artifact opened for timing: its session per component and the workloads it runs."""

    path: Path
    target: str
    sessions: dict[str, Any]
    providers: tuple[str, ...]
    memory_mb: float = 0.0
    feeds: dict[tuple[str, int, int], Workload] = field(default_factory=dict)

    def run(self, workload: Workload, clock: str = "wall") -> float:
        """Seconds of one `session.run` on `clock` (CLOCKS): wall time, or this thread's CPU time. A "generate"
        workload: the prompt, then its greedy steps, timed; seconds per new token."""
        session = self.sessions[workload.component]
        if workload.new_tokens:
            return self._generate(session, workload, clock)
        if clock == "cpu":
            start_ns = time.thread_time_ns()
            session.run(None, workload.feed)
            return (time.thread_time_ns() - start_ns) * 1e-9
        start = time.perf_counter()
        session.run(None, workload.feed)
        return time.perf_counter() - start

    @staticmethod
    def _generate(session, workload: Workload, clock: str) -> float:
        names = [o.name for o in session.get_outputs()]
        feed = workload.feed
        outputs = dict(zip(names, session.run(None, feed)))
        now = time.thread_time_ns if clock == "cpu" else time.perf_counter_ns
        start = now()
        for _ in range(workload.new_tokens):
            feed = next_step_feed(feed, outputs)
            outputs = dict(zip(names, session.run(None, feed)))
        return (now() - start) * 1e-9 / workload.new_tokens


def _rss_mb() -> float:
    """This process's resident memory now (psutil: the same figure on Linux, macOS and Windows)."""
    import psutil

    return psutil.Process().memory_info().rss / 1e6


def open_artifact(path: str | Path, threads: int | None = None, spinning: str = "off") -> Measured:
    """Load an artifact (ArtifactError when it is not one) and open its sessions with its target's provider
    settings; ProviderUnavailableError (exit 4) when that provider cannot run here."""
    artifact = Artifact.load(path)
    target = artifact.target
    require_provider(target.provider)
    before = _rss_mb()
    sessions = {c.name: target_session(c, target, threads=threads, spinning=spinning, artifact_dir=artifact.path)
                for c in artifact.components}
    providers = tuple(next(iter(sessions.values())).get_providers())
    measured = Measured(artifact.path, target.name, sessions, providers)
    measured.memory_mb = _rss_mb() - before
    return measured


def open_model(path: str | Path, threads: int | None = None, spinning: str = "off") -> Measured:
    """A bare .onnx file or an artifact directory (the scoreboard times anchors that are not optpipe artifacts)."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path} does not exist: give an artifact directory (what optpipe run wrote) or an .onnx "
                            "file")
    if path.is_dir():
        return open_artifact(path, threads, spinning)
    from optpipe.session import create_session

    before = _rss_mb()
    session = create_session(path, threads=threads, spinning=spinning)
    return Measured(path, "onnx", {path.name: session}, tuple(session.get_providers()), _rss_mb() - before)


def grid_workloads(models: list[Measured], batch: int, seq: int, new_tokens: int = 0) -> list[list[Workload]]:
    """The workloads of every model for one (batch, seq); feeds are built once and reused across rounds."""
    return [workloads(model.path, model.sessions, batch, seq, new_tokens) for model in models]


def _rounds(runs: int | None, seconds: float, stop: Callable[[], bool] | None = None):
    """Round numbers: exactly `runs`, or at least MIN_ROUNDS and until `seconds` have passed or `stop()` (asked
    after every round from the MIN_ROUNDS-th on) says the caller has seen enough."""
    if runs:
        yield from range(runs)
        return
    deadline = time.perf_counter() + seconds
    rounds = 0
    while rounds < MIN_ROUNDS or (time.perf_counter() < deadline and not (stop and stop())):
        yield rounds
        rounds += 1


def interleave(models: list[Measured], work: list[Workload | None], warmup: int, runs: int | None,
               seconds: float, rng: np.random.Generator, progress: Callable[[Any], None] | None = None,
               label: str = "rounds", clock: str = "wall",
               stop: Callable[[list[list[float]]], bool] | None = None) -> list[np.ndarray]:
    """Per model, the time of each round on `clock` (CLOCKS); every round runs each model once in a shuffled
    order. `progress` gets Ticks per round (passbase.track). With `seconds` (runs None), `stop(times)` is asked
    between rounds and ends the run early when it returns True (check's sequential verdict)."""
    if clock not in CLOCKS:
        raise InvalidOptionError(f"unknown clock {clock!r}: one of {', '.join(CLOCKS)}")
    active = [i for i, w in enumerate(work) if w is not None]
    for _ in range(warmup):
        for i in active:
            models[i].run(work[i], clock)
    times: list[list[float]] = [[] for _ in models]
    enough = (lambda: stop(times)) if stop else None
    for _ in track(_rounds(runs, seconds, enough), label, progress, total=runs, unit="round"):
        for i in rng.permutation(active):
            times[i].append(models[i].run(work[i], clock))
    return [np.asarray(t) for t in times]


def _row(model: Measured, w: Workload, series: np.ndarray, ratio: RatioEstimate | None) -> BenchRow:
    ms = series * 1e3
    p50 = float(np.percentile(ms, 50))
    return BenchRow(str(model.path), model.target, model.providers, w.name, w.batch, w.seq, len(ms), round(p50, 4),
                    round(float(np.percentile(ms, 90)), 4), round(float(np.percentile(ms, 99)), 4),
                    round(float(ms.mean()), 4), round(w.batch * 1e3 / p50, 2), round(model.memory_mb, 1), ratio,
                    w.label)


def bench(artifacts: list[str | Path] | list[Measured], batches: list[int] | tuple[int, ...] = (1,),
          seqs: list[int] | tuple[int, ...] = (128,), *, threads: int | None = None, warmup: int = WARMUP,
          runs: int | None = None, seconds: float = 5.0, level: float = 0.95, seed: int = 0,
          progress: Callable[[str], None] | None = None, new_tokens: int = 0, spinning: str = "off") -> BenchResult:
    """Latency of each artifact on each (batch, seq) and workload, all artifacts interleaved; `seconds` is the
    budget per grid cell (or exactly `runs` rounds). Ratios are to the first artifact. new_tokens > 0: decoders
    also run "generate", that many greedy tokens after a seq-token prompt (latency per new token)."""
    if not artifacts:
        raise InvalidOptionError("bench needs at least one artifact")
    seqs = [seq_value(s) for s in seqs]  # InvalidOptionError below 1; "real" / REAL_SEQ: real sentence lengths
    if any(b < 1 for b in batches):
        raise InvalidOptionError("batch sizes must be >= 1")
    if runs is not None and runs < 2:
        raise InvalidOptionError("--runs must be >= 2")
    if new_tokens < 0:
        raise InvalidOptionError("--new-tokens must be >= 0")
    models = [a if isinstance(a, Measured) else open_model(a, threads, spinning) for a in artifacts]
    rng = np.random.default_rng(seed)
    rows: list[BenchRow] = []
    for batch in batches:
        for seq in seqs:
            per_model = grid_workloads(models, batch, seq, new_tokens)
            names = list(dict.fromkeys(w.name for ws in per_model for w in ws))
            for name in names:
                work = [next((w for w in ws if w.name == name), None) for ws in per_model]
                if progress:
                    progress(f"timing {name} bs {batch} seq {seq_name(seq)} ({runs or f'{seconds:g}s'}) ...")
                series = interleave(models, work, warmup, runs, seconds, rng, progress,
                                    f"{name} bs {batch} seq {seq_name(seq)}")
                ref = series[0] if work[0] is not None else None
                for i, (model, w) in enumerate(zip(models, work)):
                    if w is None:
                        continue
                    ratio = paired_ratio(ref, series[i], level) if ref is not None else None
                    rows.append(_row(model, w, series[i], ratio))
    settings = {"batches": list(batches), "seqs": [REAL if s == REAL_SEQ else s for s in seqs], "threads": threads,
                "warmup": warmup, "runs": runs, "seconds": None if runs else seconds, "level": level, "interleaved": True,
                "spinning": spinning, "new_tokens": new_tokens}
    return BenchResult(tuple(rows), machine_facts(threads), settings)


def interleaved_ratios(model_paths: list[Path], *, batch: int = 1, seq: int = 128, threads: int | None = None,
                       seconds: float = 10.0, progress: Callable[[Any], None] | None = None,
                       spinning: str = "off", workload: str | None = None) -> list[RatioEstimate]:
    """Latency of each model relative to the first (ratio 1.0), interleaved for about `seconds`, with a 95%
    interval, on one workload (inputs.pick_workload: forward for encoders, decode for decoders by default; each
    estimate names it). Paths may be artifact directories (their target's provider settings) or bare .onnx files."""
    if seconds <= 0:
        raise InvalidOptionError(f"--seconds must be > 0, not {seconds:g}")
    models = [open_model(p, threads, spinning) for p in model_paths]
    per_model = grid_workloads(models, batch, seq)
    name = pick_workload(per_model[0], workload).name
    kinds = {tuple(w.name for w in ws) for ws in per_model}
    if len(kinds) > 1:  # an encoder against a decoder, say: no workload means the same on both
        listed = "; ".join(f"{Path(p).name}: {', '.join(w.name for w in ws)}" for p, ws in zip(model_paths, per_model))
        raise InvalidOptionError(f"these models run different workloads ({listed}); compare models of one kind")
    work = [pick_workload(ws, name) for ws in per_model]
    series = interleave(models, work, WARMUP, None, seconds, np.random.default_rng(0), progress,
                        "interleaved rounds")
    return [replace(paired_ratio(series[0], s), workload=name) for s in series]


# CPU features that change ONNX Runtime's integer kernels (and so INT8 numerics and speed), as py-cpuinfo names them.
INTEGER_KERNEL_FLAGS = frozenset({"avx2", "avx512f", "avx512bw", "avx512vnni", "avx512_vnni", "avxvnni", "avx_vnni",
                                  "amx_int8", "amx_tile", "asimddp", "i8mm", "sve"})


@functools.lru_cache(maxsize=1)
def _cpu_info() -> dict[str, Any]:
    """py-cpuinfo's facts (brand, flags); it takes about a second, so once per process."""
    import cpuinfo

    try:
        return cpuinfo.get_cpu_info()
    except Exception as exc:  # an unknown platform: fall back to platform.processor()
        log.debug("py-cpuinfo failed: %s", exc)
        return {}


def machine_facts(threads: int | None = None) -> dict[str, Any]:
    """What decides whether two timings are comparable: CPU model, cores, threads, library versions."""
    import platform

    import onnxruntime as ort

    info = _cpu_info()
    cpu = info.get("brand_raw") or platform.processor() or platform.machine()
    flags = sorted(INTEGER_KERNEL_FLAGS & set(info.get("flags", ())))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 0
    from optpipe.pipeline import package_versions

    return {"cpu": cpu, "cpu_flags": flags, "cores": cores, "threads": threads, "machine": platform.machine(),
            "system": platform.system(), "python": platform.python_version(), "onnxruntime": ort.__version__,
            "numpy": np.__version__, "versions": package_versions()}


def bench_json(result: BenchResult) -> str:
    return json.dumps(result.to_json(), indent=2, default=str)


def compare(a: str | Path, b: str | Path, *, batch: int = 1, seq: int = 128, threads: int | None = None,
            seconds: float = 10.0, progress: Callable[[Any], None] | None = None,
            spinning: str = "off", workload: str | None = None) -> RatioEstimate:
    """Latency of B / latency of A, interleaved, with a 95% interval (`.verdict()` says faster/slower/no
    difference detected), on `workload` (default: forward for encoders, decode for decoders: the estimate's
    `workload`). `progress` gets a Tick per round."""
    return interleaved_ratios([Path(a), Path(b)], batch=batch, seq=seq, threads=threads, seconds=seconds,
                              progress=progress, spinning=spinning, workload=workload)[1]


def bench_staged(directory: Path, components: list[str] | tuple[str, ...], target, *, threads: int | None = None,
                 seconds: float = 3.0) -> dict[str, Any]:
    """Figures for `optpipe run --bench`, taken on the staged files before they are published (so the publish
    stays one atomic rename). Shapes come from the target's [harness] table (default bs 1, seq 128)."""
    from optpipe.session import provider_problem

    problem = provider_problem(target.provider)
    if problem:  # e.g. a GPU target built on a CPU machine: the artifact is still published, unmeasured
        return {"skipped": problem}
    before = _rss_mb()
    sessions = {c: target_session(directory / c, target, threads=threads, spinning="off", artifact_dir=directory)
                for c in components}
    model = Measured(directory, target.name, sessions, tuple(next(iter(sessions.values())).get_providers()),
                     _rss_mb() - before)
    result = bench([model], target.harness.get("batch_sizes", [1]), target.harness.get("sequence_lengths", [128]),
                   threads=threads, seconds=seconds)
    rows = [{k: v for k, v in asdict(r).items() if k not in ("artifact", "ratio", "target")} for r in result.rows]
    return {"rows": rows, "machine": result.machine, "settings": result.settings}
