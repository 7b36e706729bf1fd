"""A .gguf file as a model source: converted once, through transformers' GGUF loader, into a Hugging Face directory.

The directory lives in the optpipe cache under the GGUF's sha256 and the transformers and gguf versions (they do the
dequantizing), and is built in a temporary directory beside it and renamed into place, so concurrent runs and
Ctrl-C never leave half a directory. The tokenizer's special tokens are taken from the GGUF's own metadata where
transformers' converter gets them wrong, and it gets a pad token when it has none; each change is recorded.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from optpipe.errors import CorruptModelError, ModelNotFoundError, UnsupportedModelError

log = logging.getLogger("optpipe")

RECORD = "optpipe-gguf.json"
_HF_WEIGHTS = ("*.safetensors", "pytorch_model*.bin")


def find_gguf(path: Path) -> Path | None:
    """The GGUF that `path` names: a .gguf file, or the only .gguf of a directory without Hugging Face weights."""
    if path.is_file():
        return path if path.suffix.lower() == ".gguf" else None
    if not path.is_dir() or any(next(path.glob(pattern), None) for pattern in _HF_WEIGHTS):
        return None
    found = sorted(path.glob("*.gguf"))
    if len(found) > 1:
        names = ", ".join(p.name for p in found[:5]) + (" ..." if len(found) > 5 else "")
        raise ModelNotFoundError(f"{path} holds {len(found)} GGUF files ({names}); name the one to use")
    return found[0] if found else None


def read_gguf(path: Path):
    """A gguf.GGUFReader over `path`; a file it cannot parse is a CorruptModelError, in one line."""
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except ValueError as exc:
        if "GGMLQuantizationType" in str(exc):
            raise UnsupportedModelError(
                f"{path.name} holds a tensor type that gguf {_version('gguf')} does not know ({_first_line(exc)}); "
                "transformers cannot dequantize it"
            ) from exc
        raise CorruptModelError(f"{path} is not a readable GGUF file: {_first_line(exc)}; re-download it") from exc
    except Exception as exc:  # truncated or garbled: IndexError, struct / unicode errors, OSError ...
        raise CorruptModelError(
            f"{path} is not a readable GGUF file: {type(exc).__name__}: {_first_line(exc)}; re-download it"
        ) from exc


def supported_architectures() -> list[str]:
    """The GGUF architectures transformers' loader reads (its GGUF_SUPPORTED_ARCHITECTURES, less non-model keys)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return [arch for arch in GGUF_SUPPORTED_ARCHITECTURES if arch not in ("general", "tokenizer")]


def tensor_types(reader) -> dict[str, int]:
    """GGUF tensor type name -> number of tensors of that type."""
    return dict(sorted(Counter(t.tensor_type.name for t in reader.tensors).items()))


def check_loadable(path: Path, reader) -> str:
    """The GGUF's architecture, once transformers' loader can read it: architecture, tensor types, tokenizer."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES
    from gguf.quants import dequantize

    arch = _field(reader, "general.architecture")
    supported = supported_architectures()
    # transformers renames these before its own check (modeling_gguf_pytorch_utils.load_gguf_checkpoint)
    renamed = {"qwen3moe": "qwen3_moe", "t5encoder": "t5"}.get(arch, arch)
    if arch not in supported and renamed not in supported:
        raise UnsupportedModelError(
            f"{path.name}: transformers {_version('transformers')} cannot load GGUF architecture {arch!r} "
            f"(it reads: {', '.join(supported)})"
        )
    undequantizable = []
    for tensor in reader.tensors:
        qtype = tensor.tensor_type
        if qtype.name in undequantizable:
            continue
        try:
            dequantize(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8), qtype)
        except NotImplementedError:
            undequantizable.append(qtype.name)
    if undequantizable:
        raise UnsupportedModelError(
            f"{path.name} holds {', '.join(undequantizable)} tensors, which gguf {_version('gguf')} (and so "
            "transformers) cannot dequantize; use a GGUF of another quantization type"
        )
    if _field(reader, "tokenizer.ggml.model") is None:
        raise UnsupportedModelError(f"{path.name} carries no tokenizer (no tokenizer.ggml.* metadata)")
    return arch


@dataclass(frozen=True)
class ConvertedGGUF:
    """A GGUF file and the Hugging Face directory transformers' loader made of it."""

    gguf_file: Path
    path: Path
    sha256: str
    types: dict[str, int] = field(hash=False)  # GGUF tensor type -> count
    tokenizer_fixes: tuple[str, ...]  # what was changed in transformers' tokenizer, and why


def convert_gguf(path: Path) -> ConvertedGGUF:
    """Check the GGUF, then convert it once (cached by sha256 and versions) into a Hugging Face directory."""
    from optpipe.artifact import sha256_file

    path = path.expanduser().resolve()
    reader = read_gguf(path)
    check_loadable(path, reader)
    types = tensor_types(reader)
    special = _special_token_fields(reader)
    del reader  # its memory map; transformers opens the file again
    sha = sha256_file(path)
    hf_dir = converted_dir(sha)
    if not (hf_dir / RECORD).is_file():
        _convert(path, sha, hf_dir, types, special)
    record = json.loads((hf_dir / RECORD).read_text())
    return ConvertedGGUF(path, hf_dir, sha, types, tuple(record.get("tokenizer_fixes", ())))


def converted_dir(sha256: str) -> Path:
    """Where the Hugging Face conversion of the GGUF with this sha256 lives (or will)."""
    from optpipe.cache import cache_root

    versions = f"transformers{_version('transformers')}-gguf{_version('gguf')}"
    return cache_root() / "gguf" / f"{sha256[:24]}-{versions}"


def _convert(path: Path, sha: str, dest: Path, types: dict[str, int], special: dict) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        log.info("converting %s to a Hugging Face model in %s", path.name, dest)
        try:
            config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
            if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
                raise UnsupportedModelError(
                    f"{path.name} is a {config.model_type} model; GGUF sources are read as causal language models"
                )
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=config)
        except (ValueError, NotImplementedError) as exc:
            raise UnsupportedModelError(f"transformers cannot load {path.name}: {_first_line(exc)}") from exc
        model.save_pretrained(staging, safe_serialization=True)
        del model
        tokenizer, fixes = _tokenizer(path, special)
        tokenizer.save_pretrained(staging)
        record = {"gguf_file": path.name, "gguf_sha256": sha, "gguf_types": types, "tokenizer_fixes": fixes,
                  "transformers": _version("transformers"), "gguf": _version("gguf")}
        (staging / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        try:
            os.rename(staging, dest)
        except OSError:
            if not (dest / RECORD).is_file():
                raise
            log.info("another run converted %s first; using its copy", path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _special_token_fields(reader) -> dict:
    fields = {}
    for key in ("bos_token_id", "eos_token_id", "padding_token_id", "add_bos_token", "add_eos_token"):
        value = _field(reader, f"tokenizer.ggml.{key}")
        if value is not None:
            fields[key] = value
    return fields


def _tokenizer(path: Path, special: dict):
    """transformers' tokenizer for the GGUF, with the GGUF's own bos / eos / pad and add_bos / add_eos.

    transformers 4.57's GGUFLlamaConverter names the bos token as eos too (integrations/ggml.py), so a llama GGUF's
    tokenizer would end generation on <s>; the ids in the GGUF's metadata are the truth and win here.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    fixes: list[str] = []
    vocab = len(tokenizer)
    for role, key in (("bos", "bos_token_id"), ("eos", "eos_token_id")):
        token_id = special.get(key)
        if token_id is None or not 0 <= int(token_id) < vocab:
            continue
        token = tokenizer.convert_ids_to_tokens(int(token_id))
        old = getattr(tokenizer, f"{role}_token")
        if old != token:
            setattr(tokenizer, f"{role}_token", token)
            fixes.append(f"{role}_token = {token!r} (GGUF {key} {token_id}; transformers' converter gave {old!r})")
    if tokenizer.pad_token is None:
        pad_id = special.get("padding_token_id")
        if pad_id is not None and 0 <= int(pad_id) < vocab:
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(int(pad_id))
            fixes.append(f"pad_token = {tokenizer.pad_token!r} (GGUF padding_token_id {pad_id})")
        elif tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
            fixes.append(f"pad_token = eos_token {tokenizer.eos_token!r} (the tokenizer had none)")
    for flag in ("add_bos_token", "add_eos_token"):
        wanted = special.get(flag)
        if wanted is not None and hasattr(tokenizer, flag) and bool(getattr(tokenizer, flag)) != bool(wanted):
            setattr(tokenizer, flag, bool(wanted))  # the fast llama tokenizer rebuilds its post-processor
            fixes.append(f"{flag} = {bool(wanted)} (GGUF tokenizer.ggml.{flag})")
    if fixes and hasattr(tokenizer, "update_post_processor"):
        tokenizer.update_post_processor()
    return tokenizer, fixes


def _field(reader, key: str):
    field = reader.get_field(key)
    return None if field is None else field.contents()


def _version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
