"""Does timing several ONNX Runtime sessions interleaved in one process change their latencies? Per spinning mode.

For each mode of optpipe/session.py SPINNING (off, parked, on), each artifact is timed alone (one session in a fresh
process, `optpipe bench` on it alone) and then all of them interleaved in one process (the harness), the same
shape and threads. A mode is fit for interleaved comparisons when every interleaved latency matches its alone
latency: then the ratio the harness reports is the ratio each session would show on its own.

    python bench/spinning.py ART_A ART_B --threads 2 --seconds 10 --repeats 3 [--batch 1 --seq 128] [--json FILE]

Alone runs happen at other moments than the interleaved one, so on a shared machine their difference includes
drift: the modes take turns within each repeat and the medians over repeats are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from optpipe.perf.harness import bench, machine_facts  # noqa: E402
from optpipe.session import SPINNING  # noqa: E402


def alone(artifact: str, mode: str, args) -> float:
    """p50 ms of `artifact` timed by itself in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        subprocess.run([sys.executable, "-m", "optpipe", "bench", artifact, "--batch", str(args.batch), "--seq",
                        args.seq, "--threads", str(args.threads), "--seconds", str(args.seconds), "--spinning", mode,
                        "--json", str(out)], check=True, capture_output=True, text=True)
        return json.loads(out.read_text())["rows"][0]["p50_ms"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=10.0, help="per alone run and per interleaved run")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of (alone each, interleaved) per mode")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", default="128")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    facts = machine_facts(args.threads)
    lines = [f"command: python {' '.join(sys.argv)}",
             f"{facts['cpu']} ({', '.join(facts['cpu_flags'])}), {facts['cores']} cores, onnxruntime "
             f"{facts['onnxruntime']}, bs {args.batch} seq {args.seq}, {args.threads} threads, load average "
             f"{os.getloadavg()[0]:.2f} at start; medians of {args.repeats} repeats, the modes taking turns", "",
             f"{'spinning':<8} {'artifact':<28} {'alone p50 ms':>12} {'interleaved':>11} {'inter/alone':>11}"]
    report = {"command": lines[0], "machine": facts, "modes": {}}
    solo = {m: {a: [] for a in args.artifacts} for m in SPINNING}
    together = {m: {a: [] for a in args.artifacts} for m in SPINNING}
    for _ in range(args.repeats):
        for mode in SPINNING:  # modes take turns, so drift over the run hits each alike
            for a in args.artifacts:
                solo[mode][a].append(alone(a, mode, args))
            result = bench(args.artifacts, [args.batch], [args.seq], threads=args.threads, seconds=args.seconds,
                           spinning=mode)
            first_workload = result.rows[0].workload  # decoders: prefill (alone runs report it first too)
            rows = [r for r in result.rows if r.workload == first_workload]  # in the artifacts' order
            for a, r in zip(args.artifacts, rows):
                together[mode][a].append(r.p50_ms)
    med = lambda xs: float(np.median(xs))  # noqa: E731
    for mode in SPINNING:
        for a in args.artifacts:
            s, t = med(solo[mode][a]), med(together[mode][a])
            lines.append(f"{mode:<8} {Path(a).name[:28]:<28} {s:>12.3f} {t:>11.3f} {t / s:>11.3f}")
        first, *rest = args.artifacts
        for a in rest:  # the comparison a user reads: first / other, alone vs interleaved
            lines.append(f"{mode:<8} ratio {Path(first).name} / {Path(a).name}: alone "
                         f"{med(solo[mode][first]) / med(solo[mode][a]):.3f}, interleaved "
                         f"{med(together[mode][first]) / med(together[mode][a]):.3f}")
        report["modes"][mode] = {a: {"alone_ms": solo[mode][a], "interleaved_ms": together[mode][a]}
                                 for a in args.artifacts}
    lines.append(f"load average at end {os.getloadavg()[0]:.2f}")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({**report, "lines": lines}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
