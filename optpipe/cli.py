"""Command line: argument parsing and printing only; every command calls the public API."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from typing import Any

from optpipe.errors import OptpipeError
from optpipe.cli_tune import add_tune_parser
from optpipe.cli_harness import add_harness_parsers

def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _brief(report: dict[str, Any]) -> str:
    """One line of what a pass changed, from its report."""
    parts = []
    for name, comp in report.get("components", {}).items() if isinstance(report.get("components"), dict) else []:
        if comp.get("fused"):
            parts.append(f"{name}: " + ", ".join(f"{k} {v}" for k, v in comp["fused"].items()))
        elif comp.get("integer_ops"):
            kept = len(comp.get("kept_float", {}))
            parts.append(f"{name}: " + ", ".join(f"{k} {v}" for k, v in comp["integer_ops"].items())
                         + (f"; {kept} kept float" if kept else ""))
    if not parts and "components" in report and isinstance(report["components"], list):
        parts.append(", ".join(report["components"]))
    for key in ("note", "sparsity", "chosen"):
        if key in report:
            parts.append(f"{key}: {report[key]}")
    return "; ".join(parts)


def print_summary(artifact) -> None:
    m = artifact.manifest
    print(f"\n{m['source']['id']} -> {m['target']['name']}   [{m['pipeline']}]")
    print(f"{'pass':<10} {'seconds':>8} {'size in':>10} {'size out':>10}  what changed")
    for step in m["passes"]:
        seconds = "cached" if step["cached"] else f"{step['seconds']:.1f}"
        print(f"{step['name']:<10} {seconds:>8} {_mb(step['bytes_in']):>10} {_mb(step['bytes_out']):>10}  "
              f"{_brief(step['report'])}")
    v = m["validation"]
    figures = ", ".join(f"{k} {val:.4f}" for k, val in v["metrics"].items())
    limits = ", ".join(f"{k} {'<=' if k.startswith('max_') else '>='} {val}" for k, val in v["thresholds"].items())
    status = f"deferred ({v['deferred']})" if v.get("deferred") else ("passed" if v["passed"] else "FAILED")
    print(f"validation ({v['texts']} texts, {v['provider']}): {figures}  [{limits}]  {status}")
    print(f"size: {_mb(m['size']['source_bytes'])} (PyTorch weights) -> {_mb(m['size']['onnx_bytes'])} (ONNX)")
    for row in m.get("bench", {}).get("rows", []):
        print(f"bench ({row['providers'][0]}, {row['workload']} bs {row['batch']} seq {row['seq']}): p50 "
              f"{row['p50_ms']:.3f} ms, p90 {row['p90_ms']:.3f} ms, {row['sequences_per_s']:.1f} seq/s")
    if m.get("bench", {}).get("skipped"):
        print(f"bench skipped: {m['bench']['skipped']}")
    print(f"artifact: {artifact.path}")


def cmd_run(args: argparse.Namespace) -> int:
    from optpipe import optimize

    artifact = optimize(args.model, target=args.target, output=args.output, task=args.task,
                        overrides=args.set or (), pipeline=args.pipeline, overwrite=args.overwrite,
                        use_cache=not args.no_cache, calibration=args.calibration, progress=say,
                        bench=args.bench)
    print_summary(artifact)
    return 0


def cmd_targets(args: argparse.Namespace) -> int:
    from optpipe import list_targets

    for target in list_targets():
        print(f"{target.name:<18} {target.description}")
        print(f"{'':<18} provider: {target.provider}   recipe: {target.pipeline}")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from optpipe.pipeline import cache_root, clear_cache

    if args.action == "clear":
        print(f"removed {_mb(clear_cache())} from {cache_root()}")
    else:
        print(cache_root())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="optpipe", description=__doc__.split(":")[0] if __doc__ else None)
    parser.add_argument("--debug", action="store_true", help="show tracebacks and library warnings")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="compile a model for a target into a validated ONNX artifact")
    run.set_defaults(handler=cmd_run)
    run.add_argument("model", nargs="?", default=None,
                     help="hub id or local directory (default: the bundled all-MiniLM-L6-v2)")
    run.add_argument("--target", "-t", default="cpu-int8", help="target name or path to a .toml (default cpu-int8)")
    run.add_argument("--output", "-o", help="artifact directory (default out/MODEL-TARGET)")
    run.add_argument("--task", help="task, when it cannot be inferred from the model's config")
    run.add_argument("--set", action="append", metavar="PASS.KEY=VALUE",
                     help="override a target option, e.g. quantize.per_channel=false (repeatable)")
    run.add_argument("--pipeline", help='replace the recipe, e.g. "export,fuse,quantize{mode=dynamic}"')
    run.add_argument("--calibration", help="calibration texts (.txt, .jsonl with 'text', .csv with a 'text' column)")
    run.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    run.add_argument("--no-cache", action="store_true", help="do not reuse or store pass outputs")
    run.add_argument("--bench", action="store_true", help="time the artifact (optpipe bench) into its manifest")

    sub.add_parser("targets", help="list the targets and their recipes").set_defaults(handler=cmd_targets)
    cache = sub.add_parser("cache", help="show or clear the pass cache")
    cache.set_defaults(handler=cmd_cache)
    cache.add_argument("action", choices=["dir", "clear"], nargs="?", default="dir")

    # Larger command groups live in their own modules; each adds its subparsers with set_defaults(handler=...).
    add_tune_parser(sub)
    add_harness_parsers(sub)
    return parser


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for name in ("transformers", "optimum", "onnxruntime", "root", "torch", "neural_compressor"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.debug:
        _quiet_libraries()
    try:
        return args.handler(args)
    except OptpipeError as exc:
        if args.debug:
            raise
        say(f"optpipe: error: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        say("optpipe: interrupted; nothing was published")
        return 130


if __name__ == "__main__":
    sys.exit(main())
