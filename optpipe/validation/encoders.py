"""Fidelity of encoders (feature extraction, classification) against the original PyTorch model, on built-in
varied texts."""

from __future__ import annotations

import numpy as np

from optpipe.errors import UnsupportedModelError
from optpipe.passbase import track
from optpipe.source import load_tokenizer, model_inputs
from optpipe.validation.runner import Runner

BATCH = 8
MAX_LENGTH = 128


def _batches(texts: tuple[str, ...], size: int = BATCH):
    for start in range(0, len(texts), size):
        yield list(texts[start:start + size])


def _feed(session, encoded: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    feed = {}
    for spec in session.get_inputs():
        if spec.name in encoded:
            feed[spec.name] = encoded[spec.name].astype(np.int64)
        elif spec.name == "token_type_ids":
            feed[spec.name] = np.zeros_like(encoded["input_ids"], dtype=np.int64)
        else:
            raise UnsupportedModelError(f"validation cannot feed the graph input {spec.name!r}")
    return feed


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)


def feature_extraction(run: Runner) -> dict[str, float]:
    import torch
    from transformers import AutoModel

    tokenizer = load_tokenizer(run.source.path)
    model = AutoModel.from_pretrained(run.source.path).eval()
    session = run.session(run.files.path / run.files.components[0])
    cosines, max_diff = [], 0.0
    for batch in track(list(_batches(run.texts)), "validating", run.progress, unit="batch"):
        enc = tokenizer(batch, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="np")
        with torch.no_grad():
            ref = model(**model_inputs(model, enc)).last_hidden_state.numpy()
        out = session.run(None, _feed(session, enc))[0]
        mask = enc["attention_mask"][..., None].astype(np.float32)
        pooled_ref = (ref * mask).sum(1) / mask.sum(1)
        pooled_out = (out * mask).sum(1) / mask.sum(1)
        cosines.extend(_cosine(pooled_ref, pooled_out).tolist())
        max_diff = max(max_diff, float(np.abs((ref - out) * mask).max()))
    return {"mean_cosine": float(np.mean(cosines)), "min_cosine": float(np.min(cosines)), "max_abs_diff": max_diff}


def _classification(run: Runner, per_token: bool) -> dict[str, float]:
    """Top-1 label agreement (per text, or per real token) and the max abs diff of the logits."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    tokenizer = load_tokenizer(run.source.path)
    auto = AutoModelForTokenClassification if per_token else AutoModelForSequenceClassification
    model = auto.from_pretrained(run.source.path).eval()
    session = run.session(run.files.path / run.files.components[0])
    agree = total = 0
    max_diff = 0.0
    for batch in track(list(_batches(run.texts)), "validating", run.progress, unit="batch"):
        enc = tokenizer(batch, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="np")
        with torch.no_grad():
            ref = model(**model_inputs(model, enc)).logits.numpy()
        out = session.run(["logits"], _feed(session, enc))[0]
        # per text, every row counts; per token, only real (non-pad) tokens do
        keep = enc["attention_mask"].astype(bool) if per_token else np.ones(len(batch), dtype=bool)
        agree += int((ref.argmax(-1) == out.argmax(-1))[keep].sum())
        total += int(keep.sum())
        max_diff = max(max_diff, float(np.abs(ref - out)[keep].max()))
    return {"top1_agreement": agree / total, "max_abs_diff": max_diff}


def text_classification(run: Runner) -> dict[str, float]:
    return _classification(run, per_token=False)


def token_classification(run: Runner) -> dict[str, float]:
    return _classification(run, per_token=True)
