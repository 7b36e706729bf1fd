"""Inputs shaped like real tokenized text for an artifact's graph inputs, and the workloads timed on them.

Encoders get one workload, "forward". Decoders with a KV cache are two workloads with different costs:
"prefill" (the whole prompt, empty cache) and "decode" (one new token against a cache of `seq` tokens).
Seq2seq artifacts add "encoder" for the encoder component.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from optpipe.source import load_tokenizer

log = logging.getLogger("optpipe.perf.harness")

_INT = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}
_FLOAT = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


@dataclass(frozen=True)
class Workload:
    name: str  # forward | prefill | decode | encoder
    component: str
    batch: int
    seq: int
    feed: dict[str, np.ndarray]


@functools.lru_cache(maxsize=16)
def token_stream(model_dir: str) -> np.ndarray:
    """Token ids of the built-in texts through the artifact's own tokenizer (random vocab ids without one)."""
    from optpipe.data.texts import validation_texts

    try:
        if (Path(model_dir) / "tokenizer.json").is_file():
            # The fast tokenizer's own file: seconds cheaper than importing transformers in every CI check.
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
            tokenizer.no_padding()  # the saved tokenizer may pad every text to its max length
            tokenizer.no_truncation()
            ids = [i for text in validation_texts() for i in tokenizer.encode(text, add_special_tokens=False).ids]
        else:
            tokenizer = load_tokenizer(model_dir)
            ids = [i for text in validation_texts() for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
        if ids:
            return np.asarray(ids, dtype=np.int64)
    except Exception as exc:  # no tokenizer files (e.g. a bare .onnx anchor): ids from the vocabulary size
        log.debug("no tokenizer in %s (%s): random vocabulary ids", model_dir, exc)
    vocab = 30522
    try:
        vocab = int(json.loads((Path(model_dir) / "config.json").read_text()).get("vocab_size", vocab))
    except (OSError, ValueError):
        pass
    return np.random.default_rng(0).integers(1000, max(vocab, 1001), size=4096, dtype=np.int64)


def text_batch(stream: np.ndarray, batch: int, seq: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask): row i is a window of real text; rows after the first are padded to
    between 60% and 100% of `seq`, as a batch of texts of different lengths is."""
    ids = np.zeros((batch, seq), dtype=np.int64)
    mask = np.zeros((batch, seq), dtype=np.int64)
    reps = -(-(seq + batch * 7) // len(stream)) + 1
    tiled = np.tile(stream, reps)
    for row in range(batch):
        length = seq if row == 0 else max(1, int(seq * (1.0 - 0.4 * row / max(batch - 1, 1))))
        ids[row, :length] = tiled[row * 7: row * 7 + length]
        mask[row, :length] = 1
    return ids, mask


def _dims(shape: list[Any], batch: int, past: int, seq: int, input_len: int) -> tuple[int, ...]:
    """Concrete dims for a past_key_values / encoder_hidden_states input from its declared shape."""
    out = []
    for index, dim in enumerate(shape):
        if isinstance(dim, int) and dim > 0:
            out.append(dim)
        elif index == 0:
            out.append(batch)
        elif "encoder" in str(dim):
            out.append(seq)
        elif "past" in str(dim) or "sequence" in str(dim):
            out.append(past if "past" in str(dim) or "key" in str(dim) else input_len)
        else:
            out.append(past)
    return tuple(out)


def feed_for(session, ids: np.ndarray, mask: np.ndarray, past: int, seq: int,
             rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A feed for every graph input: token inputs from `ids`, caches of length `past`, encoder states of `seq`."""
    batch, length = ids.shape
    full_mask = np.concatenate([np.ones((batch, past), np.int64), mask], axis=1) if past else mask
    feed: dict[str, np.ndarray] = {}
    for spec in session.get_inputs():
        name, kind = spec.name, spec.type
        if name in ("input_ids", "decoder_input_ids"):
            value = ids
        elif name == "attention_mask":
            value = full_mask
        elif name == "encoder_attention_mask":
            value = np.ones((batch, seq), np.int64)
        elif name == "token_type_ids":
            value = np.zeros_like(ids)
        elif name == "position_ids":
            value = np.tile(np.arange(past, past + length, dtype=np.int64), (batch, 1))
        elif name == "cache_position":
            value = np.arange(past, past + length, dtype=np.int64)
        elif name == "use_cache_branch":
            value = np.array([past > 0])
        elif kind in _FLOAT:
            value = rng.standard_normal(_dims(list(spec.shape), batch, past, seq, length)).astype(_FLOAT[kind])
        else:
            from optpipe.errors import UnsupportedModelError

            raise UnsupportedModelError(f"the harness cannot feed the graph input {name!r} ({kind})")
        feed[name] = value.astype(_INT[kind]) if kind in _INT else value
    return feed


def _has_past(session) -> bool:
    return any(i.name.startswith("past_key_values") for i in session.get_inputs())


def workloads(model_path: Path, sessions: dict[str, Any], batch: int, seq: int) -> list[Workload]:
    """The workloads of one artifact (or bare .onnx) at (batch, seq), in a stable order."""
    model_dir = model_path if model_path.is_dir() else model_path.parent
    stream = token_stream(str(model_dir))
    ids, mask = text_batch(stream, batch, seq)
    rng = np.random.default_rng(0)
    one_ids, one_mask = ids[:, -1:].copy(), np.ones((batch, 1), np.int64)
    out: list[Workload] = []
    for component, session in sessions.items():
        if component.startswith("encoder"):
            out.append(Workload("encoder", component, batch, seq, feed_for(session, ids, mask, 0, seq, rng)))
        elif component == "decoder_with_past_model.onnx":
            out.append(Workload("decode", component, batch, seq, feed_for(session, one_ids, one_mask, seq, seq, rng)))
        elif component.startswith("decoder"):
            # Seq2seq's first decoder step: one start token against the encoded prompt.
            out.append(Workload("prefill", component, batch, seq, feed_for(session, one_ids, one_mask, 0, seq, rng)))
        elif _has_past(session):
            out.append(Workload("prefill", component, batch, seq, feed_for(session, ids, mask, 0, seq, rng)))
            out.append(Workload("decode", component, batch, seq, feed_for(session, one_ids, one_mask, seq, seq, rng)))
        else:
            out.append(Workload("forward", component, batch, seq, feed_for(session, ids, mask, 0, seq, rng)))
    return out
