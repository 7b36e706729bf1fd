"""Outlier channels of the FFN, computed apart in float so that every FFN GEMM can run in INT8.

The FFN down-projection reads GELU outputs in which one or two of ~1,500 channels are 4-6x larger than all
the others (all-MiniLM-L6-v2 on the calibration texts: 24.7 in layer 0 where the 99th percentile of channel
maxima is 4.6). Dynamic INT8 quantizes an activation with one uint8 scale per tensor, so those channels set
the step for all of them and the small values are lost: quantizing the down-projections costs 0.02 of the
worst-case cosine, which is why earlier recipes kept them in float (a quarter of the INT8 speed).

Here the few outlier channels j leave the INT8 path exactly: column j of the up-projection weight, its bias
and row j of the down-projection weight become zero, so the INT8 GEMMs see GELU(0) = 0 in channel j, and a
side path computes them in float: x @ Wu[:, j] (+ b[j]) -> the same activation -> @ Wd[j, :], added to the
down-projection's output. The result equals the original graph in float; the side path is a 384 x k GEMM for
k channels. Unlike SmoothQuant (per-channel scales moved into the weights), nothing is added on the full
128 x 1536 activation, and the weights' quantization ranges are untouched.

Channels are chosen on the calibration texts, per FFN: calibration max above `ratio` times the 99th
percentile of the FFN's channel maxima, at most `max_channels` of them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

# activations f with f(0) = 0, so a zeroed channel stays exactly zero after them
ZERO_PRESERVING = {"Gelu", "BiasGelu", "FastGelu", "QuickGelu", "Relu"}
SIDE_SUFFIX = "_outliers"


@dataclass
class Ffn:
    up: Any  # MatMul(x, Wu)
    bias_node: Any | None  # Add(up, b) before the activation, or None
    bias: str | None  # initializer name of the bias (inside BiasGelu / FastGelu, or of bias_node)
    act: Any
    down: Any  # MatMul(act, Wd)


def find_ffns(model) -> tuple[list[Ffn], list[str]]:
    """The FFN blocks MatMul -> [Add bias] -> activation -> MatMul with float weights used only there; and why
    other down-projection candidates were not taken."""
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    inits = {i.name for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    ffns, skipped = [], []
    for down in graph.node:
        act = producers.get(down.input[0]) if down.op_type == "MatMul" else None
        if act is None or act.op_type not in ZERO_PRESERVING:
            continue
        bias_node, bias = None, None
        head = producers.get(act.input[0])
        if act.op_type in ("BiasGelu", "FastGelu") and len(act.input) > 1 and act.input[1]:
            bias = act.input[1]
        elif head is not None and head.op_type == "Add" and any(i in inits for i in head.input):
            bias_node, bias = head, next(i for i in head.input if i in inits)
            head = producers.get(next(i for i in head.input if i != bias))
        own = [act.input[0], down.input[0]]  # activations; shared weights are copied (exporters dedupe equal ones)
        if down.output[0] in outputs:
            skipped.append(f"{down.name}: its output is a graph output")
        elif head is None or head.op_type != "MatMul" or head.input[1] not in inits or down.input[1] not in inits:
            skipped.append(f"{down.name}: not MatMul -> [bias] -> {act.op_type} -> MatMul with weight initializers")
        elif (bias and bias not in inits) or any(uses.get(name, 0) != 1 for name in own):
            skipped.append(f"{down.name}: its activations are shared with other nodes")
        else:
            ffns.append(Ffn(head, bias_node, bias, act, down))
    return ffns, skipped


def activation_maxima(model, ffns: list[Ffn], batches: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """Per FFN, the largest |activation| of each channel over the calibration batches (padding included: the
    runtime quantizes padded positions with the rest)."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    names = [f.down.input[0] for f in ffns]
    for name in names:
        probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep the probed tensors
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    maxima: list[np.ndarray | None] = [None] * len(names)
    for feed in batches:
        for k, value in enumerate(session.run(names, feed)):
            peak = np.abs(value.reshape(-1, value.shape[-1])).max(0)
            maxima[k] = peak if maxima[k] is None else np.maximum(maxima[k], peak)
    return [m for m in maxima if m is not None]


def choose(maxima: np.ndarray, ratio: float, max_channels: int) -> np.ndarray:
    limit = ratio * float(np.percentile(maxima, 99))
    order = np.argsort(maxima)[::-1][:max_channels]
    return np.sort(order[maxima[order] > limit])


def split_outliers(model, batches, ratio: float, max_channels: int) -> tuple[dict[str, dict], list[str], list[str]]:
    """Rewrite `model` in place. Returns {down-projection: {channels, max, p99}}, why FFNs were skipped, and the
    side path's MatMuls (to keep in float)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    ffns, skipped = find_ffns(model)
    inits = {i.name: i for i in graph.initializer}
    report: dict[str, dict] = {}
    side_nodes: dict[str, list] = {}
    for ffn, maxima in zip(ffns, activation_maxima(model, ffns, batches) if ffns else []):
        idx = choose(maxima, ratio, max_channels)
        if not len(idx):
            continue
        report[ffn.down.name] = {"channels": [int(i) for i in idx],
                                 "max": [round(float(maxima[i]), 3) for i in idx],
                                 "p99": round(float(np.percentile(maxima, 99)), 3)}
        p = ffn.down.name + SIDE_SUFFIX
        _own_initializers(graph, ffn, p, inits)
        wu, wd = (numpy_helper.to_array(inits[n]).copy() for n in (ffn.up.input[1], ffn.down.input[1]))
        graph.initializer.extend([numpy_helper.from_array(wu[:, idx].copy(), p + "_wu"),
                                  numpy_helper.from_array(wd[idx, :].copy(), p + "_wd")])
        wu[:, idx], wd[idx, :] = 0, 0
        updates = {ffn.up.input[1]: wu, ffn.down.input[1]: wd}
        nodes = [helper.make_node("MatMul", [ffn.up.input[0], p + "_wu"], [p + "_h"], name=p + "_up")]
        hidden = p + "_h"
        if ffn.bias:
            b = numpy_helper.to_array(inits[ffn.bias]).copy()
            graph.initializer.append(numpy_helper.from_array(b[..., idx].copy(), p + "_b"))
            b[..., idx] = 0
            updates[ffn.bias] = b
            if ffn.bias_node is not None:
                nodes.append(helper.make_node("Add", [hidden, p + "_b"], [p + "_hb"], name=p + "_bias"))
                hidden = p + "_hb"
        act_inputs = [hidden] + ([p + "_b"] if ffn.bias and ffn.bias_node is None else [])
        act = helper.make_node(ffn.act.op_type, act_inputs, [p + "_a"], name=p + "_act", domain=ffn.act.domain)
        act.attribute.extend(ffn.act.attribute)
        nodes += [act, helper.make_node("MatMul", [p + "_a", p + "_wd"], [p + "_y"], name=p + "_down")]
        for name, value in updates.items():
            inits[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
        anchor = _merge(graph, ffn.down, p, nodes, set(inits))
        side_nodes[anchor] = side_nodes.get(anchor, []) + nodes
    ordered = []
    for node in graph.node:
        ordered.append(node)
        ordered.extend(side_nodes.get(node.output[0], ()) if node.output else ())
    del graph.node[:]
    graph.node.extend(ordered)
    return report, skipped, [n.name for nodes in side_nodes.values() for n in nodes if n.op_type == "MatMul"]



def _merge(graph, down, prefix: str, nodes: list, inits: set[str]) -> str:
    """Add the side path's output `prefix_y` to the down-projection's, where it costs least; returns the node the
    side path is placed after (by its first output). Past the bias Add (so ONNX Runtime still fuses that Add into
    the INT8 GEMM) and, when a Sum follows (the residual, passes/skip_layernorm.py), as one more Sum input: no extra
    node at all."""
    from onnx import helper

    def consumers(name: str) -> list:
        return [n for n in graph.node if name in n.input]

    anchor, tail = down, down.output[0]
    after = consumers(tail)
    if len(after) == 1 and after[0].op_type == "Add" and any(i in inits for i in after[0].input):
        anchor, tail = after[0], after[0].output[0]
        after = consumers(tail)
    if len(after) == 1 and after[0].op_type == "Sum":
        after[0].input.append(prefix + "_y")
        return anchor.output[0]
    nodes.append(helper.make_node("Add", [tail, prefix + "_y"], [prefix + "_sum"], name=prefix + "_add"))
    for node in after:
        node.input[:] = [prefix + "_sum" if i == tail else i for i in node.input]
    return anchor.output[0]


def _own_initializers(graph, ffn: Ffn, prefix: str, inits: dict) -> None:
    """Give the FFN private copies of the weights and bias it is about to change when other nodes use them too
    (exporters store equal tensors once, e.g. the zero biases of a freshly initialized model)."""
    uses = Counter(name for node in graph.node for name in node.input)
    bias_owner = ffn.bias_node if ffn.bias_node is not None else ffn.act
    slots = [(ffn.up, 1, "wu_own"), (ffn.down, 1, "wd_own")]
    if ffn.bias:
        slots.append((bias_owner, list(bias_owner.input).index(ffn.bias), "b_own"))
    for node, index, role in slots:
        name = node.input[index]
        if uses[name] > 1:
            copy = graph.initializer.add()
            copy.CopyFrom(inits[name])
            copy.name = f"{prefix}_{role}"
            inits[copy.name] = copy
            node.input[index] = copy.name
            if node is bias_owner and name == ffn.bias:
                ffn.bias = copy.name
