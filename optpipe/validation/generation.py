"""Fidelity of generators (causal LM, seq2seq) against PyTorch: next-token agreement, perplexity ratio on the
validation texts (teacher-forced; held out from calibration), and greedy generation.

The artifact is driven through Optimum's ORTModelFor... classes, the same way a user loads it, so the KV-cache
inputs of every decoder component are fed as Optimum feeds them.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from optpipe.passbase import track
from optpipe.source import load_tokenizer, model_inputs

log = logging.getLogger("optpipe.validation.generation")

BATCH = 8
MAX_LENGTH = 64
GREEDY_PROMPTS = 3
GREEDY_TOKENS = 16


def _ort_model(run, cls_name: str):
    import optimum.onnxruntime as ort_models

    cls = getattr(ort_models, cls_name)
    kwargs: dict[str, Any] = {}
    if cls_name == "ORTModelForSeq2SeqLM":
        # the export pass keeps the two plain decoders (see passes/export.py); say so rather than let Optimum search
        kwargs["use_merged"] = (run.files.path / "decoder_model_merged.onnx").is_file()
    provider = run.extra.get("provider", "CPUExecutionProvider")
    if run.extra.get("session_options"):  # the target's session config entries (e.g. session.x64quantprecision)
        from optpipe.session import session_options

        kwargs["session_options"] = session_options(extra=run.extra["session_options"])
    return cls.from_pretrained(run.files.path, use_cache=True, provider=provider,
                               provider_options=run.extra.get("provider_options") or None, **kwargs)


def _greedy_kwargs(tokenizer) -> dict[str, Any]:
    # min_new_tokens makes every prompt produce all 16 tokens, so an early eos cannot hide a divergence.
    return {"max_new_tokens": GREEDY_TOKENS, "min_new_tokens": GREEDY_TOKENS, "do_sample": False, "num_beams": 1,
            "pad_token_id": tokenizer.pad_token_id}


def _agreement(ref: np.ndarray, out: np.ndarray, mask: np.ndarray) -> tuple[int, int, float]:
    """(positions agreeing on top-1, positions compared, max abs logit diff) over mask == 1."""
    keep = mask.astype(bool)
    agree = int((ref.argmax(-1) == out.argmax(-1))[keep].sum())
    diff = float(np.abs(ref - out)[keep].max()) if keep.any() else 0.0
    return agree, int(keep.sum()), diff


def _nll(logits: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
    """Summed negative log-likelihood of `labels` (-100: not scored) under `logits`, and how many were scored."""
    keep = labels >= 0
    if not keep.any():
        return 0.0, 0
    picked = logits[keep].astype(np.float64)
    top = picked.max(-1, keepdims=True)
    log_z = (top[:, 0] + np.log(np.exp(picked - top).sum(-1)))
    return float((log_z - picked[np.arange(len(picked)), labels[keep]]).sum()), int(keep.sum())


def _batches(texts, size: int = BATCH):
    for start in range(0, len(texts), size):
        yield list(texts[start:start + size])


def _greedy_match(generate_ref, generate_out, prompts: list[dict[str, Any]], progress=None) -> dict[str, float]:
    exact, tokens_equal, tokens = 0, 0, 0
    for enc in track(prompts, "generating", progress, unit="prompt"):
        ref = generate_ref(enc)[0].tolist()
        out = generate_out(enc)[0].tolist()
        exact += int(ref == out)
        tokens_equal += sum(int(a == b) for a, b in zip(ref[-GREEDY_TOKENS:], out[-GREEDY_TOKENS:]))
        tokens += GREEDY_TOKENS
        if ref != out:
            log.info("greedy generation differs: pytorch %s vs onnx %s", ref[-GREEDY_TOKENS:], out[-GREEDY_TOKENS:])
    return {"greedy_match": exact / len(prompts), "greedy_token_agreement": tokens_equal / tokens}


def _compare(run, model, ort_model, tokenizer, forward_inputs, prompt_args: dict[str, Any]) -> dict[str, float]:
    """Top-1 agreement of the two models' logits and their perplexity on the validation texts (`forward_inputs` turns a
    tokenized batch into the model inputs, the mask of positions to compare and the next-token labels), then greedy
    generation from a few prompts."""
    import torch

    agree = total = scored = 0
    max_diff = nll_ref = nll_out = 0.0
    for batch in track(list(_batches(run.texts)), "validating", run.progress, unit="batch"):
        enc = tokenizer(batch, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt",
                        return_token_type_ids=False)
        inputs, mask, labels = forward_inputs(enc)
        inputs = model_inputs(model, inputs)
        with torch.no_grad():
            ref = model(**inputs).logits.numpy()
            out = ort_model(**inputs).logits.numpy()
        a, n, d = _agreement(ref, out, mask.numpy())
        agree, total, max_diff = agree + a, total + n, max(max_diff, d)
        (r, count), (o, _) = _nll(ref, labels.numpy()), _nll(out, labels.numpy())
        nll_ref, nll_out, scored = nll_ref + r, nll_out + o, scored + count
    prompts = [tokenizer(text, return_tensors="pt", truncation=True, return_token_type_ids=False, **prompt_args)
               for text in run.texts[:GREEDY_PROMPTS]]
    kwargs = _greedy_kwargs(tokenizer)
    with torch.no_grad():
        greedy = _greedy_match(lambda e: model.generate(**e, **kwargs), lambda e: ort_model.generate(**e, **kwargs),
                               prompts, run.progress)
    perplexity = float(np.exp(nll_ref / scored))
    return {"next_token_agreement": agree / total, "max_abs_diff": max_diff, "perplexity": perplexity,
            "perplexity_ratio": float(np.exp((nll_out - nll_ref) / scored)), **greedy}


def text_generation(run) -> dict[str, float]:
    """Causal LM: next-token top-1 over every non-pad position of the validation texts, then greedy generation."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(run.source.path)
    tokenizer.padding_side = "right"  # right padding leaves every real position's logits unchanged
    model = AutoModelForCausalLM.from_pretrained(run.source.path).eval()

    def forward_inputs(enc):
        ids, mask = enc["input_ids"], enc["attention_mask"]
        labels = torch.full_like(ids, -100)  # position t predicts token t + 1; the last real token predicts nothing
        labels[:, :-1] = torch.where(mask[:, 1:].bool(), ids[:, 1:], -100)
        return {"input_ids": ids, "attention_mask": mask}, mask, labels

    return _compare(run, model, _ort_model(run, "ORTModelForCausalLM"), tokenizer, forward_inputs,
                    {"max_length": 16, "add_special_tokens": False})


def text2text_generation(run) -> dict[str, float]:
    """Seq2seq: decoder next-token top-1 given the encoder output (teacher forcing on the text itself), then greedy."""
    import torch
    from transformers import AutoModelForSeq2SeqLM

    tokenizer = load_tokenizer(run.source.path)
    tokenizer.padding_side = "right"
    model = AutoModelForSeq2SeqLM.from_pretrained(run.source.path).eval()
    start = model.config.decoder_start_token_id

    def forward_inputs(enc):
        # decoder input: start token + the text, so every position predicts a real next token
        dec_ids = torch.cat([torch.full_like(enc["input_ids"][:, :1], start), enc["input_ids"][:, :-1]], dim=1)
        dec_mask = torch.cat([torch.ones_like(enc["attention_mask"][:, :1]), enc["attention_mask"][:, :-1]], dim=1)
        labels = torch.where(enc["attention_mask"].bool(), enc["input_ids"], -100)  # position t predicts text token t
        return ({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "decoder_input_ids": dec_ids},
                dec_mask, labels)

    return _compare(run, model, _ort_model(run, "ORTModelForSeq2SeqLM"), tokenizer, forward_inputs,
                    {"max_length": MAX_LENGTH})
