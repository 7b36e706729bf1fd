"""What a quantized graph holds: nodes in a keep-float role, nodes kept float and why, integer op counts."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from optpipe.passes.quantize import QuantizeConfig

GELU_OPS = {"Gelu", "BiasGelu", "FastGelu", "QuickGelu"}
INTEGER_OPS = {"MatMulInteger", "QAttention", "DynamicQuantizeMatMul", "QGemm", "QLinearMatMul", "ConvInteger",
               "QEmbedLayerNormalization", "DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear",
               "QLinearConv", "QLinearAdd", "QLinearMul", "MatMulIntegerToFloat", "GatherBlockQuantized"}

# Named groups of nodes a recipe can keep in float, with the reason recorded in the report.
KEEP_FLOAT_ROLES = {
    "ffn_output": "FFN down-projection: its input is post-GELU activations with outliers that per-tensor "
                  "uint8 activation quantization clips",
    "attention": "fused attention kept in float for fidelity",
    "lm_head": "the output projection (logits) is the most sensitive layer of a generator",
}


def nodes_in_role(model, role: str) -> list[str]:
    """Find the nodes of a keep_float role from the graph's structure, so it works for any naming."""
    producers = {out: node for node in model.graph.node for out in node.output}
    names = []
    for node in model.graph.node:
        if role == "ffn_output" and node.op_type == "MatMul":
            src = producers.get(node.input[0])
            if src is not None and (src.op_type in GELU_OPS or _is_unfused_gelu(src, producers)
                                    or _is_gated_activation(src, producers)):
                names.append(node.name)
        elif role == "attention" and node.op_type in ("Attention", "MultiHeadAttention"):
            names.append(node.name)
        elif role == "lm_head" and node.op_type in ("MatMul", "Gemm"):
            if any(out in {o.name for o in model.graph.output} for out in node.output):
                names.append(node.name)
    return names


def _is_gated_activation(node, producers) -> bool:
    # llama/qwen2/mistral MLP: down_proj(act(gate(x)) * up(x)); act is SiLU (x * Sigmoid(x)) or a GELU
    if node.op_type != "Mul":
        return False
    for name in node.input:
        parent = producers.get(name)
        if parent is None:
            continue
        if parent.op_type in GELU_OPS or parent.op_type == "Sigmoid" or _is_unfused_gelu(parent, producers):
            return True
        if parent.op_type == "Mul" and any(producers.get(i) is not None and producers[i].op_type == "Sigmoid"
                                           for i in parent.input):
            return True
    return False


def _is_unfused_gelu(node, producers) -> bool:
    # x * 0.5 * (1 + erf(x / sqrt 2)): the final Mul has an Add(Erf) two steps up
    if node.op_type != "Mul":
        return False
    for name in node.input:
        parent = producers.get(name)
        if parent is not None and parent.op_type in ("Mul", "Add"):
            for grand in parent.input:
                gp = producers.get(grand)
                if gp is not None and gp.op_type in ("Erf", "Tanh", "Add"):
                    return True
    return False


def unmatched_roles(model, config: QuantizeConfig) -> tuple[str, ...]:
    """The keep_float roles that match no node of this graph (the recipe asked for something it cannot do here)."""
    return tuple(role for role in config.keep_float if not nodes_in_role(model, role))


def float_exclusions(model, config: QuantizeConfig) -> dict[str, str]:
    """Node name -> why it stays in float."""
    excluded: dict[str, str] = {}
    for role in config.keep_float:
        for name in nodes_in_role(model, role):
            excluded[name] = KEEP_FLOAT_ROLES[role]
    for node in model.graph.node:
        # QAttention needs a bias input; attention fused from a bias-free model (T5) has none
        if node.op_type == "Attention" and (len(node.input) < 3 or not node.input[2]):
            excluded.setdefault(node.name, "fused Attention without bias: QAttention requires one")
    if config.exclude_nodes:
        patterns = [re.compile(p) for p in config.exclude_nodes]
        for node in model.graph.node:
            if node.name in config.exclude_nodes or any(p.fullmatch(node.name) for p in patterns):
                excluded.setdefault(node.name, "excluded by the recipe (exclude_nodes)")
    return excluded


KEPT_FLOAT_METADATA = "optpipe.kept_float"


def stamp_kept_float(path, kept: dict[str, str]) -> None:
    """Record in the model which nodes stay float and why, so graph checks can tell a choice from a miss."""
    import json

    import onnx

    model = onnx.load(str(path), load_external_data=False)
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props},
                                        KEPT_FLOAT_METADATA: json.dumps(kept, sort_keys=True)})
    onnx.save(model, str(path))


def recorded_kept_float(model) -> dict[str, str]:
    """The kept-float nodes a quantize pass recorded in the model (empty when none were recorded)."""
    import json

    for prop in model.metadata_props:
        if prop.key == KEPT_FLOAT_METADATA:
            return json.loads(prop.value)
    return {}


def integer_op_counts(model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in INTEGER_OPS:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


# Ops that are themselves an integer computation (dynamic / QOperator); QDQ graphs count DQ-fed MatMuls instead.
_INTEGER_COMPUTE = {"MatMulInteger", "QAttention", "QGemm", "QLinearMatMul", "QLinearConv", "ConvInteger",
                    "QEmbedLayerNormalization", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "GatherBlockQuantized"}


def quantized_node_count(model) -> int:
    """Nodes computing on int8 weights: integer ops, plus MatMul/Gemm whose weight comes from a DequantizeLinear."""
    producers = {out: node.op_type for node in model.graph.node for out in node.output}
    count = 0
    for node in model.graph.node:
        if node.op_type in _INTEGER_COMPUTE:
            count += 1
        elif node.op_type in ("MatMul", "Gemm") and producers.get(node.input[1]) == "DequantizeLinear":
            count += 1
    return count


def float_matmuls(model, excluded: dict[str, str]) -> dict[str, int]:
    """Why each MatMul/Gemm left in float stayed there, counted by reason (onnxruntime only logs it)."""
    initializers = {init.name for init in model.graph.initializer}
    producers = {out: node.op_type for node in model.graph.node for out in node.output}
    reasons: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or producers.get(node.input[1]) == "DequantizeLinear":
            continue
        if node.name in excluded:
            why = f"kept float: {excluded[node.name]}"
        elif node.input[1] not in initializers and producers.get(node.input[1]) != "Constant":
            why = "both inputs are activations (attention scores, or a weight behind a Transpose: tied lm_head)"
        else:
            why = "not selected by onnxruntime's quantizer"
        reasons[why] = reasons.get(why, 0) + 1
    return reasons
