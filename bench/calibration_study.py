"""Calibration of `optpipe check`: false alarms on A-vs-A, detection of injected 5% and 10% slowdowns.

Each check is what CI runs: a fresh `optpipe check CANDIDATE --baseline B` process that times the candidate
interleaved with the baseline's reference artifact. The slowdowns are real extra compute (optpipe.perf.slowdown: a
chain of 128x128 MatMuls feeding the output through 0*sum), calibrated against the model at the checked shape:
a probe with K MatMuls is timed interleaved with the original, giving the cost of one MatMul relative to the
model; the 5% and 10% variants get the matching chain lengths, and their actual effect is re-measured from
all checks pooled. Conditions are run round-robin (A/A, 5%, 10%, A/A, ...) so that machine noise falls on
all of them alike. Every check's interval is stored, so the verdict at other tolerances is recomputed offline.

    python bench/calibration_study.py out/all-MiniLM-L6-v2-cpu-int8 --checks 20 --seconds 15 --threads 2
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from optpipe.perf.harness import interleaved_ratios, machine_facts
from optpipe.perf.regress import record_baseline
from optpipe.perf.slowdown import slowed_copy

TOLERANCES = (0.0, 0.01, 0.02, 0.03, 0.04, 0.05)


def calibrate(artifact: Path, work: Path, probe: int, args) -> float:
    """Relative cost of one injected MatMul at the checked shape."""
    probe_dir = slowed_copy(artifact, work / "probe", probe)
    ratio = interleaved_ratios([artifact, probe_dir], batch=args.batch, seq=args.seq, threads=args.threads,
                               seconds=args.calibrate_seconds)[1]
    print(f"probe: {probe} MatMuls -> ratio {ratio.ratio:.4f} [{ratio.low:.4f}, {ratio.high:.4f}]", flush=True)
    return (ratio.ratio - 1) / probe


def run_check(candidate: Path, baseline: Path, args) -> dict:
    out = baseline.parent / "check.json"
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "optpipe", "check", str(candidate), "--baseline", str(baseline),
                           "--tolerance", args.tolerance, "--seconds", str(args.seconds), "--json", str(out)],
                          capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode not in (0, 3):  # 3: regression found
        raise SystemExit(f"check failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    result = json.loads(out.read_text())
    return {"exit_code": proc.returncode, "wall_s": round(wall, 2), "ratio": result["ratio"]}


def summarize(records: list[dict]) -> dict:
    summary = {}
    for condition in sorted({r["condition"] for r in records}):
        rows = [r for r in records if r["condition"] == condition]
        lows = np.array([r["ratio"]["low"] for r in rows])
        summary[condition] = {
            "checks": len(rows),
            "median_ratio": round(float(np.median([r["ratio"]["ratio"] for r in rows])), 4),
            "median_halfwidth": round(float(np.median([(r["ratio"]["high"] - r["ratio"]["low"]) / 2 for r in rows])), 4),
            "flagged_at": {f"{t:.0%}": round(float(np.mean(lows > 1 + t)), 3) for t in TOLERANCES},
            "median_check_s": round(float(np.median([r["wall_s"] for r in rows])), 1),
        }
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--checks", type=int, default=20, help="A-vs-A checks (and slowed checks, see --slow-checks)")
    parser.add_argument("--slow-checks", type=int, default=None, help="checks per injected slowdown (default --checks)")
    parser.add_argument("--seconds", type=float, default=15.0, help="timing length of one check")
    parser.add_argument("--tolerance", default="2%", help="the gate's tolerance for the exit codes")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--probe", type=int, default=40, help="MatMuls in the calibration probe")
    parser.add_argument("--calibrate-seconds", type=float, default=30.0)
    parser.add_argument("--chains", help="NAME=K,... : use these MatMul chain lengths instead of calibrating "
                                         "(e.g. +5%%=29 from an earlier run's measured effect); no A/A checks "
                                         "unless --checks > 0")
    parser.add_argument("--out", type=Path, default=Path("bench/results/calibration.json"))
    args = parser.parse_args()
    slow_checks = args.checks if args.slow_checks is None else args.slow_checks
    started = dt.datetime.now(dt.timezone.utc)
    work = Path(tempfile.mkdtemp(prefix="optpipe-calibration-"))
    variants = {"A/A": args.artifact} if args.checks else {}
    chains = {}
    if args.chains:
        per_matmul = float("nan")
        chains = {name: int(k) for name, _, k in (item.partition("=") for item in args.chains.split(","))}
    else:
        per_matmul = calibrate(args.artifact, work, args.probe, args)
        chains = {f"+{f:.0%}": max(1, math.ceil(f / per_matmul - 0.5)) for f in (0.05, 0.10)}
    for name, k in chains.items():
        variants[name] = slowed_copy(args.artifact, work / f"slow{k}", k)
    print(f"one MatMul = {per_matmul:.4%} of the model; chains: {chains}", flush=True)
    baseline = work / "baseline.json"
    record_baseline(args.artifact, baseline, batch=args.batch, seq=args.seq, threads=args.threads,
                    seconds=args.seconds)
    plan = [name for i in range(max(args.checks, slow_checks)) for name in variants
            if (name == "A/A" and i < args.checks) or (name != "A/A" and i < slow_checks)]
    records = []
    for index, name in enumerate(plan, 1):
        result = run_check(variants[name], baseline, args)
        records.append({"condition": name, **result})
        r = result["ratio"]
        print(f"[{index}/{len(plan)}] {name:<5} exit {result['exit_code']}  ratio {r['ratio']:.4f} "
              f"[{r['low']:.4f}, {r['high']:.4f}]  {result['wall_s']:.1f}s", flush=True)
        report = {"date": started.isoformat(timespec="seconds"), "machine": machine_facts(args.threads),
                  "command": " ".join(sys.argv), "artifact": str(args.artifact),
                  "settings": {k: str(v) for k, v in vars(args).items()},
                  "injection": {"per_matmul": per_matmul, "chains": chains, "size": 128},
                  "summary": summarize(records), "checks": records, "finished": index == len(plan)}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(summarize(records), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
