"""Baseline files and the regression decision behind `optpipe check`.

A baseline records the figures of a reference artifact, the machine they were measured on, and the path and
sha256 of that artifact. When the reference is still at hand (same bytes), `check` times it interleaved with
the candidate in the same run: the only fair comparison on a noisy machine, and portable across machines.
Without it, the candidate is compared with the recorded figures, which is only meaningful on the same machine
class and cannot cancel drift between the two runs (said in the result).

What is timed (`measure`): wall clock, or with exactly one intra-op thread on the CPU provider, the calling
thread's CPU time (harness.CLOCKS), which leaves out the time the thread sat preempted on a busy runner. How long:
rounds run until the verdict is clear or the time budget ends (the sequential rule below), so a clear case
stops early and a noisy one says "inconclusive" instead of passing silently as "ok". The statistics of that
decision (intervals, the verdict, the sequential rule) are in verdict.py.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from optpipe.version import __version__
from optpipe.artifact import Artifact, sha256_file
from optpipe.errors import BaselineError, InvalidOptionError
from optpipe.perf.harness import Measured, interleave, grid_workloads, machine_facts, open_artifact
from optpipe.perf.inputs import pick_workload
from optpipe.perf.stats import RatioEstimate
from optpipe.perf.verdict import (EPOCH_SECONDS, MIN_EPOCHS, Epochs, Looks, ratio_distribution, t_distribution,
                                   verdict)

FORMAT = 1
MEASURES = ("auto", "wall", "cpu")


@dataclass(frozen=True)
class CheckResult:
    """The verdict: status ok | regression | inconclusive | updated, with the exit code the CLI returns."""

    status: str
    exit_code: int
    mode: str  # "interleaved" (reference timed in this run) | "recorded" (against the baseline's figures)
    tolerance: float
    ratio: RatioEstimate | None
    probability: float | None  # bootstrap probability that the slowdown exceeds the tolerance
    candidate_ms: float  # median, on `measure`'s clock
    reference_ms: float | None
    message: str
    notes: tuple[str, ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)
    measure: str = "wall"  # what was timed: "wall" (perf_counter) | "cpu" (the calling thread's CPU time)
    workload: str = ""  # forward | prefill | decode | encoder (optpipe.perf.inputs)
    rounds: int = 0  # interleaved rounds (recorded mode: runs of the candidate)
    seconds: float = 0.0  # wall seconds the timing took, warm-up and interim looks included
    budget_s: float = 0.0  # the most it could have taken (--seconds)
    stopped_early: bool = False  # the verdict was clear before the budget ended
    looks: int = 0  # interim looks at the data
    noise_sd: float | None = None  # standard deviation of the per-round log ratio (~ relative noise of one pair)
    halfwidth: float | None = None  # half the width of the 95% interval of the ratio
    epochs: int = 0  # interleaved mode: session pairs opened afresh, each timed EPOCH_SECONDS (one estimate each)
    epoch_sd: float | None = None  # standard deviation of the epochs' log-ratio estimates (session effect + noise)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def fingerprint(artifact_dir: str | Path) -> str:
    """sha256 over the ONNX components' own sha256 (what is timed), independent of the manifest."""
    artifact = Artifact.load(artifact_dir)
    digest = hashlib.sha256()
    for component in artifact.components:
        digest.update(f"{component.name}:{sha256_file(component)}\n".encode())
    return digest.hexdigest()


def parse_tolerance(text: str | float) -> float:
    """'5%' or '0.05' -> 0.05."""
    raw = str(text).strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise InvalidOptionError(f"--tolerance {text!r}: give a percentage like 5% or a fraction like 0.05") from None
    if not 0 <= value < 1:
        raise InvalidOptionError(f"--tolerance {text!r} must be between 0% and 100%")
    return value


def load_baseline(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise BaselineError(f"baseline {path} does not exist; record one with: optpipe check ARTIFACT "
                            f"--baseline {path} --update")
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT or "figures" not in data or "machine" not in data:
            raise ValueError("not an optpipe baseline")
    except (OSError, ValueError, AttributeError) as exc:
        raise BaselineError(f"baseline {path} is unreadable ({exc}); re-record it with --update") from exc
    return data


def machine_class(facts: dict[str, Any]) -> tuple:
    """Timings compare only on the same CPU model, core count and thread setting."""
    return facts.get("cpu"), facts.get("cores"), facts.get("threads")


def resolve_measure(measure: str | None, threads: int | None,
                    providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> tuple[str, str | None]:
    """The clock to time on ("wall" | "cpu") for the `measure` asked (auto | wall | cpu; None = auto), and why it
    differs from what was asked. CPU time counts the work only when ONNX Runtime computes on the calling thread:
    the CPU provider with exactly one intra-op thread. `auto` is "cpu" there and "wall" elsewhere."""
    measure = measure or "auto"
    if measure not in MEASURES:
        raise InvalidOptionError(f"--measure {measure!r}: one of {', '.join(MEASURES)}")
    if measure == "wall":
        return "wall", None
    on_cpu = bool(providers) and providers[0] == "CPUExecutionProvider"
    if threads == 1 and on_cpu:
        return "cpu", None
    if measure == "auto":
        return "wall", None
    why = (f"threads {threads}" if threads else "threads unset (ONNX Runtime's default pool)") if on_cpu else \
        f"provider {providers[0] if providers else '?'}"
    return "wall", (f"measure cpu needs the CPU provider with exactly 1 intra-op thread (ONNX Runtime then computes "
                    f"on the calling thread); {why}: timed on the wall clock instead")


def _measure_alone(model: Measured, batch: int, seq: int, seconds: float, clock: str = "wall",
                   workload: str | None = None, stop: Callable | None = None,
                   progress: Callable | None = None) -> tuple[str, np.ndarray]:
    work = pick_workload(grid_workloads([model], batch, seq)[0], workload)
    return work.name, interleave([model], [work], 5, None, seconds, np.random.default_rng(0), progress,
                                 "rounds", clock, stop)[0]


def record_baseline(artifact_dir: str | Path, baseline: str | Path, *, batch: int = 1, seq: int = 128,
                    threads: int | None = None, seconds: float = 20.0, measured: Measured | None = None,
                    measure: str | None = None, workload: str | None = None) -> dict:
    """Measure the artifact and write it as the baseline's reference (path relative to the baseline file).
    settings.measure keeps what was asked (the default of later checks); figures.measure the clock used."""
    baseline = Path(baseline)
    model = measured or open_artifact(artifact_dir, threads)
    clock, _ = resolve_measure(measure, threads, model.providers)
    workload, times = _measure_alone(model, batch, seq, seconds, clock, workload)
    ms = times * 1e3
    data = {
        "format": FORMAT, "optpipe_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_facts(threads),
        "settings": {"batch": batch, "seq": seq, "threads": threads, "seconds": seconds, "workload": workload,
                     "measure": measure or "auto"},
        "reference": {"path": os.path.relpath(Path(artifact_dir).resolve(), baseline.resolve().parent),
                      "sha256": fingerprint(artifact_dir), "target": model.target},
        "figures": {"p50_ms": round(float(np.median(ms)), 4), "p90_ms": round(float(np.percentile(ms, 90)), 4),
                    "p99_ms": round(float(np.percentile(ms, 99)), 4),
                    "sequences_per_s": round(batch * 1e3 / float(np.median(ms)), 2), "runs": len(ms),
                    "measure": clock},
    }
    baseline.parent.mkdir(parents=True, exist_ok=True)
    tmp = baseline.with_name(f".{baseline.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(baseline)
    return data


def _reference_at_hand(data: dict[str, Any], baseline: Path) -> tuple[Path | None, str | None]:
    """The reference artifact when it exists with the recorded bytes; otherwise why it cannot be used."""
    ref = data.get("reference") or {}
    if not ref.get("path"):
        return None, "the baseline names no reference artifact"
    path = Path(ref["path"])
    path = path if path.is_absolute() else (baseline.resolve().parent / path)
    if not (path / "manifest.json").is_file():
        return None, f"the reference artifact {path} is not here"
    try:
        if fingerprint(path) != ref.get("sha256"):
            return None, f"the reference artifact {path} changed since the baseline was recorded"
    except Exception as exc:  # a corrupt reference is reported, and the recorded figures are used instead
        return None, f"the reference artifact {path} is unreadable ({exc})"
    return path, None


def check(artifact: str | Path, baseline: str | Path, *, tolerance: float = 0.05, update: bool = False,
          seconds: float | None = None, threads: int | None = None, measure: str | None = None,
          workload: str | None = None, fail_inconclusive: bool = False,
          progress: Callable[[str], None] | None = None) -> CheckResult:
    """Is `artifact` slower than the baseline by more than `tolerance`? Regression only when the whole 95%
    interval of the latency ratio lies beyond 1 + tolerance; ok when it lies wholly below; inconclusive when it
    straddles the limit at the end of the budget (exit 0, or 3 with `fail_inconclusive`). `seconds` is the budget:
    a clear verdict stops earlier. `measure` (auto | wall | cpu), `threads`, `seconds` and `workload` default to
    the baseline's settings. Raises BaselineError (exit 1) when it cannot judge."""
    baseline = Path(baseline)
    say = progress or (lambda _: None)
    if update:
        return _update(artifact, baseline, tolerance, seconds, threads, measure, workload)
    data = load_baseline(baseline)
    settings = data["settings"]
    threads = threads if threads is not None else settings.get("threads")
    batch, seq = settings["batch"], settings["seq"]
    seconds = seconds or settings.get("seconds", 20.0)
    asked = measure or settings.get("measure") or "auto"
    workload = workload or settings.get("workload")
    here = machine_facts(threads)
    notes = []
    same_machine = machine_class(here) == machine_class(data["machine"])
    if not same_machine:
        notes.append(f"baseline machine: {data['machine'].get('cpu')} ({data['machine'].get('cores')} cores, "
                     f"threads {data['machine'].get('threads')}); here: {here['cpu']} ({here['cores']} cores, "
                     f"threads {threads})")
    if here["onnxruntime"] != data["machine"].get("onnxruntime"):
        notes.append(f"onnxruntime {data['machine'].get('onnxruntime')} at recording, {here['onnxruntime']} now")
    reference, why_not = _reference_at_hand(data, baseline)
    candidate = open_artifact(artifact, threads)  # ArtifactError (exit 1) / ProviderUnavailableError (exit 4) first
    clock, fallback = resolve_measure(asked, threads, candidate.providers)
    if fallback:
        notes.append(fallback)
    if reference is not None:
        say(f"timing {artifact} interleaved with the reference {reference} ({clock} clock, fresh sessions every "
            f"{EPOCH_SECONDS:g}s, up to {seconds:g}s) ...")
        del candidate
        started = time.perf_counter()
        epochs = _epochs(Path(reference), Path(artifact), threads, batch, seq, workload, seconds, clock, tolerance)
        ref_t, cand_t, logs = epochs.ref_t, epochs.cand_t, epochs.logs
        mode, ref_ms, name, looks = "interleaved", float(np.median(ref_t) * 1e3), epochs.workload, epochs
    else:
        notes.append(f"{why_not}: compared with the recorded figures, which cannot cancel drift between runs")
        if not same_machine:
            raise BaselineError(f"cannot judge: {why_not}, and the baseline was recorded on another machine class "
                                f"({notes[0]}); keep the reference artifact at hand or re-record with --update")
        if workload and settings.get("workload") and workload != settings["workload"]:
            raise BaselineError(f"cannot judge: {why_not}, and the recorded figures are of the "
                                f"{settings['workload']} workload, not {workload}; keep the reference artifact at "
                                f"hand or re-record with --update --workload {workload}")
        recorded = data["figures"].get("measure", "wall")  # baselines before the measure setting: wall clock
        if clock != recorded:
            notes.append(f"the recorded figures are {recorded} time; timed on that clock to compare like with like "
                         f"(not {clock})")
            clock = recorded
        say(f"timing {artifact} against the recorded figures ({clock} clock, up to {seconds:g}s) ...")
        ref_ms = float(data["figures"]["p50_ms"])
        looks = Looks(lambda t: np.log(np.asarray(t[0]) * 1e3 / ref_ms), tolerance)
        started = time.perf_counter()
        name, cand_t = _measure_alone(candidate, batch, seq, seconds, clock, workload, looks, progress)
        logs = np.log(cand_t * 1e3 / ref_ms)
        mode = "recorded"
    spent = time.perf_counter() - started
    estimate, samples = ratio_distribution(logs) if mode == "recorded" else t_distribution(looks.estimates)
    ratio, probability, status, code, message = verdict(estimate, samples, len(logs), tolerance, fail_inconclusive,
                                                          seconds)
    if looks.stopped:
        message += f" (clear after {spent:.1f}s of the {seconds:g}s budget)"
    cand_ms = float(np.median(cand_t) * 1e3)
    run = {"batch": batch, "seq": seq, "threads": threads, "seconds": seconds, "measure": asked, "workload": name}
    return CheckResult(status, code, mode, tolerance, ratio, round(probability, 4), round(cand_ms, 4),
                       round(ref_ms, 4), message, tuple(notes), run, clock, name, len(logs), round(spent, 2),
                       float(seconds), looks.stopped, looks.looks,
                       round(float(np.std(logs, ddof=1)), 5), round((ratio.high - ratio.low) / 2, 5),
                       len(looks.estimates) if mode == "interleaved" else 0,
                       round(float(np.std(looks.estimates, ddof=1)), 5) if mode == "interleaved" and len(
                           looks.estimates) > 1 else None)


def _epochs(reference: Path, artifact: Path, threads: int | None, batch: int, seq: int, workload: str | None,
            seconds: float, clock: str, tolerance: float) -> Epochs:
    rng = np.random.default_rng(0)
    state = Epochs(tolerance)
    deadline = time.perf_counter() + seconds
    epoch = min(EPOCH_SECONDS, seconds / (2 * MIN_EPOCHS))  # a short budget still gets several session pairs
    while True:
        if rng.random() < 0.5:  # which opens first (its memory placement) is random too
            models = [open_artifact(reference, threads), open_artifact(artifact, threads)]
        else:
            models = list(reversed([open_artifact(artifact, threads), open_artifact(reference, threads)]))
        works = grid_workloads(models, batch, seq)
        work = [pick_workload(works[0], workload)]
        work.append(next((w for w in works[1] if w.name == work[0].name), works[1][0]))
        state.workload = work[1].name
        left = deadline - time.perf_counter()
        ref_t, cand_t = interleave(models, work, 3, None, max(0.02, min(epoch, left)), rng, None, "rounds",
                                   clock)
        del models, works, work
        state.ref += ref_t.tolist()
        state.cand += cand_t.tolist()
        state.estimates.append(float(np.median(np.log(cand_t) - np.log(ref_t))))
        if state.clear() or time.perf_counter() >= deadline:
            return state


def _update(artifact: str | Path, baseline: Path, tolerance: float, seconds: float | None,
            threads: int | None, measure: str | None, workload: str | None) -> CheckResult:
    """`check --update`: re-record the baseline with the settings it had (or the defaults)."""
    settings = load_baseline(baseline).get("settings", {}) if baseline.is_file() else {}
    threads = threads if threads is not None else settings.get("threads")
    measure = measure or settings.get("measure") or "auto"
    model = open_artifact(artifact, threads)
    clock, fallback = resolve_measure(measure, threads, model.providers)
    data = record_baseline(artifact, baseline, batch=settings.get("batch", 1), seq=settings.get("seq", 128),
                           threads=threads, seconds=seconds or settings.get("seconds", 20.0), measured=model,
                           measure=measure, workload=workload or settings.get("workload"))
    fig = data["figures"]
    return CheckResult("updated", 0, "recorded", tolerance, None, None, fig["p50_ms"], None,
                       f"baseline {baseline} updated: reference {data['reference']['path']}, "
                       f"{data['settings']['workload']} p50 {fig['p50_ms']:.3f} ms ({clock} clock)",
                       (fallback,) if fallback else (), data["settings"], clock, data["settings"]["workload"],
                       fig["runs"], budget_s=float(data["settings"]["seconds"]))


_CLOCK_NAMES = {"wall": "wall clock", "cpu": "CPU time of the calling thread"}


def markdown(result: CheckResult, artifact: str, baseline: str) -> str:
    """A Markdown summary for CI logs (e.g. $GITHUB_STEP_SUMMARY)."""
    r = result.ratio
    ratio = f"{r.ratio:.3f} [{r.low:.3f}, {r.high:.3f}]" if r else "-"
    ref = f"{result.reference_ms:.3f}" if result.reference_ms is not None else "-"
    prob = f"{result.probability:.1%}" if result.probability is not None else "-"
    lines = [f"### optpipe check: {result.status}", "",
             "| artifact | baseline | mode | measure | reference p50 ms | candidate p50 ms | ratio [95% CI] | "
             "tolerance | P(slowdown > tolerance) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
             f"| {artifact} | {baseline} | {result.mode} | {result.measure} | {ref} | {result.candidate_ms:.3f} | "
             f"{ratio} | {result.tolerance:.1%} | {prob} |", "", result.message]
    if r is not None:
        stop = "stopped early: the verdict was clear" if result.stopped_early else "ran the whole budget"
        noise = (f"per-round log-ratio sd {result.noise_sd:.3f}, interval ±{result.halfwidth:.2%}"
                 if result.noise_sd is not None and result.halfwidth is not None else "-")
        lines += ["", f"- timing: {_CLOCK_NAMES.get(result.measure, result.measure)}, {result.workload or '?'} "
                      f"workload, {result.rounds} rounds in {result.seconds:.1f}s of a {result.budget_s:g}s budget "
                      f"({stop}, {result.looks} interim looks)", f"- noise: {noise}"]
        if result.epochs:
            sd = f", sd {result.epoch_sd:.2%} between them" if result.epoch_sd is not None else ""
            lines.append(f"- sessions: {result.epochs} fresh session pairs (one estimate each{sd}); the interval "
                         "is Student-t over them, so it includes how much two sessions of one file differ")
        if result.workload == "decode" and result.candidate_ms > 0:  # one new token per sequence per step
            batch = result.settings.get("batch", 1)
            ref = f", reference {batch * 1e3 / result.reference_ms:.1f}" if result.reference_ms else ""
            lines.append(f"- decode: candidate {batch * 1e3 / result.candidate_ms:.1f} tokens/s on this clock{ref} "
                         f"(the latency ratio is the inverse of the tokens/s ratio)")
    lines += [f"- {note}" for note in result.notes]
    return "\n".join(lines) + "\n"
