"""optimize(): resolve the model, run the target's pipeline, validate, publish atomically."""

from __future__ import annotations

import datetime as _dt
import errno
import logging
import platform
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from optpipe.version import __version__
from optpipe.artifact import FORMAT_VERSION, Artifact, prepare_destination, publish, staging_dir
from optpipe.errors import OutputError, UnsupportedModelError, ValidationFailedError
from optpipe.passbase import ModelFiles, Tick, op_counts
from optpipe.pipeline import Pipeline, PipelineResult, package_versions
from optpipe.source import ModelSource, resolve_source
from optpipe.targets import Target, load_target
from optpipe.validation.validate import VALIDATORS, ValidationResult, validate

log = logging.getLogger("optpipe")

FUSED_OPS = {"Attention", "MultiHeadAttention", "GroupQueryAttention", "QAttention", "SkipLayerNormalization",
             "EmbedLayerNormalization", "QEmbedLayerNormalization", "BiasGelu", "FastGelu", "Gelu",
             "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization", "RotaryEmbedding",
             "LayerNormalization", "BiasSplitGelu", "BiasAdd"}


def resolve_target(target: str | Path | Target, overrides: tuple[str, ...] | list[str] = (),
                   pipeline: str | None = None) -> Target:
    resolved = target if isinstance(target, Target) else load_target(target)
    if pipeline:
        resolved = resolved.with_pipeline(pipeline)
    return resolved.with_overrides(tuple(overrides)) if overrides else resolved


def default_output(source: ModelSource, target: Target) -> Path:
    return Path("out") / f"{source.name}-{target.name}"


def graph_summary(files: ModelFiles) -> dict[str, Any]:
    import onnx

    from optpipe.passes.quantize_graph import INTEGER_OPS

    summary = {}
    for component in files.components:
        model = onnx.load(str(files.path / component), load_external_data=False)
        ops = op_counts(model)
        fp16 = sum(1 for init in model.graph.initializer if init.data_type == onnx.TensorProto.FLOAT16)
        summary[component] = {
            "nodes": sum(ops.values()),
            "fused_ops": {k: v for k, v in ops.items() if k in FUSED_OPS},
            "integer_ops": {k: v for k, v in ops.items() if k in INTEGER_OPS},
            "float16_initializers": fp16,
            "ops": ops,
        }
    return summary


def compressed_size(files: ModelFiles) -> dict[str, Any]:
    """gzip size of the ONNX files: zeroed (pruned) weights are a size win only once compressed."""
    import gzip

    total = 0
    for file in sorted(files.path.iterdir()):
        if file.suffix in (".onnx", ".onnx_data") or file.name.endswith(".onnx.data"):
            total += len(gzip.compress(file.read_bytes(), compresslevel=6))
    return {"onnx_gzip_bytes": total, "compression": "gzip level 6 of each ONNX file"}


def build_manifest(source: ModelSource, target: Target, result: PipelineResult, staged: ModelFiles,
                   validation: ValidationResult, source_bytes: int,
                   cpu: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "optpipe_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": source.to_json(),
        "target": target.to_json(),
        "pipeline": target.pipeline,
        "passes": [record.__dict__ for record in result.steps],
        "components": list(staged.components),
        "graph": graph_summary(staged),
        "size": {"source_bytes": source_bytes, "onnx_bytes": staged.onnx_bytes(),
                 **(compressed_size(staged) if any(r.name == "prune" for r in result.steps) else {})},
        "validation": {**validation.to_json(), **({"cpu": cpu} if cpu is not None else {})},
        "versions": {"python": platform.python_version(), **package_versions()},
    }


def optimize(
    model: str | Path | None = None,
    target: str | Path | Target = "cpu-int8",
    output: str | Path | None = None,
    *,
    task: str | None = None,
    overrides: tuple[str, ...] | list[str] = (),
    pipeline: str | None = None,
    overwrite: bool = False,
    use_cache: bool = True,
    calibration: str | Path | None = None,
    progress: Callable[[Any], None] | None = None,
    extra_manifest: dict[str, Any] | None = None,
    bench: bool = False,
    revision: str | None = None,
) -> Artifact:
    """Compile `model` (hub id, local dir, or None for the bundled MiniLM) for `target`; returns the Artifact.

    Nothing is written at `output` unless the artifact passed validation. `extra_manifest` adds top-level
    sections to manifest.json (e.g. the candidate table of `optpipe tune`). `bench=True` times the staged
    artifact before publishing and records the figures under "bench". `revision` (hub ids only: branch, tag or
    commit) is downloaded and the commit it resolved to is recorded in the manifest's source. `progress` receives
    step lines (str) and, in long loops, `optpipe.passbase.Tick`s; it is only called, never drawn.
    """
    say = progress or _log_progress
    resolved_target = resolve_target(target, overrides, pipeline)
    calibration_spec, column = check_calibration(calibration)
    if column and resolved_target.pass_spec("quantize") is not None:  # recorded in the manifest's quantize config
        resolved_target = resolved_target.with_overrides([f"quantize.calibration_column={column}"])
    from optpipe.passes import PASSES

    for recipe in (resolved_target.passes, resolved_target.decoder_passes):
        if recipe:
            Pipeline(recipe, PASSES)  # options and order are checked before any work
    source = resolve_source(str(model) if model is not None else None, task, revision)
    if source.task not in VALIDATORS:  # every artifact is validated: say so before the passes run, not after
        raise UnsupportedModelError(f"no validation for task {source.task!r} yet, so nothing could be published "
                                    f"(supported: {', '.join(sorted(VALIDATORS))}); pass --task with one of them")
    resolved_target = resolved_target.for_task(source.task, gguf=source.gguf_file is not None)
    steps = Pipeline(resolved_target.passes, PASSES)
    dest = Path(output) if output is not None else default_output(source, resolved_target)
    dest = dest.expanduser().resolve()
    prepare_destination(dest, overwrite)

    say(f"optpipe {__version__}: {source.model_id} ({source.model_type}, {source.task}) -> "
        f"{resolved_target.name} [{resolved_target.pipeline}]")
    staging = staging_dir(dest)
    workdir = Path(tempfile.mkdtemp(prefix=f".{dest.name}.work-", dir=dest.parent))
    try:
        result = steps.run(source, resolved_target, workdir, say, use_cache=use_cache, calibration=calibration_spec)
        shutil.copytree(result.files.path, staging, dirs_exist_ok=True)
        manifest = _validated_manifest(source, resolved_target, result, ModelFiles(staging, "onnx",
                                                                                   result.files.components), say)
        manifest.update(extra_manifest or {})
        manifest["profile"] = _profile(staging, result.files.components, resolved_target, say)
        if bench:
            from optpipe.perf.harness import bench_staged

            say("timing the staged artifact (optpipe bench) ...")
            manifest["bench"] = bench_staged(staging, result.files.components, resolved_target)
        artifact = publish(staging, dest, manifest, overwrite)
        say(f"published {dest}")
        return artifact
    except OSError as exc:  # copying into the staging directory, validation's and the profiler's files
        if exc.errno == errno.ENOSPC:
            raise OutputError(f"disk full while building the artifact in {dest.parent}; free space and run "
                              "again") from exc
        raise OutputError(f"file error while building the artifact: {exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)


def _profile(staging: Path, components, target: Target, say: Callable[[str], None]) -> dict[str, Any]:
    """Time by op type (ONNX Runtime's profiler) for the manifest; a failure here is recorded, never fatal."""
    from optpipe.perf.profile import op_time_profile

    say("profiling the staged artifact (time by op type) ...")
    try:
        return op_time_profile(staging, components, target)
    except Exception as exc:  # noqa: BLE001 - the artifact is valid; only its profile is missing
        log.warning("profiling failed: %s", exc)
        return {"skipped": f"profiling failed: {type(exc).__name__}: {str(exc)[:200]}"}


def _log_progress(event: Any) -> None:
    """Progress without a callback: step lines to the "optpipe" logger at INFO, Ticks (passbase.track) at DEBUG."""
    (log.debug if isinstance(event, Tick) else log.info)("%s", event)


def _hint(result: PipelineResult) -> str:
    """What to try when a weight-only artifact misses its gate: mixed precision, unless it was already asked."""
    for step in result.steps:
        if step.name != "weight_only" or step.config.get("sensitivity_fallback"):
            continue
        if any(component.get("quantized") for component in step.report.get("components", {}).values()):
            return ("; to keep the decoder layers that quantization hurts most in float, try "
                    "--set weight_only.sensitivity_fallback=5 (README: mixed precision)")
    return ""


def _validated_manifest(source: ModelSource, target: Target, result: PipelineResult, staged: ModelFiles,
                        say: Callable[[str], None]) -> dict[str, Any]:
    """Validate the staged artifact against the original model; its manifest, or ValidationFailedError."""
    from optpipe.perf.isa import X64_QUANT_PRECISION, build_note, detect

    cpu = detect()
    note = build_note(target.numerics_isa, cpu.family) if target.numerics_isa else None
    checked, extra = target, {}
    if note and cpu.family == "avx2":  # validate what the target's exact-int8 CPUs compute, not this CPU's saturation
        extra = {X64_QUANT_PRECISION: "1"}
        checked = replace(target, session_options={**target.session_options, **extra})
    say("validating against the PyTorch model ...")
    validation = validate(source, staged, checked, progress=say)
    if note:
        log.warning("%s", note)
    if not validation.passed:
        raise ValidationFailedError(
            f"validation failed for {target.name}: {'; '.join(validation.failures)} "
            f"(metrics: {_fmt(validation.metrics)}); nothing was published{_hint(result)}"
        )
    source_bytes = _weights_bytes(source.path)
    # runs_target_numerics: this CPU's default kernels compute what the target's CPUs do; validated_target_numerics:
    # the validation did (on AVX2, through session.x64quantprecision)
    cpu_facts = {**cpu.to_json(), "target_isa": target.numerics_isa, "runs_target_numerics": note is None,
                 "validated_target_numerics": note is None or bool(extra), "note": note, "session_options": extra}
    return build_manifest(source, target, result, staged, validation, source_bytes, cpu_facts)


def _weights_bytes(model_dir: Path) -> int:
    """The size of the PyTorch weights transformers loads: the top-level safetensors, else pytorch_model*.bin (a
    repository may hold both, and other runtimes' .bin files)."""
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("pytorch_model*.bin"))
    return sum(p.stat().st_size for p in files if p.is_file())


def check_calibration(calibration: str | Path | None) -> tuple[str | None, str | None]:
    """The --calibration spec (FILE, or FILE.csv:COLUMN) with an absolute path, and the column it names, checked
    (readable, has texts) before any work. Every pass that calibrates reads the spec with load_calibration."""
    if calibration is None:
        return None, None
    from optpipe.data.calibration import load_calibration, split_spec

    path, column = split_spec(calibration)
    load_calibration(calibration)  # raises CalibrationDataError with a one-line message
    return str(path.resolve()) + (f":{column}" if column else ""), column


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
