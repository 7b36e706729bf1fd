"""Pass protocol, ModelFiles/PassResult, and the Pipeline that runs a recipe with checks, cache and progress."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Protocol

from optpipe.errors import InvalidOptionError, OptpipeError, PassFailedError, PipelineOrderError
from optpipe.recipe import PassSpec
from optpipe.source import ModelSource

log = logging.getLogger("optpipe")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ModelFiles:
    """What flows between passes: a directory of kind "hf" or "onnx" and, for ONNX, its component files."""

    path: Path
    kind: str
    components: tuple[str, ...] = ()

    def component_paths(self) -> list[Path]:
        return [self.path / c for c in self.components]

    def onnx_bytes(self) -> int:
        """Bytes of the ONNX components with their external data, if any."""
        total = 0
        for file in self.path.iterdir():
            if file.suffix in (".onnx", ".onnx_data") or file.name.endswith(".onnx.data"):
                total += file.stat().st_size
        return total


@dataclass(frozen=True)
class PassResult:
    files: ModelFiles
    report: dict[str, Any]


@dataclass(frozen=True)
class PassContext:
    source: ModelSource
    target: Any  # optpipe.targets.Target (kept untyped here to avoid an import cycle)
    out_dir: Path
    progress: Progress
    calibration: Path | None = None


class Pass(Protocol):
    name: ClassVar[str]
    consumes: ClassVar[str]
    produces: ClassVar[str]
    Config: ClassVar[type]
    # True when the output depends on the target beyond the pass's own options (e.g. GPU fusions).
    target_dependent: ClassVar[bool]

    def run(self, files: ModelFiles, config: Any, ctx: PassContext) -> PassResult: ...


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


def copy_aux_files(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> None:
    """Carry config, tokenizer and other non-ONNX files from one stage's directory to the next."""
    for item in src.iterdir():
        if item.name in skip or item.suffix == ".onnx" or item.name.endswith((".onnx_data", ".onnx.data")):
            continue
        if item.is_dir():
            shutil.copytree(item, dst / item.name, dirs_exist_ok=True)
        else:
            shutil.copy2(item, dst / item.name)


def _coerce(value: Any, annotation: Any) -> Any:
    if isinstance(value, list):
        return tuple(value)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


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
    try:
        config = config_cls(**{k: _coerce(v, hints.get(k)) for k, v in options.items()})
    except (TypeError, ValueError) as exc:
        raise InvalidOptionError(f"pass {pass_cls.name!r}: {exc}") from exc
    check = getattr(config, "check", None)
    if check is not None:
        check()
    return config


def config_json(config: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def cache_root() -> Path:
    env = os.environ.get("OPTPIPE_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "optpipe"


def _package_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for name in ("torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime", "onnxruntime-gpu",
                 "neural-compressor"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """Hash of optpipe's own source (the passes and the helpers they call): a cached pass output is only reused by
    the code that wrote it. Package versions alone miss edits to an installed-editable checkout."""
    import optpipe
    import optpipe.passes

    digest = hashlib.sha256()
    for package in (optpipe, optpipe.passes):
        for path in sorted(Path(package.__file__).parent.glob("*.py")):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


class Pipeline:
    """Runs passes in order. Each pass writes a fresh directory; outputs are cached by content-derived keys."""

    def __init__(self, specs: list[PassSpec] | tuple[PassSpec, ...], registry: dict[str, type]):
        self.steps: list[tuple[type, Any]] = []
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

    def _key(self, previous: str, pass_cls: type, config: Any, target_name: str, versions: dict) -> str:
        payload = {
            "input": previous,
            "pass": pass_cls.name,
            "config": config_json(config),
            "versions": versions,
            "code": code_fingerprint(),
            "target": target_name if getattr(pass_cls, "target_dependent", False) else None,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def run(
        self,
        source: ModelSource,
        target: Any,
        workdir: Path,
        progress: Progress,
        use_cache: bool = True,
        calibration: Path | None = None,
    ) -> PipelineResult:
        files = ModelFiles(source.path, "hf")
        key = source.content_hash if calibration is None else source.content_hash + _file_hash(calibration)
        versions = _package_versions()
        root = cache_root()
        records = []
        for index, (pass_cls, config) in enumerate(self.steps, start=1):
            key = self._key(key, pass_cls, config, target.name, versions)
            label = f"[{index}/{len(self.steps)}] {pass_cls.name}"
            bytes_in = files.onnx_bytes() if files.kind == "onnx" else _dir_bytes(files.path)
            cached = _load_cached(root / f"{pass_cls.name}-{key[:20]}") if use_cache else None
            if cached is not None:
                result, seconds = cached
                progress(f"{label}: cached")
            else:
                progress(f"{label} ...")
                result, seconds = self._run_pass(pass_cls, config, files, source, target, workdir, progress, calibration)
                if use_cache:
                    result = _store_cached(root / f"{pass_cls.name}-{key[:20]}", result, seconds)
                progress(f"{label}: done in {seconds:.1f}s")
            files = result.files
            bytes_out = files.onnx_bytes() if files.kind == "onnx" else _dir_bytes(files.path)
            records.append(StepRecord(pass_cls.name, config_json(config), result.report, round(seconds, 3),
                                      cached is not None, bytes_in, bytes_out))
        return PipelineResult(files, tuple(records))

    def _run_pass(self, pass_cls, config, files, source, target, workdir, progress, calibration):
        out_dir = Path(tempfile.mkdtemp(prefix=f"{pass_cls.name}-", dir=workdir))
        ctx = PassContext(source, target, out_dir, progress, calibration)
        started = time.perf_counter()
        try:
            result = pass_cls().run(files, config, ctx)
        except (OptpipeError, KeyboardInterrupt, MemoryError):
            raise
        except OSError as exc:
            raise PassFailedError(f"pass {pass_cls.name!r} could not write its output: {exc}") from exc
        except Exception as exc:
            raise PassFailedError(f"pass {pass_cls.name!r} failed: {type(exc).__name__}: {_first_line(exc)}") from exc
        return result, time.perf_counter() - started


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _load_cached(entry: Path) -> tuple[PassResult, float] | None:
    meta_file = entry / "optpipe-pass.json"
    if not meta_file.is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text())
        files = ModelFiles(entry / "files", meta["kind"], tuple(meta["components"]))
        if not all(p.is_file() for p in files.component_paths()):
            return None
        return PassResult(files, meta["report"]), float(meta["seconds"])
    except (OSError, KeyError, ValueError):
        return None


def _store_cached(entry: Path, result: PassResult, seconds: float) -> PassResult:
    """Move a pass output into the cache atomically; on any failure keep using the uncached output."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=entry.parent))
        shutil.move(str(result.files.path), str(staging / "files"))
        meta = {"kind": result.files.kind, "components": list(result.files.components),
                "report": result.report, "seconds": seconds}
        (staging / "optpipe-pass.json").write_text(json.dumps(meta, default=str))
        try:
            staging.rename(entry)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)  # another run stored it first
        cached = _load_cached(entry)
        return cached[0] if cached else result
    except OSError as exc:
        log.warning("could not write the pass cache (%s); continuing without it", exc)
        return result


def clear_cache() -> int:
    """Delete every cached pass output; returns bytes freed."""
    root = cache_root()
    if not root.exists():
        return 0
    freed = _dir_bytes(root)
    shutil.rmtree(root)
    return freed
