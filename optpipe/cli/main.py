"""Command line: argument parsing and printing only; every command calls the public API.

Exit codes (one table for every command; README "Errors and exit codes"):
  0  success; `check`: no regression beyond the tolerance, an inconclusive verdict (too noisy to judge within
     the budget) unless --fail-inconclusive, or the baseline was recorded
  1  bad input: unknown model, target or revision, Hub access, bad option value or file, unwritable output,
     not an artifact, a baseline that cannot judge this artifact
  2  usage error: unknown command or flag, missing argument (argparse's code, as for pip and optimum-cli)
  3  a check failed: validation or graph check (nothing published), `tune` found no candidate in the budget,
     `check` found a latency regression (or, with --fail-inconclusive, could not judge within the budget)
  4  missing runtime: no ONNX Runtime installed, or the target's execution provider does not start here
  130 interrupted (Ctrl-C); nothing published
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import traceback

from optpipe.cli.console import Reporter, configured
from optpipe.cli.harness import add_harness_parsers
from optpipe.cli.output import mb, print_summary
from optpipe.cli.sweep import add_sweep_parsers
from optpipe.cli.tune import add_tune_parser
from optpipe.errors import OptpipeError, ProviderUnavailableError
from optpipe.version import __version__

EXIT_INTERRUPTED = 130
RUNTIME_HINT = ("install one ONNX Runtime build through optpipe's extras: pip install 'optpipe[cpu]' (CPU: "
                "onnxruntime) or 'optpipe[gpu]' (CUDA/TensorRT: onnxruntime-gpu), not both")


def cmd_run(args: argparse.Namespace) -> int:
    from optpipe import optimize

    artifact = optimize(args.model, target=args.target, output=args.output, task=args.task,
                        overrides=args.set or (), pipeline=args.pipeline, overwrite=args.overwrite,
                        use_cache=not args.no_cache, calibration=args.calibration, progress=args.progress,
                        bench=args.bench, revision=args.revision)
    if args.quiet:
        print(artifact.path)
    else:
        print_summary(artifact)
    return 0


def cmd_targets(args: argparse.Namespace) -> int:
    from optpipe import list_targets

    from optpipe.targets.recipe import format_pipeline

    for target in list_targets():
        print(f"{target.name:<18} {target.description}")
        print(f"{'':<18} provider: {target.provider}")
        if target.passes:
            print(f"{'':<18} recipe: {target.pipeline}")
        if target.decoder_passes:
            print(f"{'':<18} recipe for decoders (text-generation): {format_pipeline(target.decoder_passes)}")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from optpipe.cache import cache_root, clear as clear_cache

    if args.action == "clear":
        print(f"removed {mb(clear_cache())} from {cache_root()}")
    else:
        print(cache_root())
    return 0


def _output_flags(parser: argparse.ArgumentParser, in_subcommand: bool) -> None:
    """-q/-v/--debug, accepted before and after the subcommand. A subparser writes every default it has over
    what the main parser parsed, so the subcommand's copies default to SUPPRESS and keep their own names."""
    prefix, default = ("sub_", argparse.SUPPRESS) if in_subcommand else ("", None)
    group = parser.add_argument_group("output")
    group.add_argument("-q", "--quiet", dest=prefix + "quiet", action="store_true", default=default or False,
                       help="print only the result (run: the artifact's path) and errors")
    group.add_argument("-v", "--verbose", dest=prefix + "verbose", action="count", default=default or 0,
                       help="more detail: -v optpipe's info, -vv its debug log and the libraries' warnings")
    group.add_argument("--debug", dest=prefix + "debug", action="store_true", default=default or False,
                       help="show tracebacks (implies -vv)")


class _SubcommandParser(argparse.ArgumentParser):
    """Every subcommand takes the output flags too (`optpipe run -q` as well as `optpipe -q run`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _output_flags(self, in_subcommand=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="optpipe", description=__doc__.split(":")[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"optpipe {__version__}")
    _output_flags(parser, in_subcommand=False)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_SubcommandParser)

    run = sub.add_parser("run", help="compile a model for a target into a validated ONNX artifact")
    run.set_defaults(handler=cmd_run)
    run.add_argument("model", nargs="?", default=None,
                     help="hub id or local directory (default: the bundled all-MiniLM-L6-v2)")
    run.add_argument("--target", "-t", default="cpu-int8", help="target name or path to a .toml (default cpu-int8)")
    run.add_argument("--output", "-o", help="artifact directory (default out/MODEL-TARGET)")
    run.add_argument("--task", help="task, when it cannot be inferred from the model's config")
    run.add_argument("--revision", help="hub model only: branch, tag or commit to download (the manifest records "
                                        "the commit it resolved to)")
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
    add_sweep_parsers(sub)
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Parsed arguments, with the output flags merged from before and after the subcommand."""
    args = build_parser().parse_args(argv)
    args.quiet = args.quiet or getattr(args, "sub_quiet", False)
    args.debug = args.debug or getattr(args, "sub_debug", False)
    args.verbose = args.verbose + getattr(args, "sub_verbose", 0)
    if args.debug:
        args.verbose = max(args.verbose, 2)
    return args


def runtime_problem() -> str | None:
    """None when ONNX Runtime imports; otherwise the one line that says which extra to install."""
    if importlib.util.find_spec("onnxruntime") is None:
        return f"ONNX Runtime is not installed: {RUNTIME_HINT}"
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        # e.g. one of the two wheels uninstalled over the other, which shares its files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"ONNX Runtime is installed but does not import ({first}); reinstall it: {RUNTIME_HINT}"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)  # a usage error exits here with argparse's code 2
    reporter = Reporter(quiet=args.quiet)
    args.progress = reporter
    problem = runtime_problem()
    if problem:
        print(f"optpipe: error: {problem}", file=sys.stderr, flush=True)
        return ProviderUnavailableError.exit_code
    with configured(args.verbose, args.quiet, reporter):
        try:
            return args.handler(args)
        except OptpipeError as exc:
            _fail(args, reporter, str(exc))
            return exc.exit_code
        except KeyboardInterrupt:
            _fail(args, reporter, "interrupted; nothing was published", prefix="optpipe: ")
            return EXIT_INTERRUPTED


def _fail(args: argparse.Namespace, reporter: Reporter, message: str, prefix: str = "optpipe: error: ") -> None:
    """The one line a user error prints; --debug puts the traceback above it (the exit code stays the table's)."""
    reporter.close()
    if args.debug:
        traceback.print_exc()
    print(f"{prefix}{message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
