"""`optpipe bench`, `optpipe compare`, `optpipe check`: argument parsing and printing only."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from optpipe.artifact import check_output_file, write_output_file
from optpipe.errors import InvalidOptionError


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InvalidOptionError(f"{text!r} is not a comma-separated list of whole numbers (e.g. 1,8)") from None
    if not values or any(v < 1 for v in values):
        raise InvalidOptionError(f"{text!r}: give whole numbers >= 1 (e.g. 1,8)")
    return values


def _number(kind: type, least: float, strict: bool):
    """An argparse type: a number of `kind` above `least` (or at least it), with a one-line error otherwise."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole ' if kind is int else ''}number") from None
        if value < least or (strict and value == least):
            raise argparse.ArgumentTypeError(f"{text} must be {'>' if strict else '>='} {least:g}")
        return value
    return parse


SECONDS, COUNT, AT_LEAST_0 = _number(float, 0, strict=True), _number(int, 1, strict=False), _number(int, 0, False)


def _ratio(r) -> str:
    return f"{r.ratio:.3f} [{r.low:.3f}, {r.high:.3f}]" if r else "-"


def _short(path: str) -> str:
    return Path(path).name or path


def cmd_bench(args: argparse.Namespace) -> int:
    from optpipe.perf.harness import bench
    from optpipe.perf.inputs import parse_seqs

    if args.json:
        check_output_file(args.json, "--json")
    result = bench(args.artifacts, _ints(args.batch), parse_seqs(args.seq), threads=args.threads, warmup=args.warmup,
                   runs=args.runs, seconds=args.seconds, progress=args.progress, new_tokens=args.new_tokens,
                   spinning=args.spinning)
    print(f"\ninterleaved, spinning {args.spinning}, threads {args.threads or 'ORT default'}; ratio = latency / "
          f"{_short(args.artifacts[0])}'s, 95% interval")
    print(f"{'artifact':<28} {'provider':<10} {'workload':<12} {'bs':>3} {'seq':>4} {'runs':>5} {'p50 ms':>9} "
          f"{'p90 ms':>9} {'p99 ms':>9} {'seq/s':>9} {'mem MB':>7}  ratio")
    for r in result.rows:
        provider = r.providers[0].replace("ExecutionProvider", "") if r.providers else "?"
        workload = f"{r.workload}/{r.label}" if r.label else r.workload  # forward/real: real sentence lengths
        print(f"{_short(r.artifact)[:28]:<28} {provider:<10} {workload:<12} {r.batch:>3} {r.seq:>4} {r.runs:>5} "
              f"{r.p50_ms:>9.3f} {r.p90_ms:>9.3f} {r.p99_ms:>9.3f} {r.sequences_per_s:>9.1f} {r.memory_mb:>7.1f}  "
              f"{_ratio(r.ratio)}")
    if args.json:
        write_output_file(args.json, json.dumps(result.to_json(), indent=2, default=str) + "\n", "--json")
        args.progress(f"wrote {args.json}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from optpipe import compare
    from optpipe.perf.inputs import seq_name, seq_value

    ratio = compare(args.a, args.b, batch=args.batch, seq=seq_value(args.seq), threads=args.threads,
                    seconds=args.seconds, progress=args.progress, spinning=args.spinning, workload=args.workload)
    verdict = ratio.verdict()
    change = f"{abs(1 - ratio.ratio):.1%} " + ("slower" if ratio.ratio > 1 else "faster")
    print(f"{_short(args.b)} / {_short(args.a)} {ratio.workload} latency (bs {args.batch}, seq {seq_name(args.seq)}, "
          f"threads {args.threads or 'ORT default'}, spinning {args.spinning}, {ratio.rounds} interleaved rounds): "
          f"{_ratio(ratio)} (95% interval)")
    if verdict == "no difference detected at this noise":
        print(f"verdict: no difference detected at this noise ({change} measured, interval includes 1.0)")
    else:
        print(f"verdict: {_short(args.b)} is {verdict}: {change} (interval excludes 1.0)")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from optpipe import check
    from optpipe.perf.regress import markdown, parse_tolerance

    for option, path in (("--json", args.json), ("--markdown", args.markdown)):
        if path:
            check_output_file(path, option)
    result = check(args.artifact, args.baseline, tolerance=parse_tolerance(args.tolerance), update=args.update,
                   seconds=args.seconds, threads=args.threads, measure=args.measure, workload=args.workload,
                   fail_inconclusive=args.fail_inconclusive, progress=args.progress)
    if result.status != "updated":
        print(markdown(result, args.artifact, args.baseline).replace("### ", "").rstrip())
    else:
        print(result.message)
    if args.json:
        write_output_file(args.json, json.dumps(result.to_json(), indent=2, default=str) + "\n", "--json")
    if args.markdown:
        write_output_file(args.markdown, markdown(result, args.artifact, args.baseline), "--markdown")
    return result.exit_code


def _spinning_argument(parser) -> None:
    from optpipe.session import SPINNING

    parser.add_argument("--spinning", choices=SPINNING, default="off",
                        help="how idle ONNX Runtime threads wait: off = sleep at once (default; no session disturbs "
                             "another); parked = spin during each run, as a deployed session does, and sleep when it "
                             "returns; on = ONNX Runtime's default, which lets idle sessions steal cores")


def add_harness_parsers(sub) -> None:
    """Add bench, compare and check to the CLI's subparsers."""
    bench = sub.add_parser("bench", help="latency of artifacts (interleaved): p50/p90/p99, throughput, ratios")
    bench.set_defaults(handler=cmd_bench)
    bench.add_argument("artifacts", nargs="+", metavar="ARTIFACT")
    bench.add_argument("--batch", default="1", help="batch sizes, comma-separated (default 1)")
    bench.add_argument("--seq", default="128", help="sequence lengths, comma-separated; 'real': held-out sentences "
                       "at their own token lengths, padded to the batch's longest (default 128)")
    bench.add_argument("--threads", type=COUNT, help="intra-op threads per session (default: ONNX Runtime's)")
    bench.add_argument("--warmup", type=AT_LEAST_0, default=5, help="warm-up runs per artifact and shape (default 5)")
    budget = bench.add_mutually_exclusive_group()
    budget.add_argument("--runs", type=COUNT, help="interleaved rounds per shape")
    budget.add_argument("--seconds", type=SECONDS, default=5.0, help="time budget per shape (default 5)")
    bench.add_argument("--new-tokens", type=AT_LEAST_0, default=0, metavar="N",
                       help="decoders: also time N greedy tokens after the prompt ('generate': ms per new token, "
                       "seq/s = tokens/s); prefill is time to first token (default 0: off)")
    bench.add_argument("--json", metavar="FILE", help="write all figures as JSON")
    _spinning_argument(bench)

    compare = sub.add_parser("compare", help="latency ratio B/A, interleaved, with a 95%% interval and a verdict")
    compare.set_defaults(handler=cmd_compare)
    compare.add_argument("a", metavar="A")
    compare.add_argument("b", metavar="B")
    compare.add_argument("--batch", type=COUNT, default=1)
    compare.add_argument("--seq", default="128", help="sequence length, or 'real' (default 128)")
    compare.add_argument("--threads", type=COUNT)
    compare.add_argument("--seconds", type=SECONDS, default=10.0, help="length of the interleaved run (default 10)")
    compare.add_argument("--workload", choices=("forward", "prefill", "decode", "encoder"),
                         help="which workload to time (default: forward; decoders: decode, one token against the KV "
                              "cache)")
    _spinning_argument(compare)

    check = sub.add_parser("check", help="CI gate: exit 3 on a latency regression beyond the tolerance")
    check.set_defaults(handler=cmd_check)
    check.add_argument("artifact", metavar="ARTIFACT")
    check.add_argument("--baseline", required=True, metavar="FILE", help="baseline JSON (written by --update)")
    check.add_argument("--tolerance", default="5%", help="slowdown allowed before failing (default 5%%)")
    check.add_argument("--update", action="store_true", help="record ARTIFACT as the new baseline and exit 0")
    check.add_argument("--seconds", type=SECONDS, help="time budget of the timing run; a clear verdict stops "
                                                      "earlier (default: the baseline's, 20)")
    check.add_argument("--threads", type=COUNT, help="intra-op threads (default: the baseline's)")
    check.add_argument("--measure", choices=("auto", "wall", "cpu"),
                       help="what to time: wall clock, or the calling thread's CPU time (only with --threads 1 on "
                            "the CPU provider; it leaves out preemption on a busy runner); auto = cpu there, else "
                            "wall (default: the baseline's, auto)")
    check.add_argument("--workload", choices=("forward", "prefill", "decode", "encoder"),
                       help="which workload to gate (decoders: prefill or decode; default: the baseline's; "
                            "on --update, decode for decoders, else the artifact's first)")
    check.add_argument("--fail-inconclusive", action="store_true",
                       help="exit 3 when the noise is too high to judge within the budget (default: exit 0)")
    check.add_argument("--json", metavar="FILE", help="write the verdict as JSON")
    check.add_argument("--markdown", metavar="FILE", help="write a Markdown summary (e.g. $GITHUB_STEP_SUMMARY)")
