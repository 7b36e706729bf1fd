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
        # One profiled session per component serves all of its workloads (prefill and decode); each workload's
        # runs are consecutive, so the trace splits by run index.
        sessions = {c: target_session(directory / c, _with_options(target, {**target.session_options,
                                                                            PROFILE_PREFIX: str(work / c)}),
                                      threads=threads, spinning="off", artifact_dir=directory) for c in components}
        windows: dict[str, list[tuple[str, int]]] = {c: [] for c in components}
        for w in workloads(directory, sessions, batch, seq):
            session = sessions[w.component]
            first = len(windows[w.component]) * (WARMUP + runs)  # runs this session has made so far
            for _ in range(WARMUP + runs):
                session.run(None, w.feed)
            windows[w.component].append((w.name, first + WARMUP))
        out: dict[str, Any] = {}
        for component, session in sessions.items():
            trace = json.loads(Path(session.end_profiling()).read_text())
            for name, start in windows[component]:
                out[name] = _by_op_type(trace, start, runs)
        return {"settings": {"batch": batch, "seq": seq, "threads": threads, "runs": runs}, "workloads": out}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _with_options(target, options: dict[str, Any]):
    from dataclasses import replace

    return replace(target, session_options=options)


def _by_op_type(events: list[dict[str, Any]], start: int, runs: int) -> dict[str, Any]:
    """Sum the kernel times of model runs start .. start + runs - 1 of a trace by op type."""
    starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    begin = starts[start] if start < len(starts) else 0
    end = starts[start + runs] if start + runs < len(starts) else float("inf")
    micros: dict[str, float] = defaultdict(float)
    nodes: dict[str, set] = defaultdict(set)
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and begin <= e["ts"] < end:
            op = e["args"]["op_name"]
            micros[op] += e["dur"]
            nodes[op].add(e["name"])
    total = sum(micros.values()) or 1.0
    ops = {op: {"nodes": len(nodes[op]), "ms": round(us / runs / 1e3, 4), "share": round(us / total, 4)}
           for op, us in sorted(micros.items(), key=lambda kv: -kv[1])}
    return {"ms_per_run": round(total / runs / 1e3, 4), "ops": ops}
