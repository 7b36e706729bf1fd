"""Inputs shaped like real tokenized text for an artifact's graph inputs, and the workloads timed on them.

Encoders get one workload, "forward". Decoders with a KV cache are two workloads with different costs:
"prefill" (the whole prompt, empty cache) and "decode" (one new token against a cache of `seq` tokens).
Seq2seq artifacts add "encoder" for the encoder component.

Token inputs are windows of the built-in texts padded to a fixed `seq`, or, with seq REAL_SEQ (0, "real" on the
command line), a batch of held-out sentences at their own token lengths, padded to the longest of the batch as a
serving system batches them: the workload keeps its name, its `seq` is that padded length and its label "real".
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


# A `seq` that asks for real sentence lengths (real_batch) instead of a fixed padded length.
REAL_SEQ = 0
REAL = "real"
# Real texts are truncated as a tokenizer with truncation=True would be, at most to this many tokens.
REAL_MAX_LENGTH = 512


@dataclass(frozen=True)
class Workload:
    name: str  # forward | prefill | decode | encoder
    component: str
    batch: int
    seq: int  # the padded length fed (for a real-length batch: its longest text)
    feed: dict[str, np.ndarray]
    label: str = ""  # "real": held-out texts at their own lengths; "real-approx": lengths without a tokenizer
    lengths: tuple[int, ...] = ()  # real-length batches: each row's token count before padding
    new_tokens: int = 0  # "generate": greedy decode steps after the prompt (feed); a run's time is per token


def seq_value(value: int | str) -> int:
    """A sequence length as a caller, a target's [harness] table or the command line gives it: a whole number >= 1,
    or real lengths as the string "real" or the int REAL_SEQ (in text, "0" stays an error, as it always was)."""
    from optpipe.errors import InvalidOptionError

    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value == REAL_SEQ:
        return REAL_SEQ
    text = str(value).strip().lower()
    if text == REAL:
        return REAL_SEQ
    try:
        seq = int(text)
    except ValueError:
        seq = 0
    if seq < 1:
        raise InvalidOptionError(f"sequence length {value!r}: give a whole number >= 1, or 'real' for held-out "
                                 "sentences at their own lengths")
    return seq


def parse_seqs(text: str) -> list[int]:
    """`--seq 16,128,real` -> [16, 128, REAL_SEQ]."""
    from optpipe.errors import InvalidOptionError

    values = [seq_value(v) for v in str(text).split(",") if v.strip()]
    if not values:
        raise InvalidOptionError(f"{text!r}: give sequence lengths, comma-separated (e.g. 128,real)")
    return values


def seq_name(seq: int | str) -> str:
    """How a requested seq reads in progress lines and settings: "128", or "real"."""
    return REAL if seq_value(seq) == REAL_SEQ else str(seq)


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


def real_texts() -> tuple[str, ...]:
    """The held-out texts (never calibrated, validated or trained on); the validation texts if there are none."""
    from optpipe.data.texts import heldout_texts, validation_texts

    try:
        texts = heldout_texts()
    except (OSError, ValueError) as exc:  # a trimmed install without the held-out file
        log.debug("no held-out texts (%s): real lengths from the validation texts", exc)
        texts = ()
    return texts or validation_texts()


def real_pick(texts: tuple[str, ...] | list[str], batch: int) -> list[int]:
    """Indices of `batch` texts whose lengths spread as the whole set's do: with the texts ordered by length in
    characters, the ones at the quantiles (i + 0.5) / batch, so batch 1 is the median text and a larger batch holds
    short and long texts in the set's proportions (and its longest, which sets the padding, near the top quantile,
    as a random batch's is). Characters, not tokens: every artifact of a comparison gets the same texts whatever its
    tokenizer. The picked indices are returned in the set's order (arrival order); a batch larger than the set
    repeats texts."""
    order = sorted(range(len(texts)), key=lambda i: (len(texts[i]), i))
    return sorted(order[int((i + 0.5) * len(order) / batch)] for i in range(batch))


@functools.lru_cache(maxsize=16)
def real_batch(model_dir: str, batch: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(input_ids, attention_mask, label): real_pick's texts through the artifact's own tokenizer (truncated to
    REAL_MAX_LENGTH or the tokenizer's model_max_length, padded to the longest, on the tokenizer's padding side),
    exactly what `tokenizer(texts, padding=True, truncation=True, max_length=...)` returns. Label "real"; without
    a tokenizer, "real-approx": random vocabulary ids at word-count lengths (words * 4/3 + 2)."""
    texts = real_texts()
    picked = [texts[i] for i in real_pick(texts, batch)]
    try:
        tokenizer = load_tokenizer(model_dir)
        limit = min(REAL_MAX_LENGTH, int(tokenizer.model_max_length or REAL_MAX_LENGTH))
        enc = tokenizer(picked, padding=True, truncation=True, max_length=limit, return_tensors="np")
        return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64), REAL
    except Exception as exc:  # no tokenizer files (e.g. a bare .onnx anchor)
        log.debug("no tokenizer in %s (%s): real lengths approximated from word counts", model_dir, exc)
    lengths = [min(REAL_MAX_LENGTH, len(text.split()) * 4 // 3 + 2) for text in picked]
    stream = token_stream(model_dir)
    ids = np.zeros((batch, max(lengths)), np.int64)
    mask = np.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, :length] = np.resize(stream[row * 7:], length)
        mask[row, :length] = 1
    return ids, mask, "real-approx"


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


def workloads(model_path: Path, sessions: dict[str, Any], batch: int, seq: int | str,
              new_tokens: int = 0) -> list[Workload]:
    """The workloads of one artifact (or bare .onnx) at (batch, seq), in a stable order. seq REAL_SEQ (or "real"):
    real_batch's held-out texts at their own lengths; every workload's seq is then the batch's padded length.
    new_tokens > 0 adds "generate" to a decoder with a KV cache: that many greedy steps after a seq-token prompt."""
    model_path = Path(model_path)
    model_dir = model_path if model_path.is_dir() else model_path.parent
    label, lengths = "", ()
    seq = seq_value(seq)
    if seq == REAL_SEQ:
        ids, mask, label = real_batch(str(model_dir), batch)
        seq, lengths = ids.shape[1], tuple(int(n) for n in mask.sum(1))
    else:
        ids, mask = text_batch(token_stream(str(model_dir)), batch, seq)
    rng = np.random.default_rng(0)
    one_ids, one_mask = ids[:, -1:].copy(), np.ones((batch, 1), np.int64)
    out: list[Workload] = []

    def add(name: str, component: str, feed: dict[str, np.ndarray], steps: int = 0) -> None:
        out.append(Workload(name, component, batch, seq, feed, label, lengths, steps))

    needed = seq + (max(new_tokens, 1) if any(_has_past(s) or "decoder" in c for c, s in sessions.items()) else 0)
    limit = max_tokens(model_dir)
    if limit and needed > limit:
        from optpipe.errors import InvalidOptionError

        raise InvalidOptionError(f"--seq {seq}: {model_dir.name} takes at most {limit} tokens (its config's position "
                                 f"limit){', prompt and new tokens together' if needed > seq else ''}; use a shorter "
                                 "--seq")
    for component, session in sessions.items():
        if component.startswith("encoder"):
            add("encoder", component, feed_for(session, ids, mask, 0, seq, rng))
        elif component == "decoder_with_past_model.onnx":
            add("decode", component, feed_for(session, one_ids, one_mask, seq, seq, rng))
        elif component.startswith("decoder"):
            # Seq2seq's first decoder step: one start token against the encoded prompt.
            add("prefill", component, feed_for(session, one_ids, one_mask, 0, seq, rng))
        elif _has_past(session):
            add("prefill", component, feed_for(session, ids, mask, 0, seq, rng))
            add("decode", component, feed_for(session, one_ids, one_mask, seq, seq, rng))
            if new_tokens > 0:
                add("generate", component, feed_for(session, ids, mask, 0, seq, rng), new_tokens)
        else:
            add("forward", component, feed_for(session, ids, mask, 0, seq, rng))
    return out


def max_tokens(model_dir: Path) -> int | None:
    """The longest sequence the model's config allows (learned or cached rotary positions), None when it does not
    say (a bare .onnx, relative positions as in T5)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for key in ("max_position_embeddings", "n_positions"):
        if isinstance(config.get(key), int) and config[key] > 0:
            return config[key]
    return None


def pick_workload(works: list[Workload], name: str | None = None) -> Workload:
    """The workload called `name`. None: `decode` where there is one (a decoder's cost per generated token, what
    compare and check gate by default), else the first (forward; encoder of a seq2seq model without a decoder)."""
    from optpipe.errors import InvalidOptionError

    if name is None:
        return next((w for w in works if w.name == "decode"), works[0])
    found = next((w for w in works if w.name == name), None)
    if found is None:
        raise InvalidOptionError(f"--workload {name!r}: this artifact has {', '.join(w.name for w in works)}")
    return found


def next_step_feed(feed: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The feed of the next greedy step of a decoder with a KV cache: the argmax token, the mask one longer, the
    `present.*` outputs as `past_key_values.*`, positions after the cache."""
    token = outputs["logits"][:, -1].argmax(-1)[:, None].astype(feed["input_ids"].dtype)
    mask = feed["attention_mask"]
    nxt = {**feed, "input_ids": token,
           "attention_mask": np.concatenate([mask, np.ones((mask.shape[0], 1), mask.dtype)], axis=1)}
    nxt.update({name.replace("present", "past_key_values", 1): value for name, value in outputs.items()
                if name.startswith("present")})
    if "position_ids" in feed:
        nxt["position_ids"] = np.full((mask.shape[0], 1), mask.shape[1], feed["position_ids"].dtype)
    if "cache_position" in feed:
        nxt["cache_position"] = np.array([mask.shape[1]], feed["cache_position"].dtype)
    if "use_cache_branch" in feed:
        nxt["use_cache_branch"] = np.array([True])
    return nxt
