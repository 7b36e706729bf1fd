"""`optpipe sweep` and `optpipe report`: argument parsing and printing only; the work is optpipe.sweep's."""

from __future__ import annotations

import argparse
import sys


def _progress(args: argparse.Namespace):
    """The CLI's progress callback (main() sets args.progress); plain stderr lines when run without it."""
    progress = getattr(args, "progress", None)
    if progress is not None:
        return progress
    return lambda line: print(line, file=sys.stderr, flush=True)


def _targets(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def cmd_sweep(args: argparse.Namespace) -> int:
    from optpipe.sweep import sweep

    result = sweep(args.models, _targets(args.targets), args.output, address=args.address, overrides=args.set or (),
                   grid=args.grid or None, num_cpus=args.num_cpus, num_gpus=args.num_gpus,
                   cpus_per_job=args.cpus_per_job, bench_seconds=args.bench_seconds, bench_threads=args.threads,
                   bench_isolation=args.bench_isolation, retries=args.retries, progress=_progress(args))
    if getattr(args, "quiet", False):
        print(result.results_file)
        return result.exit_code
    width = max([len(r["job"]) for r in result.records] + [3])
    print(f"\n{'job':<{width}} {'status':<12} {'p50 ms':>9} {'seq/s':>9} {'fidelity':>22} {'MB':>8} {'s':>6}  ")
    for r in result.records:
        bench, metrics = r.get("bench") or {}, r.get("validation") or {}
        metric = next((k for k in ("mean_cosine", "top1_agreement", "next_token_agreement") if k in metrics), None)
        fidelity = f"{metric} {metrics[metric]:.4f}" if metric else ""
        size = f"{r['size']['onnx_bytes'] / 1e6:.1f}" if r.get("size") else ""
        p50 = f"{bench['p50_ms']:.3f}" if bench else ""
        rate = f"{bench['sequences_per_s']:.1f}" if bench else ""
        status = r["status"] + (" (reused)" if r.get("reused") else "")
        print(f"{r['job']:<{width}} {status:<12} {p50:>9} {rate:>9} {fidelity:>22} {size:>8} "
              f"{r.get('seconds', 0):>6.1f}  {r.get('error', '')}")
    print(f"results: {result.results_file} ({len(result.ok)} ok, {len(result.failed)} failed, "
          f"{len(result.reused)} reused); report: optpipe report {result.out} -o report.html")
    return result.exit_code


def cmd_report(args: argparse.Namespace) -> int:
    from optpipe.sweep import write_report

    path = write_report(args.paths, args.output)
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


def add_sweep_parsers(sub) -> None:
    """Add `sweep` and `report` to the CLI's subparsers."""
    sweep = sub.add_parser("sweep", help="run models x targets as Ray jobs (compile, validate, publish, bench)",
                           description="Every MODEL x target (x grid point) is one Ray job: optimize into "
                                       "OUT/artifacts/<model>-<target>[-grid], then a short bench. OUT/results.json "
                                       "is rewritten as each job finishes; a rerun reuses the ok jobs. Exit 1 when "
                                       "any job failed. Needs the sweep extra: pip install \"optpipe[sweep]\".")
    sweep.set_defaults(handler=cmd_sweep)
    sweep.add_argument("models", nargs="+", metavar="MODEL", help="hub ids or local directories")
    sweep.add_argument("--targets", required=True, metavar="T1,T2", help="targets, comma-separated (names or .toml)")
    sweep.add_argument("--output", "-o", required=True, metavar="OUT",
                       help="sweep directory: results.json and artifacts/")
    sweep.add_argument("--address", help="an existing Ray cluster: HOST:PORT of its head, or auto (default: start a "
                                         "local Ray for this sweep)")
    sweep.add_argument("--set", action="append", metavar="PASS.KEY=VALUE",
                       help="override for every job whose target has that pass (repeatable)")
    sweep.add_argument("--grid", action="append", metavar="PASS.KEY=V1,V2",
                       help="one job per value (repeatable: the product of all grids)")
    sweep.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all); ignored with --address")
    sweep.add_argument("--num-gpus", type=int, help="GPUs of the local Ray (default: those Ray detects); ignored "
                                                    "with --address")
    sweep.add_argument("--cpus-per-job", type=float, default=1, help="CPUs Ray reserves per job (default 1)")
    sweep.add_argument("--bench-seconds", type=float, default=3.0, help="timing budget per shape (default 3)")
    sweep.add_argument("--threads", type=int, help="intra-op threads for the bench (default: ONNX Runtime's)")
    sweep.add_argument("--bench-isolation", choices=["machine", "bench"], default="machine",
                       help="machine (default): a bench waits until no other sweep job compiles on its machine; "
                            "bench: benches only avoid each other (faster, noisier)")
    sweep.add_argument("--retries", type=int, default=2, help="reruns of a job whose worker died (default 2)")

    report = sub.add_parser("report", help="HTML + PNG report of sweep outputs and artifact directories")
    report.set_defaults(handler=cmd_report)
    report.add_argument("paths", nargs="+", metavar="PATH", help="sweep directories (OUT), results.json files or "
                                                                  "artifact directories")
    report.add_argument("--output", "-o", default="report.html", help="the HTML page; the PNG goes beside it "
                                                                      "(default report.html)")
