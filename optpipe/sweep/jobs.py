"""Sweep jobs: the plan (model x target x grid point) and what one job does on a Ray worker.

A job compiles, validates and publishes one artifact with `optimize`, then times it with a short `bench`. The
job function imports nothing of Ray's beyond the runtime context, so it also runs (and is tested) without Ray.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import re
import shutil
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optpipe.errors import InvalidOptionError, OptpipeError
from optpipe.sweep.lock import ISOLATION, MODES, bench_slot, compile_slot
from optpipe.targets import Target, load_target

log = logging.getLogger("optpipe.sweep")

GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
GENERAL_SECTIONS = ("validate", "provider_options", "harness", "session_options")
# For tests only: a directory; each job kills its own worker (os._exit) once, in the middle of optimize (at its
# first progress event once the staging directory exists), leaving a marker there so the retry runs through.
CRASH_ONCE_ENV = "OPTPIPE_SWEEP_CRASH_ONCE"


@dataclass(frozen=True)
class SweepJob:
    """One model on one target at one grid point; `name` is also its artifact directory under OUT/artifacts."""

    name: str
    model: str  # as the job loads it: a hub id, or a local path made absolute
    model_name: str
    target: Target  # overrides and the grid point applied
    grid: tuple[tuple[str, str], ...]  # the grid point as KEY, VALUE text
    overrides: tuple[str, ...]  # every assignment applied to the target (--set ones, then the grid point's)

    @property
    def target_name(self) -> str:
        return self.target.name

    @property
    def needs_gpu(self) -> bool:
        return self.target.provider in GPU_PROVIDERS

    def identity(self) -> dict[str, Any]:
        """What a record repeats so a later run can tell whether it describes the same job."""
        return {"job": self.name, "model": self.model, "model_name": self.model_name, "target": self.target_name,
                "grid": {k: v for k, v in self.grid}, "overrides": list(self.overrides)}


def parse_grid(specs: list[str] | tuple[str, ...] | dict[str, Any] | None) -> list[tuple[str, list[str]]]:
    """`["prune.sparsity=0.2,0.4", ...]` (or a dict of key -> values) as [(key, [values])]."""
    if not specs:
        return []
    if isinstance(specs, dict):
        items = [(k, [str(v) for v in (vs if isinstance(vs, (list, tuple)) else [vs])]) for k, vs in specs.items()]
    else:
        items = []
        for spec in specs:
            key, eq, values = spec.partition("=")
            key = key.strip()
            if not eq or "." not in key or not values.strip():
                raise InvalidOptionError(f"--grid {spec!r}: expected PASS.KEY=V1,V2,..., e.g. prune.sparsity=0.2,0.4")
            items.append((key, [v.strip() for v in values.split(",") if v.strip()]))
    keys = [k for k, _ in items]
    if len(set(keys)) != len(keys):
        raise InvalidOptionError(f"--grid names a key twice: {', '.join(keys)}")
    return items


def _section(assignment: str) -> str:
    return assignment.partition("=")[0].strip().partition(".")[0]


def _applies(section: str, target: Target) -> bool:
    return section in GENERAL_SECTIONS or target.pass_spec(section) is not None


def model_names(models: list[str]) -> dict[str, str]:
    """Short names for artifact directories: the last path part; a short hash tells equal last parts apart."""
    short = {m: m.rstrip("/").split("/")[-1] or m for m in models}
    counts: dict[str, int] = {}
    for name in short.values():
        counts[name] = counts.get(name, 0) + 1
    return {m: (name if counts[name] == 1 else f"{name}-{hashlib.sha1(m.encode()).hexdigest()[:6]}")
            for m, name in short.items()}


def _load_path(model: str) -> str:
    """Local paths become absolute (Ray workers do not run in the driver's directory); hub ids stay as they are."""
    path = Path(model).expanduser()
    if path.exists() or model.startswith((".", "/", "~")):
        return str(path.resolve())
    return model


def _label(point: tuple[tuple[str, str], ...]) -> str:
    return "-".join(re.sub(r"[^A-Za-z0-9._-]+", "_", f"{k}-{v}") for k, v in point)


def plan_jobs(models: list[str], targets: list[str | Path | Target], overrides: tuple[str, ...] | list[str] = (),
              grid: list[str] | dict[str, Any] | None = None) -> list[SweepJob]:
    """Every model x target x grid point. An override or grid key whose pass a target lacks (prune.* on cpu-int8)
    is left out for that target; one that fits no target at all is an error, as is an unknown target."""
    if not models:
        raise InvalidOptionError("sweep needs at least one model")
    if not targets:
        raise InvalidOptionError("sweep needs at least one target (--targets cpu-fp32,cpu-int8)")
    loaded = [t if isinstance(t, Target) else load_target(t) for t in targets]
    grid_items = parse_grid(grid)
    for assignment in overrides:
        if "=" not in assignment or "." not in assignment.partition("=")[0]:
            raise InvalidOptionError(f"--set {assignment!r}: expected SECTION.KEY=VALUE, "
                                     "e.g. quantize.per_channel=false")
    for text in [*overrides, *(k for k, _ in grid_items)]:
        if not any(_applies(_section(text), t) for t in loaded):
            raise InvalidOptionError(f"{text!r}: no target in this sweep has a {_section(text)!r} pass "
                                     f"(targets: {', '.join(t.name for t in loaded)})")
    names = model_names(list(dict.fromkeys(models)))
    jobs: list[SweepJob] = []
    for model in dict.fromkeys(models):
        for target in loaded:
            applied = tuple(a for a in overrides if _applies(_section(a), target))
            keys = [(k, vs) for k, vs in grid_items if _applies(_section(k), target)]
            points = [tuple(zip([k for k, _ in keys], combo)) for combo in itertools.product(*(vs for _, vs in keys))]
            for point in points:
                assignments = applied + tuple(f"{k}={v}" for k, v in point)
                resolved = target.with_overrides(assignments) if assignments else target
                name = f"{names[model]}-{target.name}" + (f"-{_label(point)}" if point else "")
                jobs.append(SweepJob(name, _load_path(model), names[model], resolved, point, assignments))
    return jobs


def one_line(text: str, limit: int = 400) -> str:
    line = next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "") or "unknown error"
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # not on a Ray worker: the record says so with None
        return None


def _clear_leftovers(dest: Path) -> list[str]:
    """Staging and work directories that a killed attempt left beside the destination (optimize names them
    .NAME.partial-*, .NAME.work-*, .NAME.old-*). The destination itself is never half-written."""
    pattern = re.compile(rf"^\.{re.escape(dest.name)}\.(partial|work|old)-")
    removed = []
    if dest.parent.is_dir():
        for item in dest.parent.iterdir():
            if item.is_dir() and pattern.match(item.name):
                shutil.rmtree(item, ignore_errors=True)
                removed.append(item.name)
    return sorted(removed)


def _progress(job: SweepJob, dest: Path):
    marker_dir = os.environ.get(CRASH_ONCE_ENV)
    staging = re.compile(rf"^\.{re.escape(dest.name)}\.partial-")

    def progress(event: Any) -> None:
        if isinstance(event, str):
            log.info("%s: %s", job.name, event)
        if marker_dir and any(staging.match(p.name) for p in dest.parent.iterdir()):
            marker = Path(marker_dir) / f"{job.name}.crashed"
            if not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(f"pid {os.getpid()}\n")
                sys.stderr.flush()
                os._exit(17)

    return progress


def _bench_figures(result) -> dict[str, Any]:
    keep = ("workload", "batch", "seq", "runs", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "sequences_per_s",
            "memory_mb")
    rows = [{k: getattr(r, k) for k in keep} | {"providers": list(r.providers)} for r in result.rows]
    first = rows[0]
    return {**{k: first[k] for k in keep}, "rows": rows, "settings": result.settings}


def manifest_facts(manifest: dict[str, Any]) -> dict[str, Any]:
    """What a record keeps of an artifact's manifest: recipe, validation, per-pass seconds and sizes."""
    validation = manifest.get("validation", {})
    return {
        "pipeline": manifest.get("pipeline"),
        "task": manifest.get("source", {}).get("task"),
        "validation": validation.get("metrics", {}),
        "thresholds": validation.get("thresholds", {}),
        "validation_provider": validation.get("provider"),
        "passes": [{k: step.get(k) for k in ("name", "seconds", "cached", "bytes_in", "bytes_out")}
                   for step in manifest.get("passes", [])],
        "size": {k: v for k, v in manifest.get("size", {}).items() if k.endswith("bytes")},
    }


def run_job(job: SweepJob, artifacts_dir: str, bench_seconds: float = 3.0, bench_threads: int | None = None,
            isolation: str = "machine") -> dict[str, Any]:
    """Compile, validate and publish `job` under artifacts_dir/job.name, then time it; returns its record.

    isolation "machine": the bench has the machine to itself among sweep jobs; "bench": benches one at a time
    while other jobs may compile (see optpipe.sweep.lock).

    A failure of the job (bad model, failed validation, a library error) is a record with status "failed" and a
    one-line error, never an exception, so the sweep goes on. Only the worker's death escapes (Ray retries it).
    """
    from optpipe import bench, optimize
    from optpipe.perf.harness import machine_facts

    if isolation not in MODES:
        raise InvalidOptionError(f"bench isolation {isolation!r}: choose one of {', '.join(MODES)}")
    started = time.perf_counter()
    record: dict[str, Any] = {**job.identity(), "node": _node_id(), "host": socket.gethostname()}
    dest = Path(artifacts_dir) / job.name
    phases: dict[str, float] = {}
    phase = "compile"
    try:
        leftovers = _clear_leftovers(dest)
        if leftovers:
            record["cleaned_leftovers"] = leftovers  # an earlier attempt died mid-job
        with compile_slot(isolation):
            artifact = optimize(job.model, job.target, dest, overwrite=True, progress=_progress(job, dest))
        phases["compile"] = round(time.perf_counter() - started, 3)
        record.update(manifest_facts(artifact.manifest), artifact=str(dest))

        phase = "bench"
        asked = time.perf_counter()
        with bench_slot(isolation) as lock_mode:
            began = time.perf_counter()
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
            harness = job.target.harness
            result = bench([dest], harness.get("batch_sizes", [1]), harness.get("sequence_lengths", [128]),
                           threads=bench_threads, seconds=bench_seconds)
        phases["wait_for_bench"] = round(began - asked, 3)
        phases["bench"] = round(time.perf_counter() - began, 3)
        record["bench"] = _bench_figures(result)
        record["bench_isolation"] = {"mode": lock_mode, "how": ISOLATION[lock_mode], "load_1m_at_start": load}
        record["machine"] = machine_facts(bench_threads)
        record["status"] = "ok"
    except OptpipeError as exc:
        record.update(status="failed", error=one_line(str(exc)), phase=phase)
    except Exception as exc:  # a library error or a bug: still one record, with the traceback beside the line
        record.update(status="failed", error=one_line(f"{type(exc).__name__}: {exc}"), phase=phase,
                      traceback=traceback.format_exc())
    record["phases"] = phases
    record["seconds"] = round(time.perf_counter() - started, 3)
    record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return record
