"""Which decoder layers weight-only quantization hurts most, measured: the mixed precision of `weight_only`.

`weight_only.sensitivity_fallback = N` quantizes each decoder layer's linears alone (every other MatMul float; a
graph whose node names carry no layer index is measured node by node), runs the graph's prefill on calibration
texts and scores the layer by the mean KL divergence of its next-token distributions from the float graph's. The N
layers with the largest scores keep their linears float; the pass report lists every layer's score, and the
manifest's `kept_float` names the kept layers with theirs.

Why whole layers and KL: a layer is the unit the error compounds through (SmolLM2-135M: its first three layers
float take the largest logit error from 11.8 to 3.0), one quantized graph per layer keeps the cost to L sessions,
and KL sees a shift of the whole distribution before it flips a top-1 token. The texts are the calibration texts,
never the validation ones, so the gate that follows stays an independent check.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable

import numpy as np

LAYER = re.compile(r"(?:layers|layer|h|blocks?)[./](\d+)[./]")  # model.layers.3.mlp…, /transformer/h.3/…
MAX_TOKENS = 64  # per text: the validation's length


def sensitivity_groups(nodes: Iterable[str]) -> dict[str, list[str]]:
    """Decoder layer ("layer 3") -> its MatMul nodes, from the layer index in their names. Where no name carries
    one (ONNX Runtime's gpt2 fusion renames them FullyConnect_MatMul_N), every node is a group of its own."""
    layers: dict[int, list[str]] = {}
    nodes = list(nodes)
    for name in nodes:
        found = LAYER.search(name)
        if found:
            layers.setdefault(int(found.group(1)), []).append(name)
    if layers:
        return {f"layer {index}": layers[index] for index in sorted(layers)}
    return {name: [name] for name in nodes}


def group_scores(model, groups: dict[str, list[str]], quantize: Callable, token_ids: list[list[int]],
                 progress: Callable[[str], None]) -> dict[str, float]:
    """Mean next-token KL(float || one group quantized) over every position of `token_ids`, per group."""
    reference = [_log_softmax(x) for x in _logits(model, token_ids)]
    scores = {}
    for done, (label, nodes) in enumerate(groups.items(), 1):
        quantized = quantize(copy.deepcopy(model), nodes)
        kl = [float((np.exp(p) * (p - _log_softmax(q))).sum(-1).mean())
              for p, q in zip(reference, _logits(quantized, token_ids))]
        scores[label] = float(np.mean(kl))
        if done % 5 == 0 or done == len(groups):
            progress(f"  sensitivity: {done}/{len(groups)} quantized alone")
    return scores


def most_sensitive(scores: dict[str, float], count: int) -> list[str]:
    """The `count` groups of largest score, in the graph's order."""
    top = set(sorted(scores, key=lambda label: -scores[label])[:count])
    return [label for label in scores if label in top]


def calibration_ids(tokenizer, texts: Iterable[str], count: int) -> list[list[int]]:
    ids = [tokenizer(text, truncation=True, max_length=MAX_TOKENS)["input_ids"] for text in texts]
    return [row for row in ids if len(row) > 1][:count]


def _logits(model, token_ids: list[list[int]]) -> list[np.ndarray]:
    import onnxruntime as ort

    from optpipe.perf.inputs import feed_for
    from optpipe.session import session_options

    # in memory (the caller checked it fits one protobuf): one graph per group, none of them written to disk
    session = ort.InferenceSession(model.SerializeToString(), session_options(spinning="off"),
                                   providers=["CPUExecutionProvider"])
    out_name = "logits" if "logits" in [o.name for o in session.get_outputs()] else session.get_outputs()[0].name
    rng = np.random.default_rng(0)
    out = []
    for row in token_ids:
        ids = np.array([row], dtype=np.int64)
        feed = feed_for(session, ids, np.ones_like(ids), past=0, seq=ids.shape[1], rng=rng)
        out.append(session.run([out_name], feed)[0][0].astype(np.float64))
    return out


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
