"""The regression gate on a busy runner (issue 17): A/A false alarms and detection of +3% and +5%, calm and beside
noisy neighbours, on the wall clock or the thread's CPU time.

Conditions: `calm` (no neighbour started; whatever else runs on the machine shows in the load average), `one`
(one neighbour process), `all` (one neighbour per core, as when a runner runs parallel jobs), or a number of
neighbours. The neighbours are bench/neighbour.py's workers (single-threaded: 256 MB copies and 512x512 matmuls),
started before a condition's first check and stopped after its last one, by this script.

Set-up, once, before any condition and without neighbours:
1. the baseline is recorded from ARTIFACT (the reference every check times interleaved with the candidate);
2. the injected slowdowns are calibrated as in bench/calibration_study.py: a probe with --probe MatMuls
   (optpipe.perf.slowdown) is timed interleaved with ARTIFACT for --calibrate-seconds on the clock of the first
   --measure, giving the cost of one MatMul at the checked shape; the +3% and +5% copies get the matching chain
   lengths. Their effect as measured by all the checks is in the summary (median ratio per kind).

Then per condition, what CI runs: a fresh `optpipe check CANDIDATE --baseline B --tolerance 1% --threads 1
--seconds S --measure M --json` process per check, round-robin over A/A, +3%, +5% (and over the measures when
several are given, so that they see the same noise). A check is "flagged" when its status is `regression`; an
`inconclusive` check exits 0 (it is not flagged) and is counted apart. Each check's status, interval, measure,
rounds, timing seconds, early stop, noise, wall seconds of the whole process and load average are kept.

Results go to bench/results/gate-study-<date>.json (rewritten atomically after every check) and a readable
summary in gate-study-<date>.txt, also printed at the end. The study for issue 17's goal (A/A flagged at most 1 in
50, +3% flagged at least 19 in 20, each check at most 60 s), MiniLM through cpu-int8:

    optpipe run --target cpu-int8 -o out/all-MiniLM-L6-v2-cpu-int8
    python bench/gate_study.py out/all-MiniLM-L6-v2-cpu-int8 --conditions calm,one,all --aa 50 --slow 20 \\
        --seconds 40 --measure cpu

`--measure wall,cpu` compares the two clocks check by check. A smoke run (a few minutes, written to a temporary
directory unless --out is given):

    python bench/gate_study.py out/all-MiniLM-L6-v2-cpu-int8 --quick --conditions calm,all
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from neighbour import cores, neighbours  # noqa: E402  (bench/ is not a package)

from optpipe.artifact import Artifact  # noqa: E402
from optpipe.perf.harness import grid_workloads, interleave, machine_facts, open_artifact  # noqa: E402
from optpipe.perf.isa import detect  # noqa: E402
from optpipe.perf.regress import record_baseline, resolve_measure  # noqa: E402
from optpipe.perf.slowdown import slowed_copy  # noqa: E402
from optpipe.perf.stats import paired_ratio  # noqa: E402

GOAL = {"aa_flagged_max": 1 / 50, "slow3_flagged_min": 19 / 20, "check_s_max": 60.0}


def neighbour_count(condition: str) -> int:
    if condition == "calm":
        return 0
    if condition == "one":
        return 1
    if condition == "all":
        return cores()
    if condition.isdigit():
        return int(condition)
    raise SystemExit(f"unknown condition {condition!r}: calm, one, all or a number of neighbours")


def calibrate(artifact: Path, work: Path, args, clock: str) -> tuple[float, dict]:
    """Relative cost of one injected MatMul at the checked shape, on `clock`, interleaved with the original."""
    probe_dir = slowed_copy(artifact, work / "probe", args.probe)
    models = [open_artifact(artifact, args.threads), open_artifact(probe_dir, args.threads)]
    works = grid_workloads(models, args.batch, args.seq)
    series = interleave(models, [works[0][0], works[1][0]], 5, None, args.calibrate_seconds,
                        np.random.default_rng(0), clock=clock)
    ratio = paired_ratio(series[0], series[1])
    print(f"probe: {args.probe} MatMuls -> ratio {ratio.ratio:.4f} [{ratio.low:.4f}, {ratio.high:.4f}] "
          f"({ratio.rounds} rounds, {clock} clock, {args.calibrate_seconds:g}s)", flush=True)
    return (ratio.ratio - 1) / args.probe, {"probe": args.probe, "ratio": ratio.ratio, "low": ratio.low,
                                            "high": ratio.high, "rounds": ratio.rounds, "clock": clock}


def run_check(candidate: Path, baseline: Path, measure: str, args) -> dict:
    out = baseline.parent / "check.json"
    out.unlink(missing_ok=True)
    command = [sys.executable, "-m", "optpipe", "check", str(candidate), "--baseline", str(baseline),
               "--tolerance", args.tolerance, "--threads", str(args.threads), "--seconds", str(args.seconds),
               "--measure", measure, "--json", str(out)]
    load = os.getloadavg()[0]
    started = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=max(120.0, 4 * args.seconds))
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "exit_code": None, "wall_s": round(time.perf_counter() - started, 2),
                "load1": round(load, 2)}
    wall = time.perf_counter() - started
    if proc.returncode not in (0, 3):  # 3: regression found
        raise SystemExit(f"check failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    r = json.loads(out.read_text())
    return {"status": r["status"], "exit_code": proc.returncode, "wall_s": round(wall, 2), "load1": round(load, 2),
            "ratio": r["ratio"]["ratio"], "low": r["ratio"]["low"], "high": r["ratio"]["high"],
            "measure": r["measure"], "rounds": r["rounds"], "seconds": r["seconds"],
            "stopped_early": r["stopped_early"], "looks": r["looks"], "noise_sd": r["noise_sd"],
            "halfwidth": r["halfwidth"], "notes": r["notes"]}


def summarize(records: list[dict], kinds: list[str]) -> list[dict]:
    """One row per (condition, measure asked), in the order they ran."""
    rows = []
    for condition, measure in dict.fromkeys((r["condition"], r["measure_asked"]) for r in records):
        mine = [r for r in records if r["condition"] == condition and r["measure_asked"] == measure]
        row = {"condition": condition, "measure": measure, "checks": len(mine),
               "measured_as": sorted({r.get("measure", "?") for r in mine}),
               "load1_median": round(float(np.median([r["load1"] for r in mine])), 2),
               "check_s_median": round(float(np.median([r["wall_s"] for r in mine])), 1),
               "check_s_max": round(float(np.max([r["wall_s"] for r in mine])), 1)}
        for kind in kinds:
            these = [r for r in mine if r["kind"] == kind]
            timed = [r for r in these if "ratio" in r]
            row[kind] = {
                "checks": len(these),
                "flagged": sum(r["status"] == "regression" for r in these),
                "inconclusive": sum(r["status"] == "inconclusive" for r in these),
                "timeouts": sum(r["status"] == "timeout" for r in these),
                "median_ratio": round(float(np.median([r["ratio"] for r in timed])), 4) if timed else None,
                "median_halfwidth": round(float(np.median([r["halfwidth"] for r in timed])), 4) if timed else None,
                "median_noise_sd": round(float(np.median([r["noise_sd"] for r in timed])), 4) if timed else None,
                "stopped_early": sum(bool(r.get("stopped_early")) for r in these),
                "median_timing_s": round(float(np.median([r["seconds"] for r in timed])), 1) if timed else None,
            }
        rows.append(row)
    return rows


def summary_text(report: dict) -> str:
    s, m, inj = report["settings"], report["machine"], report["injection"]
    kinds = report["kinds"]
    lines = [f"optpipe check gate study (issue 17), {report['date']}{'' if report['finished'] else ' (UNFINISHED)'}",
             f"command: {report['command']}",
             f"machine: {m['cpu']}, {m['cores']} cores, integer-kernel flags {' '.join(m['cpu_flags']) or '-'} "
             f"(ISA family {report['isa']['family']}); onnxruntime {m['onnxruntime']}, python {m['python']}",
             f"artifact: {report['artifact']} (target {report['target']}), bs {s['batch']}, seq {s['seq']}, "
             f"threads {s['threads']}, tolerance {s['tolerance']}, budget {s['seconds']:g}s per check",
             f"injection: one {inj['size']}x{inj['size']} MatMul = {inj['per_matmul']:.4%} of the model "
             f"({inj['calibration']['clock'] if inj.get('calibration') else '-'} clock, calm); chains "
             + ", ".join(f"{k} = {v} MatMuls" for k, v in inj["chains"].items()),
             f"goal: A/A flagged <= {GOAL['aa_flagged_max'] * 50:.0f}/50, +3% flagged >= "
             f"{GOAL['slow3_flagged_min'] * 20:.0f}/20, each check <= {GOAL['check_s_max']:.0f}s wall "
             "(flagged = status regression; inconclusive exits 0 and is not flagged)", ""]
    head = f"{'condition':<10} {'measure':<8} {'load':>5} "
    for kind in kinds:
        head += f"| {kind + ' flagged':>12} {'inc':>4} {'ratio':>6} {'±hw':>6} {'sd':>6} {'early':>5} "
    head += f"| {'s/check med':>11} {'max':>6}"
    lines += [head, "-" * len(head)]
    for row in report["summary"]:
        measure = row["measure"]
        if row["measured_as"] != [measure]:  # e.g. cpu asked, wall used (threads != 1)
            measure += "->" + "/".join(row["measured_as"])
        line = f"{row['condition']:<10} {measure:<8} {row['load1_median']:>5.2f} "
        for kind in kinds:
            k = row[kind]
            flagged = f"{k['flagged']}/{k['checks']}"
            ratio = f"{k['median_ratio']:.3f}" if k["median_ratio"] is not None else "-"
            hw = f"{k['median_halfwidth']:.2%}" if k["median_halfwidth"] is not None else "-"
            sd = f"{k['median_noise_sd']:.3f}" if k["median_noise_sd"] is not None else "-"
            line += (f"| {flagged:>12} {k['inconclusive']:>4} {ratio:>6} {hw:>6} {sd:>6} "
                     f"{k['stopped_early']:>5} ")
        line += f"| {row['check_s_median']:>11.1f} {row['check_s_max']:>6.1f}"
        lines.append(line)
    lines += ["", *textwrap.wrap(
        "columns per kind: flagged/checks, inc = inconclusive, ratio = median of the checks' ratios (the measured "
        "effect), ±hw = median half-width of the 95% interval, sd = median per-round log-ratio sd, early = checks "
        "that stopped before the budget; s/check = wall seconds of the whole check process; load = median "
        "1-minute load average at the start of a check", 110)]
    timeouts = sum(k.get("timeouts", 0) for row in report["summary"] for kind in kinds for k in [row[kind]])
    if timeouts:
        lines.append(f"{timeouts} check(s) timed out (status timeout, not flagged)")
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path, help="the reference artifact (e.g. MiniLM through cpu-int8)")
    parser.add_argument("--conditions", default="calm,one,all", help="comma-separated: calm, one, all, or a number "
                                                                     "of neighbours (default calm,one,all)")
    parser.add_argument("--aa", type=int, help="A/A checks per condition and measure (default 50; --quick 2)")
    parser.add_argument("--slow", type=int, help="checks per slowdown, condition and measure (default 20; --quick 1)")
    parser.add_argument("--slowdowns", default="3,5", help="injected slowdowns in percent (default 3,5)")
    parser.add_argument("--seconds", type=float, help="budget of one check, --seconds of optpipe check "
                                                      "(default 40; --quick 5)")
    parser.add_argument("--measure", default="cpu", help="optpipe check --measure, comma-separated to compare "
                                                         "(e.g. wall,cpu; default cpu)")
    parser.add_argument("--tolerance", default="1%")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--probe", type=int, default=40, help="MatMuls in the calibration probe (default 40)")
    parser.add_argument("--calibrate-seconds", type=float, help="calibration length (default 60; --quick 6)")
    parser.add_argument("--baseline-seconds", type=float, help="baseline recording (default 20; --quick 2)")
    parser.add_argument("--chains", help="NAME=K,... : these chain lengths instead of calibrating (e.g. "
                                         "+3%%=18,+5%%=30 from an earlier run)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: small defaults, output to a temp dir")
    parser.add_argument("--out", type=Path, help="results JSON (default bench/results/gate-study-DATE.json; "
                                                 "--quick: a temporary directory); the summary goes beside it, .txt")
    args = parser.parse_args()
    quick = args.quick
    args.aa = args.aa if args.aa is not None else (2 if quick else 50)
    args.slow = args.slow if args.slow is not None else (1 if quick else 20)
    args.seconds = args.seconds or (5.0 if quick else 40.0)
    args.calibrate_seconds = args.calibrate_seconds or (6.0 if quick else 60.0)
    args.baseline_seconds = args.baseline_seconds or (2.0 if quick else 20.0)
    measures = [m.strip() for m in args.measure.split(",") if m.strip()]
    conditions = [c.strip() for c in args.conditions.split(",") if c.strip()]
    counts = {c: neighbour_count(c) for c in conditions}
    started = dt.datetime.now(dt.timezone.utc)
    work = Path(tempfile.mkdtemp(prefix="optpipe-gate-study-"))
    if args.out is None:
        name = f"gate-study-{started:%Y%m%d}.json"
        args.out = (work / name) if quick else Path(__file__).resolve().parent / "results" / name
    summary_path = args.out.with_suffix(".txt")

    artifact = args.artifact.resolve()
    target = Artifact.load(artifact).target.name
    providers = open_artifact(artifact, args.threads).providers
    clock, fallback = resolve_measure(measures[0], args.threads, providers)
    if fallback:
        print(f"note: {fallback}", flush=True)
    print(f"work dir {work}; recording the baseline ({args.baseline_seconds:g}s, no neighbours) ...", flush=True)
    baseline = work / "baseline.json"
    record_baseline(artifact, baseline, batch=args.batch, seq=args.seq, threads=args.threads,
                    seconds=args.baseline_seconds, measure=measures[0])
    calibration = None
    if args.chains:
        per_matmul = float("nan")
        chains = {name: int(k) for name, _, k in (item.partition("=") for item in args.chains.split(","))}
    else:
        per_matmul, calibration = calibrate(artifact, work, args, clock)
        if not per_matmul > 0:
            raise SystemExit(f"calibration failed: one MatMul costs {per_matmul:.4%}; raise --probe or "
                             "--calibrate-seconds")
        chains = {f"+{float(p):g}%": max(1, math.ceil(float(p) / 100 / per_matmul - 0.5))
                  for p in args.slowdowns.split(",")}
    print(f"one MatMul = {per_matmul:.4%} of the model; chains: {chains}", flush=True)
    variants = {"A/A": artifact, **{name: slowed_copy(artifact, work / f"slow{k}", k) for name, k in chains.items()}}
    kinds = list(variants)
    per_kind = {kind: args.aa if kind == "A/A" else args.slow for kind in kinds}
    cycle = [(kind, m) for i in range(max(per_kind.values())) for kind in kinds for m in measures
             if i < per_kind[kind]]
    plan = [(condition, kind, m) for condition in conditions for kind, m in cycle]

    facts = machine_facts(args.threads)
    isa = detect()
    records: list[dict] = []

    def report(finished: bool) -> dict:
        data = {"date": started.isoformat(timespec="seconds"), "command": shlex.join([sys.executable, *sys.argv]),
                "machine": facts, "isa": {"brand": isa.brand, "flags": list(isa.flags), "family": isa.family},
                "artifact": str(artifact), "target": target, "kinds": kinds,
                "settings": {"batch": args.batch, "seq": args.seq, "threads": args.threads,
                             "tolerance": args.tolerance, "seconds": args.seconds, "measures": measures,
                             "conditions": {c: counts[c] for c in conditions}, "aa": args.aa, "slow": args.slow,
                             "baseline_seconds": args.baseline_seconds, "quick": quick},
                "injection": {"per_matmul": per_matmul, "chains": chains, "size": 128, "calibration": calibration},
                "goal": GOAL, "summary": summarize(records, kinds) if records else [], "checks": records,
                "finished": finished}
        write_atomic(args.out, json.dumps(data, indent=2) + "\n")
        return data

    index = 0
    for condition in conditions:
        n = counts[condition]
        print(f"\n== {condition}: {n} neighbour(s) ==", flush=True)
        with neighbours(n, settle=3.0) as procs:
            for cond, kind, measure in plan:
                if cond != condition:
                    continue
                index += 1
                dead = [p.pid for p in procs if p.poll() is not None]
                if dead:
                    raise SystemExit(f"neighbour workers {dead} died during {condition}")
                result = run_check(variants[kind], baseline, measure, args)
                records.append({"index": index, "condition": condition, "neighbours": n, "kind": kind,
                                "measure_asked": measure, **result})
                if "ratio" in result:
                    print(f"[{index}/{len(plan)}] {condition:<5} {kind:<5} {measure}->{result['measure']:<4} "
                          f"{result['status']:<12} {result['ratio']:.4f} [{result['low']:.4f}, {result['high']:.4f}]"
                          f"  {result['rounds']} rounds {result['seconds']:.1f}s"
                          f"{' early' if result['stopped_early'] else ''}"
                          f"  sd {result['noise_sd']:.3f}  check {result['wall_s']:.1f}s  load {result['load1']:.2f}",
                          flush=True)
                else:
                    print(f"[{index}/{len(plan)}] {condition:<5} {kind:<5} {measure} TIMEOUT after "
                          f"{result['wall_s']:.0f}s", flush=True)
                report(False)
    data = report(True)
    for copy in [work / "probe", *(work / f"slow{k}" for k in chains.values())]:
        shutil.rmtree(copy, ignore_errors=True)  # the injected copies (tens of MB each); the baseline stays
    text = summary_text(data)
    write_atomic(summary_path, text)
    print("\n" + text, end="")
    print(f"wrote {args.out} and {summary_path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
