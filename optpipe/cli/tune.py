"""`optpipe tune`: argument parsing and printing only; the search lives in optpipe.tune."""

from __future__ import annotations

import argparse


def cmd_tune(args: argparse.Namespace) -> int:
    from optpipe.cli.output import print_summary
    from optpipe.tune.search import format_table, tune

    result = tune(args.model, max_loss=args.max_loss, output=args.output, eval_file=args.eval, task=args.task,
                  calibration=args.calibration, seconds=args.seconds, threads=args.threads, score_all=not args.quick,
                  overwrite=args.overwrite, use_cache=not args.no_cache, progress=args.progress)
    if args.quiet:
        print(result.artifact.path)
        return 0
    print(f"\ncandidates (loss budget {result.max_loss}; latency relative to fp32, 95% interval; "
          f"loss: {result.artifact.manifest['tuning']['loss']})")
    for line in format_table(result.candidates):
        print(line)
    print_summary(result.artifact)
    return 0


def add_tune_parser(sub) -> None:
    """Add `optpipe tune` to the CLI's subparsers."""
    tune = sub.add_parser("tune", help="publish the fastest INT8 recipe whose loss stays within a budget")
    tune.set_defaults(handler=cmd_tune)
    tune.add_argument("model", nargs="?", default=None,
                      help="hub id or local directory (default: the bundled all-MiniLM-L6-v2)")
    tune.add_argument("--max-loss", type=float, default=0.01,
                      help="loss budget: 1 - mean cosine (or top-1 agreement) vs PyTorch, or with --eval the "
                           "relative accuracy drop (default 0.01)")
    tune.add_argument("--eval", metavar="FILE", help="labelled texts (.jsonl with 'text' and 'label') to score a "
                                                     "classifier's accuracy instead of fidelity")
    tune.add_argument("--calibration", help="calibration texts for static candidates (.txt, .jsonl, "
                                            ".csv; FILE.csv:COLUMN names the column)")
    tune.add_argument("--output", "-o", help="artifact directory (default out/MODEL-cpu-int8-tuned)")
    tune.add_argument("--task", help="task, when it cannot be inferred from the model's config")
    tune.add_argument("--seconds", type=float, default=30.0,
                      help="length of the interleaved timing run over all candidates (default 30)")
    tune.add_argument("--threads", type=int, default=None, help="intra-op threads for timing (default: ORT's)")
    tune.add_argument("--quick", action="store_true",
                      help="do not score the candidates slower than the winner (their loss stays blank)")
    tune.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    tune.add_argument("--no-cache", action="store_true", help="do not reuse or store pass outputs")
