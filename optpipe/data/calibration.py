"""Calibration texts (a user file or the built-in set) and the tokenized batches static quantization runs on."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from optpipe.errors import CalibrationDataError
from optpipe.data.texts import calibration_texts
from optpipe.passbase import track

FORMATS = (".txt", ".jsonl", ".csv")
DEFAULT_COLUMN = "text"
# Batches are padded to these lengths in turn, so ranges see short, medium and long inputs with padding.
SEQUENCE_LENGTHS = (16, 32, 64, 128)
BATCH_SIZE = 8


@dataclass(frozen=True)
class CalibrationSet:
    """Texts to calibrate on, where they came from, and the sha256 of their content."""

    texts: tuple[str, ...]
    origin: str  # "built-in" or the file path (with ":column" for csv/jsonl columns other than "text")
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"origin": self.origin, "size": len(self.texts), "sha256": self.sha256}


def split_spec(spec: str | Path) -> tuple[Path, str | None]:
    """`FILE` or `FILE.csv:column` / `FILE.jsonl:field` -> (path, column or None)."""
    text = str(spec)
    path = Path(text).expanduser()
    if not path.exists() and ":" in text:
        head, _, column = text.rpartition(":")
        if head and column and Path(head).suffix.lower() in (".csv", ".jsonl"):
            return Path(head).expanduser(), column
    return path, None


def _hash(texts: tuple[str, ...]) -> str:
    return hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()


def builtin_set() -> CalibrationSet:
    texts = calibration_texts()
    return CalibrationSet(texts, "built-in", _hash(texts))


def load_calibration(spec: str | Path | None, column: str | None = None, limit: int = 0) -> CalibrationSet:
    """Read calibration texts from a .txt/.jsonl/.csv file (or the built-in set when `spec` is None).

    Raises CalibrationDataError with a one-line message for a missing, unreadable, empty or malformed file.
    """
    if spec is None:
        chosen = builtin_set()
    else:
        path, spec_column = split_spec(spec)
        column = spec_column or column or DEFAULT_COLUMN
        texts = _read(path, column)
        origin = str(path) + (f":{column}" if column != DEFAULT_COLUMN else "")
        chosen = CalibrationSet(texts, origin, _hash(texts))
    if limit and limit < len(chosen.texts):
        texts = chosen.texts[:limit]
        chosen = CalibrationSet(texts, chosen.origin, _hash(texts))
    return chosen


def _read(path: Path, column: str) -> tuple[str, ...]:
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise CalibrationDataError(f"calibration file {path}: unsupported format {suffix or '(none)'!r}; "
                                   "use .txt (one text per line), .jsonl (a 'text' field) or .csv (a 'text' column)")
    if not path.is_file():
        raise CalibrationDataError(f"calibration file {path} does not exist")
    try:
        content = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CalibrationDataError(f"calibration file {path} is not UTF-8 text (byte {exc.start}); "
                                   "re-encode it as UTF-8") from exc
    except OSError as exc:
        raise CalibrationDataError(f"calibration file {path} cannot be read: {exc.strerror or exc}") from exc
    if suffix == ".txt":
        texts = [line.strip() for line in content.splitlines()]
    elif suffix == ".jsonl":
        texts = _jsonl(path, content, column)
    else:
        texts = _csv(path, content, column)
    texts = [t for t in texts if t]
    if not texts:
        raise CalibrationDataError(f"calibration file {path} has no texts"
                                   + ("" if suffix == ".txt" else f" in {column!r}"))
    return tuple(texts)


def jsonl_records(path: Path, lines: list[str], error: type[Exception], kind: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed record) for each non-blank line; `error` names the file and line of invalid JSON."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise error(f"{kind} file {path}, line {number}: not valid JSON ({exc.msg})") from exc


def _jsonl(path: Path, content: str, field: str) -> list[str]:
    texts = []
    for number, record in jsonl_records(path, content.splitlines(), CalibrationDataError, "calibration"):
        if not isinstance(record, dict) or field not in record:
            raise CalibrationDataError(f"calibration file {path}, line {number}: no {field!r} field "
                                       f"(name another with {path.name}:FIELD)")
        if not isinstance(record[field], str):
            raise CalibrationDataError(f"calibration file {path}, line {number}: {field!r} is not a string")
        texts.append(record[field].strip())
    return texts


def _csv(path: Path, content: str, column: str) -> list[str]:
    try:
        reader = csv.DictReader(io.StringIO(content))
        header = reader.fieldnames or []
        if column not in header:
            raise CalibrationDataError(f"calibration file {path} has no column {column!r} "
                                       f"(columns: {', '.join(header) or 'none'}); name one with {path.name}:COLUMN")
        return [(row.get(column) or "").strip() for row in reader]
    except csv.Error as exc:
        raise CalibrationDataError(f"calibration file {path} is not valid CSV: {exc}") from exc


def tokenized_batches(texts: tuple[str, ...], tokenizer: Any, input_names: list[str] | tuple[str, ...],
                      batch_size: int = BATCH_SIZE,
                      lengths: tuple[int, ...] = SEQUENCE_LENGTHS) -> list[dict[str, np.ndarray]]:
    """Feeds for the graph's inputs only; batch i is padded (or truncated) to lengths[i % len(lengths)]."""
    batches = []
    for index, start in enumerate(range(0, len(texts), batch_size)):
        chunk = list(texts[start:start + batch_size])
        length = lengths[index % len(lengths)]
        enc = tokenizer(chunk, padding="max_length", truncation=True, max_length=length, return_tensors="np")
        feed = {}
        for name in input_names:
            if name in enc:
                feed[name] = enc[name].astype(np.int64)
            elif name == "token_type_ids":
                feed[name] = np.zeros_like(enc["input_ids"], dtype=np.int64)
            else:
                raise CalibrationDataError(f"calibration cannot feed the graph input {name!r} from tokenized text")
        batches.append(feed)
    return batches


def graph_input_names(model_path: Path) -> list[str]:
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in initializers]


class TextCalibrationReader:
    """An onnxruntime CalibrationDataReader over pre-tokenized batches (re-iterable with rewind()). With
    `progress`, each batch ORT pulls sends a Tick ("calibrating"); call finish() after quantize_static."""

    def __init__(self, batches: list[dict[str, np.ndarray]], progress: Callable[[Any], None] | None = None):
        self.batches = batches
        self._iter: Iterator[dict[str, np.ndarray]] = iter(batches)
        # Started by the first pull: ORT pulls nothing when its calibration cache already holds the ranges.
        self._ticks = track(range(len(batches)), "calibrating", progress, unit="batch") if progress else None
        self._pulled = False

    def get_next(self) -> dict[str, np.ndarray] | None:
        feed = next(self._iter, None)
        if feed is not None and self._ticks is not None:
            next(self._ticks, None)
            self._pulled = True
        return feed

    def finish(self) -> None:
        """Send the last Tick (done == total) when calibration pulled any batch."""
        if self._pulled:
            next(self._ticks, None)
            self._pulled = False

    def rewind(self) -> None:
        self._iter = iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._iter = iter(self.batches[start_index:end_index])
