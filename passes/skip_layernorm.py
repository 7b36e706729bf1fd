"""Split SkipLayerNormalization back into Add + Sum + LayerNormalization for ONNX Runtime's CPU provider.

Measured with onnxruntime 1.32 on CPU (one 1x128x384 node, as in all-MiniLM-L6-v2, one thread): the contrib
SkipLayerNormalization kernel takes about 220 us, while Add + Add + the standard LayerNormalization take 36 us
for the same result (bench/results/encoder-int8-*.txt). In the INT8 MiniLM that made the 12 SkipLayerNormalization
nodes 27% of the run. The residual is written as `Sum`, not `Add`: ONNX Runtime's own SkipLayerNormFusion
matches Add -> LayerNormalization at session creation and would put the slow kernel back; it does not match
Sum, so the artifact is fast in any ONNX Runtime session, with no session option to carry.

SkipSimplifiedLayerNormalization (RMSNorm, decoders) is left alone: its kernel is 2x slower than Sum +
SimplifiedLayerNormalization on a 128-token prefill but equal on the one-token decode step that dominates.
"""

from __future__ import annotations

from typing import Any

SPLIT_OP = "SkipLayerNormalization"


def split_skip_layernorm(model: Any) -> int:
    """Rewrite every SkipLayerNormalization of `model` (an onnx.ModelProto) in place; returns how many.

    SkipLayerNormalization(input, skip, gamma, beta?, bias?) -> (output, mean?, inv_std?, input_skip_bias_sum?)
    becomes Add(input, bias) -> Sum(., skip) -> LayerNormalization(., gamma, beta). A node whose mean or
    inv_std output is used is kept, and so is every node of a graph below opset 17 (no LayerNormalization op)."""
    from onnx import helper

    graph = model.graph
    if _onnx_opset(model) < 17:  # LayerNormalization is opset 17; raising the opset could change other ops
        return 0
    used = {name for node in graph.node for name in node.input} | {out.name for out in graph.output}
    nodes, split = [], 0
    for node in graph.node:
        outputs = list(node.output) + [""] * (4 - len(node.output))
        if node.op_type != SPLIT_OP or node.domain != "com.microsoft" or used & {o for o in outputs[1:3] if o}:
            nodes.append(node)
            continue
        x, skip, gamma, beta, bias = (list(node.input) + [""] * 5)[:5]
        epsilon = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-12)
        prefix = node.name or f"skip_layernorm_{split}"
        if bias:
            nodes.append(helper.make_node("Add", [x, bias], [f"{prefix}_biased"], name=f"{prefix}_bias"))
            x = f"{prefix}_biased"
        summed = outputs[3] or f"{prefix}_sum"
        nodes.append(helper.make_node("Sum", [x, skip], [summed], name=f"{prefix}_residual"))
        nodes.append(helper.make_node("LayerNormalization", [summed, gamma] + ([beta] if beta else []),
                                      [outputs[0]], name=f"{prefix}_layernorm", axis=-1, epsilon=epsilon))
        split += 1
    if split:
        del graph.node[:]
        graph.node.extend(nodes)
    return split


def _onnx_opset(model: Any) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
