"""The pass contract: ModelFiles flow between passes; a Pass turns one into another and returns a typed Report.

Passes (optpipe.passes.*) and the runner (optpipe.pipeline) both import this module and nothing of each other's,
so there is no import circle. Modelled on onnx-ir's passes: a frozen Config, `consumes`/`produces`, optional
`requires`/`ensures` checks the runner calls around one `call` that does the work.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

from optpipe.errors import PassFailedError
from optpipe.source import ModelSource

Progress = Callable[[str], None]

# ONNX's protobuf limit is 2 GB; above this a model is saved with its weights in a side file.
EXTERNAL_DATA_BYTES = 1_800_000_000


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
        return sum(f.stat().st_size for f in self.path.iterdir() if is_onnx_file(f.name))

    def size_bytes(self) -> int:
        """ONNX bytes for an ONNX model, every file's bytes for a Hugging Face directory."""
        if self.kind == "onnx":
            return self.onnx_bytes()
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())


def is_onnx_file(name: str) -> bool:
    return name.endswith((".onnx", ".onnx_data", ".onnx.data"))


@dataclass(frozen=True)
class PassContext:
    source: ModelSource
    target: Any  # optpipe.targets.Target; untyped so that this module does not import the targets package
    out_dir: Path
    progress: Progress
    calibration: str | None = None  # the --calibration spec (FILE or FILE.csv:COLUMN); None: the built-in texts


@dataclass(frozen=True)
class Report:
    """Base of the typed pass reports: facts as fields, serialized into the manifest by `to_json`."""

    def to_json(self) -> dict[str, Any]:
        """The report as JSON data; fields left at None (facts that do not apply) are omitted."""
        return json.loads(json.dumps(_plain(self), default=str))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Report":
        """Rebuild a report from its JSON (a cached pass output), nested reports included."""
        hints = typing.get_type_hints(cls)
        values = {}
        for f in dataclasses.fields(cls):
            if f.name in data:
                values[f.name] = _revive(data[f.name], hints[f.name])
        return cls(**values)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)
                if getattr(value, f.name) is not None}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _revive(value: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if arg is not type(None) and value is not None:
                return _revive(value, arg)
        return value
    if isinstance(annotation, type) and issubclass(annotation, Report) and isinstance(value, dict):
        return annotation.from_json(value)
    if origin is dict and isinstance(value, dict):
        item = typing.get_args(annotation)[1]
        return {k: _revive(v, item) for k, v in value.items()}
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    return value


@dataclass(frozen=True)
class PassResult:
    files: ModelFiles
    report: Report


class Pass:
    """One transformation. Subclasses set the class attributes and write `call`."""

    name: ClassVar[str]
    consumes: ClassVar[str]  # "hf" or "onnx"
    produces: ClassVar[str]
    Config: ClassVar[type]
    Report: ClassVar[type[Report]]
    # True when the pass reads the calibration texts: their hash enters this pass's cache key, not earlier ones.
    reads_calibration: ClassVar[bool] = False

    def requires(self, files: ModelFiles, config: Any, ctx: PassContext) -> None:
        """Raise an OptpipeError when this pass cannot run on `files` (checked before `call`)."""

    def ensures(self, result: PassResult, config: Any, ctx: PassContext) -> None:
        """Raise when the output breaks what this pass promises (checked after `call`)."""
        missing = [p.name for p in result.files.component_paths() if not p.is_file()]
        if result.files.kind != self.produces or missing:
            raise PassFailedError(f"pass {self.name!r} did not produce its {self.produces} output"
                                  + (f" (missing {', '.join(missing)})" if missing else ""))

    def call(self, files: ModelFiles, config: Any, ctx: PassContext) -> PassResult:
        raise NotImplementedError


class OnnxPass(Pass):
    """A pass over ONNX files. The base owns the loop over components and carries the auxiliary files (config,
    tokenizer, …) along; a subclass writes `transform` for one component and `summarize` for the report."""

    consumes = "onnx"
    produces = "onnx"

    def call(self, files: ModelFiles, config: Any, ctx: PassContext) -> PassResult:
        # The input may be a cache entry other runs read at the same time, and some tools write scratch files
        # beside the model they read (onnxruntime's quantizer writes and deletes `*-inferred.onnx`): each pass
        # reads from a private directory of links to its input instead.
        private = Path(tempfile.mkdtemp(prefix=f".{self.name}-input-", dir=ctx.out_dir.parent))
        try:
            _link_files(files.path, private)
            reports = {}
            for component in files.components:
                reports[component] = self.transform(private / component, ctx.out_dir / component, config, ctx)
        finally:
            shutil.rmtree(private, ignore_errors=True)
        copy_aux_files(files.path, ctx.out_dir)
        return PassResult(ModelFiles(ctx.out_dir, "onnx", files.components), self.summarize(reports, config, ctx))

    def transform(self, src: Path, dst: Path, config: Any, ctx: PassContext) -> Any:
        """Write the transformed `src` to `dst`; return the component's report."""
        raise NotImplementedError

    def summarize(self, components: dict[str, Any], config: Any, ctx: PassContext) -> Report:
        raise NotImplementedError


def _link_files(src: Path, dst: Path) -> None:
    for item in src.iterdir():
        if item.is_dir():
            shutil.copytree(item, dst / item.name)
            continue
        try:
            os.link(item, dst / item.name)
        except OSError:
            shutil.copy2(item, dst / item.name)


def copy_aux_files(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> None:
    """Carry config, tokenizer and other non-ONNX files from one stage's directory to the next."""
    for item in src.iterdir():
        if item.name in skip or is_onnx_file(item.name):
            continue
        if item.is_dir():
            shutil.copytree(item, dst / item.name, dirs_exist_ok=True)
        else:
            shutil.copy2(item, dst / item.name)


def needs_external_data(model: Any) -> bool:
    """True when an ONNX ModelProto is too large for one protobuf file."""
    return model.ByteSize() > EXTERNAL_DATA_BYTES


def save_onnx(model: Any, path: Path) -> None:
    """Save a ModelProto, with its weights in `<name>.data` beside it when it is too large for one file."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    if needs_external_data(model):
        (path.parent / (path.name + ".data")).unlink(missing_ok=True)  # onnx appends to an existing data file
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data")
    else:
        onnx.save_model(model, str(path))


def op_counts(model: Any) -> dict[str, int]:
    """Op type -> node count of an ONNX ModelProto's main graph, most frequent first."""
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


@dataclass(frozen=True)
class Tick:
    """A structured progress event for a long step: `done` of `total` units of `label` (total None: unknown).

    Progress callbacks receive plain step lines (str) and, during long loops, Ticks; `str(tick)` is a short line,
    so a callback that only prints still works. The CLI draws a bar from Ticks on a terminal and skips them
    otherwise; the Python API only forwards them.
    """

    label: str
    done: int
    total: int | None = None
    unit: str = "it"

    def __str__(self) -> str:
        return f"  {self.label}: {self.done}" + (f"/{self.total}" if self.total is not None else "") + f" {self.unit}"


def track(iterable: Any, label: str, progress: Callable[[Any], None] | None, total: int | None = None, *,
          unit: str = "it", interval: float = 0.5) -> Any:
    """Yield the items of `iterable`, sending `progress` a Tick before the first, then at most every `interval`
    seconds, and one with done == total at the end (when the loop ends early or `total` was unknown, total is
    set to the count reached). With progress None it is the bare iterable."""
    import time

    if progress is None:
        yield from iterable
        return
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    progress(Tick(label, 0, total, unit))
    done, last = 0, time.monotonic()
    for item in iterable:
        yield item
        done += 1
        now = time.monotonic()
        if done == total or now - last >= interval:
            progress(Tick(label, done, total, unit))
            last = now
    if done != total:
        progress(Tick(label, done, done, unit))
