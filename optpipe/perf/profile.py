"""Where an artifact's time goes: ONNX Runtime's profiler, summed by op type, for the manifest.

The op types are the kernels that really run, after ONNX Runtime's own session-time fusions (an INT8 graph's
DynamicQuantizeLinear + MatMulInteger runs as DynamicQuantizeMatMul), which the graph file does not show.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

RUNS = 20
WARMUP = 3


def op_time_profile(directory: Path, components: list[str] | tuple[str, ...], target, *, batch: int = 1,
                    seq: int = 128, threads: int | None = None, runs: int = RUNS) -> dict[str, Any]:
    """Per workload (encoders: forward; decoders: prefill and decode), milliseconds per run by op type, with the
    node count and share. A provider that cannot run here is a "skipped" entry, not an error."""
    from optpipe.perf.inputs import workloads
    from optpipe.session import PROFILE_PREFIX, provider_problem, target_session

    problem = provider_problem(target.provider)
    if problem:
        return {"skipped": problem}
    work = Path(tempfile.mkdtemp(prefix="optpipe-profile-"))
    try:
        plain = {c: target_session(directory / c, target, threads=threads, spinning=False, artifact_dir=directory)
                 for c in components}
        out: dict[str, Any] = {}
        for w in workloads(directory, plain, batch, seq):
            extra = {**target.session_options, PROFILE_PREFIX: str(work / w.name)}
            session = target_session(directory / w.component, _with_options(target, extra), threads=threads,
                                     spinning=False, artifact_dir=directory)
            for _ in range(WARMUP + runs):
                session.run(None, w.feed)
            out[w.name] = _by_op_type(Path(session.end_profiling()), runs, WARMUP + runs)
        return {"settings": {"batch": batch, "seq": seq, "threads": threads, "runs": runs}, "workloads": out}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _with_options(target, options: dict[str, Any]):
    from dataclasses import replace

    return replace(target, session_options=options)


def _by_op_type(trace: Path, runs: int, total_runs: int) -> dict[str, Any]:
    """Sum the kernel times of the last `runs` runs of a trace by op type."""
    events = json.loads(trace.read_text())
    starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    first = starts[total_runs - runs] if len(starts) >= total_runs else 0
    micros: dict[str, float] = defaultdict(float)
    nodes: dict[str, set] = defaultdict(set)
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= first:
            op = e["args"]["op_name"]
            micros[op] += e["dur"]
            nodes[op].add(e["name"])
    total = sum(micros.values()) or 1.0
    ops = {op: {"nodes": len(nodes[op]), "ms": round(us / runs / 1e3, 4), "share": round(us / total, 4)}
           for op, us in sorted(micros.items(), key=lambda kv: -kv[1])}
    return {"ms_per_run": round(total / runs / 1e3, 4), "ops": ops}
