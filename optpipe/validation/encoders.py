"""Fidelity of an ONNX artifact against the original PyTorch model, per task, on built-in varied texts."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from optpipe.errors import UnsupportedModelError
from optpipe.validation.graph_checks import check_graph, cpu_run_errors
from optpipe.passbase import ModelFiles
from optpipe.passbase import track
from optpipe.session import create_session, provider_works
from optpipe.source import load_tokenizer, model_inputs, ModelSource
from optpipe.data.texts import validation_texts
from optpipe.validation.generation import text2text_generation, text_generation

log = logging.getLogger("optpipe.validation.encoders")

BATCH = 8
MAX_LENGTH = 128


@dataclass(frozen=True)
class ValidationResult:
    task: str
    metrics: dict[str, float]
    thresholds: dict[str, float]
    failures: tuple[str, ...] = ()
    deferred: str | None = None
    provider: str = "CPUExecutionProvider"
    texts: int = 0
    checks: dict[str, Any] = field(default_factory=dict)  # graph facts per component (graph_checks)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_json(self) -> dict[str, Any]:
        return {"task": self.task, "metrics": self.metrics, "thresholds": self.thresholds,
                "passed": self.passed, "failures": list(self.failures), "deferred": self.deferred,
                "provider": self.provider, "texts": self.texts, "checks": self.checks}


@dataclass(frozen=True)
class Runner:
    """What a per-task validator gets: the reference model dir, the ONNX files and a session factory."""

    source: ModelSource
    files: ModelFiles
    session: Callable[[Path], Any]
    texts: tuple[str, ...]
    extra: dict[str, Any] = field(default_factory=dict)
    progress: Callable[[Any], None] | None = None  # gets Ticks over the texts (passbase.track)


def _batches(texts: tuple[str, ...], size: int = BATCH):
    for start in range(0, len(texts), size):
        yield list(texts[start:start + size])


def _feed(session, encoded: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    feed = {}
    for spec in session.get_inputs():
        if spec.name in encoded:
            feed[spec.name] = encoded[spec.name].astype(np.int64)
        elif spec.name == "token_type_ids":
            feed[spec.name] = np.zeros_like(encoded["input_ids"], dtype=np.int64)
        else:
            raise UnsupportedModelError(f"validation cannot feed the graph input {spec.name!r}")
    return feed


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)


def feature_extraction(run: Runner) -> dict[str, float]:
    import torch
    from transformers import AutoModel

    tokenizer = load_tokenizer(run.source.path)
    model = AutoModel.from_pretrained(run.source.path).eval()
    session = run.session(run.files.path / run.files.components[0])
    cosines, max_diff = [], 0.0
    for batch in track(list(_batches(run.texts)), "validating", run.progress, unit="batch"):
        enc = tokenizer(batch, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="np")
        with torch.no_grad():
            ref = model(**model_inputs(model, enc)).last_hidden_state.numpy()
        out = session.run(None, _feed(session, enc))[0]
        mask = enc["attention_mask"][..., None].astype(np.float32)
        pooled_ref = (ref * mask).sum(1) / mask.sum(1)
        pooled_out = (out * mask).sum(1) / mask.sum(1)
        cosines.extend(_cosine(pooled_ref, pooled_out).tolist())
        max_diff = max(max_diff, float(np.abs((ref - out) * mask).max()))
    return {"mean_cosine": float(np.mean(cosines)), "min_cosine": float(np.min(cosines)), "max_abs_diff": max_diff}


def _classification(run: Runner, per_token: bool) -> dict[str, float]:
    """Top-1 label agreement (per text, or per real token) and the max abs diff of the logits."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    tokenizer = load_tokenizer(run.source.path)
    auto = AutoModelForTokenClassification if per_token else AutoModelForSequenceClassification
    model = auto.from_pretrained(run.source.path).eval()
    session = run.session(run.files.path / run.files.components[0])
    agree = total = 0
    max_diff = 0.0
    for batch in track(list(_batches(run.texts)), "validating", run.progress, unit="batch"):
        enc = tokenizer(batch, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="np")
        with torch.no_grad():
            ref = model(**model_inputs(model, enc)).logits.numpy()
        out = session.run(["logits"], _feed(session, enc))[0]
        # per text, every row counts; per token, only real (non-pad) tokens do
        keep = enc["attention_mask"].astype(bool) if per_token else np.ones(len(batch), dtype=bool)
        agree += int((ref.argmax(-1) == out.argmax(-1))[keep].sum())
        total += int(keep.sum())
        max_diff = max(max_diff, float(np.abs(ref - out)[keep].max()))
    return {"top1_agreement": agree / total, "max_abs_diff": max_diff}


def text_classification(run: Runner) -> dict[str, float]:
    return _classification(run, per_token=False)


def token_classification(run: Runner) -> dict[str, float]:
    return _classification(run, per_token=True)


VALIDATORS: dict[str, Callable[[Runner], dict[str, float]]] = {
    "feature-extraction": feature_extraction,
    "text-classification": text_classification,
    "token-classification": token_classification,
    "text-generation": text_generation,
    "text2text-generation": text2text_generation,
}


# Metrics where lower is better: their thresholds are ceilings (besides every max_* metric).
CEILINGS = ("perplexity_ratio",)


def is_ceiling(key: str) -> bool:
    return key.startswith("max_") or key in CEILINGS


def check_thresholds(metrics: dict[str, float], thresholds: dict[str, float]) -> tuple[str, ...]:
    """Ceilings (max_* and CEILINGS) and floors (every other threshold); thresholds for absent metrics are skipped."""
    failures = []
    for key, limit in thresholds.items():
        if key not in metrics:
            continue
        value = metrics[key]
        if is_ceiling(key) and value > limit:
            failures.append(f"{key} {value:.4g} > {limit}")
        elif not is_ceiling(key) and value < limit:
            failures.append(f"{key} {value:.4f} < {limit}")
    return tuple(failures)


def validate(source: ModelSource, files: ModelFiles, target, texts: tuple[str, ...] | None = None,
             progress: Callable[[Any], None] | None = None) -> ValidationResult:
    """Compare the artifact with the PyTorch model on the target's provider (CPU checks when it is missing)."""
    validator = VALIDATORS.get(source.task)
    if validator is None:
        raise UnsupportedModelError(f"no validation for task {source.task!r} yet "
                                    f"(supported: {', '.join(sorted(VALIDATORS))})")
    deferred = None
    provider = target.provider
    if not provider_works(provider):
        deferred = f"{provider} not available"
        provider = "CPUExecutionProvider"

    def make_session(path: Path):
        if provider == target.provider:
            return create_session(path, provider, target.provider_options, target.fallback_providers,
                                  extra_options=target.session_options, artifact_dir=files.path)
        return create_session(path)

    texts = texts or validation_texts()
    # generators run through Optimum's ORTModel classes, which build their own sessions on this provider
    optimum_options = {"provider": provider,
                       "provider_options": target.provider_options if provider == target.provider else {},
                       "session_options": target.session_options if provider == target.provider else {}}
    # What the target promises about the graph is checked on the file, with or without its provider.
    checks = check_graph(files, target)
    try:
        metrics = validator(Runner(source, files, make_session, texts, optimum_options, progress))
    except cpu_run_errors() as exc:
        if deferred is None:
            raise
        # A graph made for the GPU may use a float16 op that ORT's CPU kernels lack: record it, do not fail.
        deferred += f"; {provider} could not run it either: {str(exc).strip().splitlines()[0][:200]}"
        metrics = {}
    relevant = {k: v for k, v in target.validate.items() if k in metrics}
    # When the provider is missing, the same graph ran on CPU: its fidelity still has to hold.
    failures = (*checks.failures, *check_thresholds(metrics, relevant))
    return ValidationResult(source.task, {k: round(v, 6) for k, v in metrics.items()}, relevant, failures,
                            deferred, provider, len(texts), checks.facts)
