"""The Pipeline: runs a recipe's passes in order with static order checks, requires/ensures, the cache and progress."""

from __future__ import annotations

import dataclasses
import errno
import functools
import hashlib
import json
import logging
import tempfile
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optpipe import cache
from optpipe.data.calibration import load_calibration
from optpipe.errors import InvalidOptionError, OptpipeError, PassFailedError, PipelineOrderError
from optpipe.passbase import ModelFiles, Pass, PassContext, PassResult, Progress
from optpipe.targets.recipe import PassSpec
from optpipe.source import ModelSource

log = logging.getLogger("optpipe")


@dataclass(frozen=True)
class StepRecord:
    name: str
    config: dict[str, Any]
    report: dict[str, Any]
    seconds: float
    cached: bool
    bytes_in: int
    bytes_out: int


@dataclass(frozen=True)
class PipelineResult:
    files: ModelFiles
    steps: tuple[StepRecord, ...] = field(default_factory=tuple)


def _coerce(value: Any, annotation: Any) -> Any:
    """A recipe or --set value as the option's type wants it: a list as a tuple, a bare string as a one-item tuple
    (`--set quantize.op_types=MatMul`), an int where a float is wanted."""
    if isinstance(value, list):
        return tuple(value)
    if typing.get_origin(annotation) is tuple and isinstance(value, str):
        return (value,)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


TYPE_WORDS = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}
LIST_WORDS = {bool: "a list of true/false values", int: "a list of whole numbers", float: "a list of numbers",
              str: "a list of names"}


def _type_problem(value: Any, annotation: Any) -> str | None:
    """Why `value` does not fit a Config field's annotation (bool, int, float, str, X | None, tuple[X, ...]), or
    None when it does or the annotation is not one of these."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is tuple and args:
        wanted = LIST_WORDS.get(args[0], f"a list of {args[0]}")
        fits = isinstance(value, tuple) and not any(_type_problem(item, args[0]) for item in value)
        return None if fits else wanted
    if args and type(None) in args:  # X | None
        return None if value is None else _type_problem(value, next(a for a in args if a is not type(None)))
    if annotation not in TYPE_WORDS:
        return None
    fits = isinstance(value, annotation) and (annotation is bool or not isinstance(value, bool))
    if annotation is float:
        fits = isinstance(value, (int, float)) and not isinstance(value, bool)
    return None if fits else TYPE_WORDS[annotation]


def build_config(pass_cls: type, options: dict[str, Any]) -> Any:
    """Make a pass's frozen Config from recipe options, with errors that name the valid keys."""
    config_cls = pass_cls.Config
    hints = typing.get_type_hints(config_cls)
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise InvalidOptionError(
            f"pass {pass_cls.name!r} has no option {', '.join(unknown)} (options: {', '.join(sorted(fields))})"
        )
    values = {k: _coerce(v, hints.get(k)) for k, v in options.items()}
    for key, value in values.items():
        wanted = _type_problem(value, hints.get(key))
        if wanted:
            raise InvalidOptionError(f"{pass_cls.name}.{key} must be {wanted}, not {value!r}")
    try:
        config = config_cls(**values)
        check = getattr(config, "check", None)
        if check is not None:
            check()
    except (TypeError, ValueError) as exc:
        raise InvalidOptionError(f"pass {pass_cls.name!r}: {exc}") from exc
    return config


def config_json(config: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def package_versions() -> dict[str, str]:
    """Versions of the packages whose behaviour shapes an artifact (recorded in manifests and cache keys)."""
    from importlib import metadata

    versions = {}
    for name in ("torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime", "onnxruntime-gpu",
                 "neural-compressor", "gguf"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """Hash of the code and data that shape pass outputs (the passes, the pass base, the model loading they call,
    the built-in texts they calibrate on): a cached output is only reused by the code that wrote it. Package
    versions alone miss edits to an editable checkout."""
    from importlib.util import find_spec

    passes_dir = Path(find_spec("optpipe.passes").submodule_search_locations[0])  # located, not imported
    here = Path(__file__).parent
    files = [*passes_dir.glob("*.py"), here / "passbase.py", here / "errors.py", here / "source.py",
             here / "gguf_source.py", *(here / "data").glob("*.py"), *(here / "data").glob("*.txt")]
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


class Pipeline:
    """Runs passes in order. Each pass writes a fresh directory; outputs are cached by content-derived keys."""

    def __init__(self, specs: list[PassSpec] | tuple[PassSpec, ...], registry: dict[str, type[Pass]]):
        self.steps: list[tuple[type[Pass], Any]] = []
        for spec in specs:
            if spec.name not in registry:
                raise InvalidOptionError(f"unknown pass {spec.name!r} (passes: {', '.join(sorted(registry))})")
            pass_cls = registry[spec.name]
            self.steps.append((pass_cls, build_config(pass_cls, spec.options)))
        self.check_order()

    def check_order(self) -> None:
        if not self.steps:
            raise PipelineOrderError("the pipeline has no passes")
        kind = "hf"
        for pass_cls, _ in self.steps:
            if pass_cls.consumes != kind:
                raise PipelineOrderError(
                    f"pass {pass_cls.name!r} needs a {pass_cls.consumes!r} model but gets {kind!r} here; "
                    "torch-stage passes (prune) come before export, ONNX passes (fuse, quantize, fp16) after it"
                )
            kind = pass_cls.produces
        if kind != "onnx":
            raise PipelineOrderError("the pipeline must end with an ONNX model: add the export pass")

    @staticmethod
    def step_key(previous: str, pass_cls: type[Pass], config: Any, versions: dict,
                 calibration_hash: str | None) -> str:
        """A pass output's cache key: what the pass reads and nothing else (the calibration texts only for the
        pass that calibrates). Passes read the target only through their options, so two targets that give a pass
        the same input and options share its output."""
        payload = {
            "input": previous,
            "pass": pass_cls.name,
            "config": config_json(config),
            "versions": versions,
            "code": code_fingerprint(),
            "calibration": calibration_hash if pass_cls.reads_calibration else None,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def run(
        self,
        source: ModelSource,
        target: Any,
        workdir: Path,
        progress: Progress,
        use_cache: bool = True,
        calibration: str | None = None,
    ) -> PipelineResult:
        files = ModelFiles(source.path, "hf")
        key = f"{source.content_hash}:{source.task}"  # the task decides what export writes (heads, KV cache)
        calibration_hash = load_calibration(calibration).sha256 if calibration is not None else None
        versions = package_versions()
        records = []
        size = files.size_bytes()
        for index, (pass_cls, config) in enumerate(self.steps, start=1):
            key = self.step_key(key, pass_cls, config, versions, calibration_hash)
            label = f"[{index}/{len(self.steps)}] {pass_cls.name}"
            bytes_in = size  # the previous pass's output
            entry = cache.entry_path(pass_cls.name, key)
            hit = cache.load(entry) if use_cache else None
            if hit is not None:
                result = PassResult(ModelFiles(hit.files_dir, hit.kind, hit.components),
                                    pass_cls.Report.from_json(hit.report))
                seconds = hit.seconds
                progress(f"{label}: cached")
            else:
                progress(f"{label} ...")
                ctx = PassContext(source, target, Path(tempfile.mkdtemp(prefix=f"{pass_cls.name}-", dir=workdir)),
                                  progress, calibration)
                result, seconds = self._run_pass(pass_cls, config, files, ctx)
                if use_cache:
                    stored = cache.store(entry, result.files.path, result.files.kind, result.files.components,
                                         result.report.to_json(), seconds)
                    if stored is not None:
                        result = PassResult(ModelFiles(stored.files_dir, stored.kind, stored.components),
                                            result.report)
                progress(f"{label}: done in {seconds:.1f}s")
            files = result.files
            size = files.size_bytes()
            records.append(StepRecord(pass_cls.name, config_json(config), result.report.to_json(), round(seconds, 3),
                                      hit is not None, bytes_in, size))
        return PipelineResult(files, tuple(records))

    @staticmethod
    def _run_pass(pass_cls: type[Pass], config: Any, files: ModelFiles, ctx: PassContext) -> tuple[PassResult, float]:
        started = time.perf_counter()
        instance = pass_cls()
        try:
            instance.requires(files, config, ctx)
            result = instance.call(files, config, ctx)
            instance.ensures(result, config, ctx)
        except (OptpipeError, KeyboardInterrupt, MemoryError):
            raise
        except OSError as exc:  # reading or writing a file: say which, and a full disk plainly
            if exc.errno == errno.ENOSPC:
                raise PassFailedError(f"pass {pass_cls.name!r}: disk full ({exc.filename or 'its output'}); free "
                                      "space and run again") from exc
            raise PassFailedError(f"pass {pass_cls.name!r}: file error: {exc}") from exc
        except Exception as exc:
            raise PassFailedError(f"pass {pass_cls.name!r} failed: {type(exc).__name__}: {_first_line(exc)}") from exc
        return result, time.perf_counter() - started


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""
