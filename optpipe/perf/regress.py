"""Baseline files and the regression decision behind `optpipe check`.

A baseline records the figures of a reference artifact, the machine they were measured on, and the path and
sha256 of that artifact. When the reference is still at hand (same bytes), `check` times it interleaved with
the candidate in the same run: the only fair comparison on a noisy machine, and portable across machines.
Without it, the candidate is compared with the recorded figures, which is only meaningful on the same machine
class and cannot cancel drift between the two runs (said in the result).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from optpipe.version import __version__
from optpipe.artifact import Artifact, sha256_file
from optpipe.errors import BaselineError, InvalidOptionError
from optpipe.perf.harness import Measured, interleave, grid_workloads, machine_facts, open_artifact
from optpipe.perf.stats import RatioEstimate, bootstrap_medians, paired_distribution

FORMAT = 1
LEVEL = 0.95
# "a check failed" in the CLI's exit-code table, as for a failed validation (optpipe/cli/main.py)
REGRESSION_EXIT = 3


@dataclass(frozen=True)
class CheckResult:
    """The verdict: status ok | regression | updated, with the exit code the CLI returns."""

    status: str
    exit_code: int
    mode: str  # "interleaved" (reference timed in this run) | "recorded" (against the baseline's figures)
    tolerance: float
    ratio: RatioEstimate | None
    probability: float | None  # bootstrap probability that the slowdown exceeds the tolerance
    candidate_ms: float
    reference_ms: float | None
    message: str
    notes: tuple[str, ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)

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


def _measure_alone(model: Measured, batch: int, seq: int, seconds: float) -> tuple[str, np.ndarray]:
    work = grid_workloads([model], batch, seq)[0][0]
    return work.name, interleave([model], [work], 5, None, seconds, np.random.default_rng(0))[0]


def record_baseline(artifact_dir: str | Path, baseline: str | Path, *, batch: int = 1, seq: int = 128,
                    threads: int | None = None, seconds: float = 20.0, measured: Measured | None = None) -> dict:
    """Measure the artifact and write it as the baseline's reference (path relative to the baseline file)."""
    baseline = Path(baseline)
    model = measured or open_artifact(artifact_dir, threads)
    workload, times = _measure_alone(model, batch, seq, seconds)
    ms = times * 1e3
    data = {
        "format": FORMAT, "optpipe_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_facts(threads),
        "settings": {"batch": batch, "seq": seq, "threads": threads, "seconds": seconds, "workload": workload},
        "reference": {"path": os.path.relpath(Path(artifact_dir).resolve(), baseline.resolve().parent),
                      "sha256": fingerprint(artifact_dir), "target": model.target},
        "figures": {"p50_ms": round(float(np.median(ms)), 4), "p90_ms": round(float(np.percentile(ms, 90)), 4),
                    "p99_ms": round(float(np.percentile(ms, 99)), 4),
                    "sequences_per_s": round(batch * 1e3 / float(np.median(ms)), 2), "runs": len(ms)},
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
          seconds: float | None = None, threads: int | None = None,
          progress: Callable[[str], None] | None = None) -> CheckResult:
    """Is `artifact` slower than the baseline by more than `tolerance`? Regression only when the whole 95%
    interval of the latency ratio lies beyond 1 + tolerance. Raises BaselineError (exit 1) when it cannot judge."""
    baseline = Path(baseline)
    say = progress or (lambda _: None)
    if update:
        return _update(artifact, baseline, tolerance, seconds, threads)
    data = load_baseline(baseline)
    settings = data["settings"]
    threads = threads if threads is not None else settings.get("threads")
    batch, seq = settings["batch"], settings["seq"]
    seconds = seconds or settings.get("seconds", 20.0)
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
    run = {"batch": batch, "seq": seq, "threads": threads, "seconds": seconds}
    if reference is not None:
        say(f"timing {artifact} interleaved with the reference {reference} ({seconds:g}s) ...")
        ref_model = open_artifact(reference, threads)
        works = grid_workloads([ref_model, candidate], batch, seq)
        work = [works[0][0], next((w for w in works[1] if w.name == works[0][0].name), works[1][0])]
        ref_t, cand_t = interleave([ref_model, candidate], work, 5, None, seconds, np.random.default_rng(0),
                                   progress, "interleaved rounds")
        estimate, samples = paired_distribution(ref_t, cand_t)
        mode, ref_ms = "interleaved", float(np.median(ref_t) * 1e3)
    else:
        notes.append(f"{why_not}: compared with the recorded figures, which cannot cancel drift between runs")
        if not same_machine:
            raise BaselineError(f"cannot judge: {why_not}, and the baseline was recorded on another machine class "
                                f"({notes[0]}); keep the reference artifact at hand or re-record with --update")
        say(f"timing {artifact} against the recorded figures ({seconds:g}s) ...")
        _, cand_t = _measure_alone(candidate, batch, seq, seconds)
        ref_ms = float(data["figures"]["p50_ms"])
        logs = np.log(cand_t * 1e3 / ref_ms)
        estimate, samples = float(np.exp(np.median(logs))), np.exp(bootstrap_medians(logs))
        mode = "recorded"
    ratio, probability, status, code, message = _verdict(estimate, samples, len(cand_t), tolerance)
    cand_ms = float(np.median(cand_t) * 1e3)
    return CheckResult(status, code, mode, tolerance, ratio, round(probability, 4), round(cand_ms, 4),
                       round(ref_ms, 4), message, tuple(notes), run)


def _update(artifact: str | Path, baseline: Path, tolerance: float, seconds: float | None,
            threads: int | None) -> CheckResult:
    """`check --update`: re-record the baseline with the settings it had (or the defaults)."""
    settings = load_baseline(baseline).get("settings", {}) if baseline.is_file() else {}
    threads = threads if threads is not None else settings.get("threads")
    data = record_baseline(artifact, baseline, batch=settings.get("batch", 1), seq=settings.get("seq", 128),
                           threads=threads, seconds=seconds or settings.get("seconds", 20.0))
    fig = data["figures"]
    return CheckResult("updated", 0, "recorded", tolerance, None, None, fig["p50_ms"], None,
                       f"baseline {baseline} updated: reference {data['reference']['path']}, "
                       f"p50 {fig['p50_ms']:.3f} ms", settings=data["settings"])


def _verdict(estimate: float, samples: np.ndarray, rounds: int, tolerance: float):
    """(ratio with its interval, P(slowdown > tolerance), status, exit code, message): a regression only when the
    whole interval lies above 1 + tolerance."""
    limit = 1.0 + tolerance
    tail = (1 - LEVEL) / 2 * 100
    low, high = (float(v) for v in np.percentile(samples, [tail, 100 - tail]))
    ratio = RatioEstimate(round(estimate, 5), round(low, 5), round(high, 5), rounds, LEVEL)
    probability = float(np.mean(samples > limit))
    interval = f"{ratio.ratio:.3f} [{ratio.low:.3f}, {ratio.high:.3f}]"
    if ratio.low > limit:
        status, code = "regression", REGRESSION_EXIT
        message = (f"REGRESSION: {(ratio.ratio - 1) * 100:+.1f}% latency, ratio {interval} lies wholly above "
                   f"the {tolerance:.1%} tolerance (probability {probability:.1%} that the slowdown exceeds it)")
    elif ratio.high > limit:
        status, code = "ok", 0
        message = (f"ok, inconclusive: ratio {interval} straddles the {tolerance:.1%} tolerance (probability "
                   f"{probability:.1%} that the slowdown exceeds it); not flagged, run longer to decide")
    else:
        status, code = "ok", 0
        message = (f"ok: no regression beyond {tolerance:.1%}: ratio {interval} (probability "
                   f"{probability:.1%} that the slowdown exceeds it)")
    return ratio, probability, status, code, message


def markdown(result: CheckResult, artifact: str, baseline: str) -> str:
    """A Markdown summary for CI logs (e.g. $GITHUB_STEP_SUMMARY)."""
    r = result.ratio
    ratio = f"{r.ratio:.3f} [{r.low:.3f}, {r.high:.3f}]" if r else "-"
    ref = f"{result.reference_ms:.3f}" if result.reference_ms is not None else "-"
    prob = f"{result.probability:.1%}" if result.probability is not None else "-"
    lines = [f"### optpipe check: {result.status}", "",
             "| artifact | baseline | mode | reference p50 ms | candidate p50 ms | ratio [95% CI] | tolerance "
             "| P(slowdown > tolerance) |", "| --- | --- | --- | --- | --- | --- | --- | --- |",
             f"| {artifact} | {baseline} | {result.mode} | {ref} | {result.candidate_ms:.3f} | {ratio} | "
             f"{result.tolerance:.1%} | {prob} |", "", result.message]
    lines += [f"- {note}" for note in result.notes]
    return "\n".join(lines) + "\n"
