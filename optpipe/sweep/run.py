"""sweep(): fan the jobs out over Ray (an embedded local instance or an existing cluster) and gather records."""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable

from optpipe.errors import InvalidOptionError, OutputError
from optpipe.sweep.errors import INSTALL_HINT, ClusterError, MissingExtraError, SweepInterrupted
from optpipe.sweep.jobs import SweepJob, one_line, plan_jobs, run_job
from optpipe.sweep.lock import ISOLATION, MODES
from optpipe.sweep.results import SweepResult, failed_record, load_records, reusable, write_records
from optpipe.targets import Target

log = logging.getLogger("optpipe.sweep")


def require_ray():
    try:
        import ray
    except ImportError:
        raise MissingExtraError(f"optpipe sweep runs on Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


def _check_reachable(address: str) -> None:
    """Fail in seconds, not after Ray's minute of retries, when nothing listens at HOST:PORT."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ClusterError(f"--address {address!r}: expected HOST:PORT (the head's GCS port) or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as exc:
        raise ClusterError(f"no Ray cluster answers at {address} ({exc.strerror or exc}); start one with "
                           f"`ray start --head --port={port}` or leave out --address for a local one") from None


def _connect(ray, address: str | None, num_cpus: int | None, num_gpus: int | None) -> tuple[bool, str]:
    """ray.init for an embedded local instance (address None) or an existing cluster; (started_here, label)."""
    quiet = {"logging_level": logging.ERROR, "log_to_driver": False}
    if ray.is_initialized():  # the caller's own Ray session: use it, and leave it running
        return False, "the caller's Ray session"
    if address in (None, "local"):
        cpus = num_cpus or os.cpu_count() or 1
        ray.init(address="local", num_cpus=cpus, num_gpus=num_gpus, include_dashboard=False, **quiet)
        return True, f"a local Ray started by optpipe ({cpus} CPUs)"
    if address != "auto":
        _check_reachable(address)
    try:
        ray.init(address=address, **quiet)
    except Exception as exc:  # ConnectionError, AuthenticationError, version mismatch ...
        text = one_line(str(exc) or type(exc).__name__)
        hint = ""
        if "auth" in (text + type(exc).__name__).lower():
            hint = ("; the cluster uses token authentication: set RAY_AUTH_MODE=token and the cluster's token "
                    "(RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token)")
        raise ClusterError(f"cannot join the Ray cluster at {address}: {text}{hint}") from None
    return True, f"the Ray cluster at {address}"


def _ray_error(exc: BaseException, retries: int) -> str:
    import ray.exceptions as rex

    if isinstance(exc, rex.OutOfMemoryError):
        return f"Ray killed the worker for lack of memory ({retries} retries spent): {one_line(str(exc))}"
    if isinstance(exc, (rex.WorkerCrashedError, rex.NodeDiedError)):
        return f"the worker (or its node) died on every attempt ({1 + retries}); see Ray's logs"
    if isinstance(exc, rex.TaskCancelledError):
        return "cancelled"
    if isinstance(exc, rex.RayTaskError):
        cause = exc.cause if getattr(exc, "cause", None) is not None else exc
        if isinstance(cause, ModuleNotFoundError) and "optpipe" in str(cause):
            return "optpipe is not installed on the worker's node: install it there (same version) and retry"
        return one_line(f"{type(cause).__name__}: {cause}")
    return one_line(f"{type(exc).__name__}: {exc}")


def _describe(record: dict[str, Any]) -> str:
    if record["status"] != "ok":
        return f"FAILED: {record.get('error')}"
    metrics = record.get("validation", {})
    fidelity = next(((k, metrics[k]) for k in ("mean_cosine", "top1_agreement", "next_token_agreement")
                     if k in metrics), None)
    parts = [f"p50 {record['bench']['p50_ms']:.3f} ms" if record.get("bench") else "not timed"]
    if fidelity:
        parts.append(f"{fidelity[0]} {fidelity[1]:.4f}")
    where = record.get("host") or "?"
    if record.get("node"):
        where += f" node {record['node'][:8]}"
    waited = record.get("phases", {}).get("wait_for_bench", 0)
    wait = f", {waited:.1f} s of it waiting to bench alone" if waited >= 1 else ""
    return "ok: " + ", ".join(parts) + f" ({record.get('seconds', 0):.1f} s on {where}{wait})"


def sweep(
    models: list[str] | tuple[str, ...],
    targets: list[str | Path | Target] | tuple[str | Path | Target, ...],
    out: str | Path,
    address: str | None = None,
    overrides: tuple[str, ...] | list[str] = (),
    grid: list[str] | dict[str, Any] | None = None,
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    cpus_per_job: float = 1,
    bench_seconds: float = 3.0,
    bench_threads: int | None = None,
    bench_isolation: str = "machine",
    retries: int = 2,
    progress: Callable[[str], None] | None = None,
) -> SweepResult:
    """Run every model x target (x grid point) as one Ray job: optimize into OUT/artifacts/<job>, then bench it.

    address None starts an embedded local Ray (num_cpus, default all cores; num_gpus, default what Ray detects);
    "HOST:PORT" or "auto" joins an existing cluster. Each job asks for `cpus_per_job` CPUs, and one GPU when its
    target's provider is CUDA or TensorRT; a worker that dies is rerun up to `retries` times. bench_isolation
    "machine" gives each bench the machine to itself among the sweep's jobs (compiles there wait); "bench" only
    keeps benches from overlapping. OUT/results.json is rewritten as each job finishes; jobs with an ok record
    there are reused, missing and failed ones rerun. A failed job does not stop the others (see
    SweepResult.exit_code). Ctrl-C cancels what is left and raises SweepInterrupted (exit 130). When the caller
    has already called ray.init, the sweep runs in that session (address is then ignored) and leaves it open.
    """
    say = progress or log.info
    if bench_isolation not in MODES:
        raise InvalidOptionError(f"bench isolation {bench_isolation!r}: choose one of {', '.join(MODES)}")
    jobs = plan_jobs(list(models), list(targets), tuple(overrides), grid)
    ray = require_ray()
    out = Path(out).expanduser().resolve()
    try:
        (out / "artifacts").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {out / 'artifacts'}: {exc.strerror or exc}") from None
    records = load_records(out)
    mine: dict[str, dict[str, Any]] = {}
    for job in jobs:
        if reusable(records.get(job.name), job):
            mine[job.name] = {**records[job.name], "reused": True}
            records[job.name] = mine[job.name]
    todo = [job for job in jobs if job.name not in mine]

    meta: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "ray": ray.__version__,
                            "address": address or "local", "jobs": [j.name for j in jobs],
                            "bench_isolation": ISOLATION[MODES[bench_isolation]], "bench_seconds": bench_seconds}
    _write(out, records, meta)
    if not todo:
        say(f"sweep: all {len(jobs)} jobs already done in {out} (reused)")
        return SweepResult(out, tuple(mine[j.name] for j in jobs))

    auth_mode = os.environ.get("RAY_AUTH_MODE")  # ray.init sets it for an embedded cluster; put it back after
    started_here = False
    try:
        started_here, where = _connect(ray, address, num_cpus, num_gpus)
        resources = ray.cluster_resources()
        meta["cluster"] = {"where": where, "nodes": len([n for n in ray.nodes() if n.get("Alive")]),
                           "CPU": resources.get("CPU", 0), "GPU": resources.get("GPU", 0)}
        say(f"sweep: {len(jobs)} jobs ({len(todo)} to run, {len(mine)} reused) on {where}: "
            f"{meta['cluster']['nodes']} node(s), {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs "
            f"-> {out}")
        pending: dict = {}
        try:
            _submit(ray, pending, todo, out, resources, records, mine, meta, cpus_per_job,
                    (bench_seconds, bench_threads, bench_isolation), retries, say)
            _gather(ray, pending, out, records, mine, meta, retries, say)
        except KeyboardInterrupt:
            _cancel(ray, pending)
            meta["interrupted"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            _write(out, records, meta)
            raise SweepInterrupted(f"interrupted: {len(mine)} of {len(jobs)} jobs have records in "
                                   f"{out / 'results.json'}; run the same command again to finish the rest") from None
    finally:
        if started_here:
            ray.shutdown()
        if auth_mode is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = auth_mode
    return SweepResult(out, tuple(mine[j.name] for j in jobs))


def _submit(ray, pending: dict, todo: list[SweepJob], out: Path, resources: dict[str, float], records, mine, meta,
            cpus_per_job: float, bench: tuple, retries: int, say) -> None:
    """Submit each job as a Ray task into `pending` (ref -> job); a GPU job on a cluster without GPUs fails here."""
    remote = ray.remote(run_job)
    for job in todo:
        if job.needs_gpu and not resources.get("GPU"):
            record = failed_record(job, f"target {job.target_name} needs a GPU ({job.target.provider}) and this Ray "
                                        f"cluster has none; add a GPU node or drop the target", reused=False)
            _finish(record, out, records, mine, meta, say)
            continue
        ref = remote.options(num_cpus=cpus_per_job, num_gpus=1 if job.needs_gpu else 0, max_retries=retries,
                             retry_exceptions=False, name=f"optpipe:{job.name}").remote(
            job, str(out / "artifacts"), *bench)
        pending[ref] = job


def _finish(record, out, records, mine, meta, say) -> None:
    """Record a finished job and rewrite results.json at once, so a crash or Ctrl-C loses no finished job."""
    mine[record["job"]] = records[record["job"]] = record
    meta["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    _write(out, records, meta)
    say(f"[{len(mine)}/{len(meta['jobs'])}] {record['job']}: {_describe(record)}")


def _gather(ray, pending: dict, out: Path, records, mine, meta, retries: int, say) -> None:
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
        for ref in ready:
            job = pending.pop(ref)
            try:
                record = {**ray.get(ref), "reused": False}
            except Exception as exc:  # the task itself failed: a dead worker or node, a missing install
                record = failed_record(job, _ray_error(exc, retries), reused=False)
            _finish(record, out, records, mine, meta, say)


def _write(out: Path, records: dict[str, dict[str, Any]], meta: dict[str, Any]) -> None:
    """This sweep's jobs in plan order, then the records of earlier sweeps into OUT that this one did not name."""
    ordered = {name: records[name] for name in meta["jobs"] if name in records}
    write_records(out, {**ordered, **{k: v for k, v in records.items() if k not in ordered}}, meta)


def _cancel(ray, pending: dict) -> None:
    for ref in pending:
        try:
            ray.cancel(ref, force=True)
        except Exception:  # already finished, or the cluster is going down with us
            pass
