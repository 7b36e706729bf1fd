"""Validation of an artifact against the model it came from: the validator per task, thresholds, the result."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from optpipe.data.texts import validation_texts
from optpipe.errors import UnsupportedModelError
from optpipe.passbase import ModelFiles
from optpipe.session import create_session, provider_works
from optpipe.source import ModelSource
from optpipe.validation.encoders import feature_extraction, text_classification, token_classification
from optpipe.validation.generation import text2text_generation, text_generation
from optpipe.validation.graph_checks import check_graph, cpu_run_errors
from optpipe.validation.runner import Runner


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
