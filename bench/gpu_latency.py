"""End-to-end latency of published artifacts on their target's provider (host arrays in and out, as a caller sees it).

Used by bench/gpu_check.sh until `optpipe bench` covers GPU providers. Sessions come from optpipe.session, so
TensorRT engine/timing caches and shape profiles are the target's own. A missing provider is one line and exit 4.

    python bench/gpu_latency.py out/*-cuda-fp16 --batch-sizes 1,8,32 --seq 128 --json results.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from optpipe.artifact import Artifact
from optpipe.errors import OptpipeError
from optpipe.session import create_session, target_session


def _inputs(session, batch: int, seq: int, vocab: int, rng) -> dict[str, np.ndarray]:
    feed = {"input_ids": rng.integers(1000, vocab, (batch, seq), dtype=np.int64),
            "attention_mask": np.ones((batch, seq), dtype=np.int64),
            "token_type_ids": np.zeros((batch, seq), dtype=np.int64)}
    return {i.name: feed[i.name] for i in session.get_inputs()}


def measure(artifact: Artifact, batch_sizes: list[int], seq: int, iters: int, warmup: int, cpu: bool) -> dict:
    model = artifact.components[0]
    started = time.perf_counter()
    session = (create_session(model, "CPUExecutionProvider") if cpu
               else target_session(model, artifact.target, artifact_dir=artifact.path))
    result = {"artifact": str(artifact.path), "target": artifact.manifest["target"]["name"],
              "providers": session.get_providers(), "session_seconds": round(time.perf_counter() - started, 3),
              "sequence_length": seq, "rows": []}
    vocab = json.loads((artifact.path / "config.json").read_text()).get("vocab_size", 30522)
    rng = np.random.default_rng(0)
    for batch in batch_sizes:
        feed = _inputs(session, batch, seq, vocab, rng)
        first = time.perf_counter()
        session.run(None, feed)  # TensorRT builds (or loads) its engine on the first run
        first_run = time.perf_counter() - first
        for _ in range(warmup):
            session.run(None, feed)
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            session.run(None, feed)
            times.append(time.perf_counter() - t0)
        ms = np.array(times) * 1000
        result["rows"].append({"batch": batch, "first_run_s": round(first_run, 3), "iters": iters,
                               "p50_ms": round(float(np.percentile(ms, 50)), 3),
                               "p90_ms": round(float(np.percentile(ms, 90)), 3),
                               "p99_ms": round(float(np.percentile(ms, 99)), 3),
                               "sequences_per_s": round(batch * 1000 / float(np.median(ms)), 1)})
    return result


def markdown(results: list[dict]) -> str:
    """A results table: validation as recorded in each manifest, then the measured latencies."""
    lines = ["| target | validated on | fidelity | providers used | batch | p50 ms | p90 ms | seq/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in results:
        if "error" in row:
            lines.append(f"| {row['artifact']} | | | error: {row['error']} | | | | |")
            continue
        v = Artifact.load(row["artifact"]).manifest["validation"]
        where = v["provider"] + (f" (deferred: {v['deferred']})" if v.get("deferred") else "")
        fidelity = ", ".join(f"{k} {val:.5f}" for k, val in v["metrics"].items())
        for r in row["rows"]:
            lines.append(f"| {row['target']} | {where} | {fidelity} | {', '.join(row['providers'])} | {r['batch']} "
                         f"| {r['p50_ms']} | {r['p90_ms']} | {r['sequences_per_s']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--cpu", action="store_true", help="dry run on CPUExecutionProvider (not GPU figures)")
    parser.add_argument("--json", help="append results to this file (a JSON list)")
    parser.add_argument("--markdown", help="write a results table (validation from the manifests + latency) here")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    results, status = [], 0
    for path in args.artifacts:
        try:
            row = measure(Artifact.load(path), batches, args.seq, args.iters, args.warmup, args.cpu)
        except OptpipeError as exc:
            print(f"gpu_latency: {path}: {exc}", file=sys.stderr)
            results.append({"artifact": path, "error": str(exc)})
            status = max(status, exc.exit_code)
            continue
        results.append(row)
        for r in row["rows"]:
            print(f"{row['target']:<14} {','.join(p.replace('ExecutionProvider', '') for p in row['providers']):<22} "
                  f"bs {r['batch']:>3} seq {args.seq}: p50 {r['p50_ms']:8.3f} ms  p90 {r['p90_ms']:8.3f} ms  "
                  f"{r['sequences_per_s']:>9.1f} seq/s  (first run {r['first_run_s']} s)")
    if args.json:
        out = Path(args.json)
        previous = json.loads(out.read_text()) if out.is_file() else []
        out.write_text(json.dumps(previous + results, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(markdown(results))
    return status


if __name__ == "__main__":
    sys.exit(main())
