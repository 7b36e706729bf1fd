"""Command line: argument parsing and printing only; every command calls the public API."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from optpipe.cli.harness import add_harness_parsers
from optpipe.cli.output import mb, print_summary, say
from optpipe.cli.tune import add_tune_parser
from optpipe.errors import OptpipeError


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
    from optpipe.cache import cache_root, clear as clear_cache

    if args.action == "clear":
        print(f"removed {mb(clear_cache())} from {cache_root()}")
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
