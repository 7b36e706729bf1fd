"""What a target promises about its final graph, checked on the file: float16 where expected, float32 I/O, QDQ
placement and symmetric zero points for TensorRT. These need no GPU, so they run wherever the artifact is built."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from optpipe.passbase import ModelFiles

log = logging.getLogger("optpipe.validation.graph_checks")

# The float16 pass leaves some initializers float32 (those feeding ops kept float32, e.g. LayerNorm's epsilon
# paths or position ids); weights must still be overwhelmingly float16 by bytes.
MIN_FLOAT16_SHARE = 0.9
QOPERATOR_OPS = {"QLinearMatMul", "MatMulInteger", "DynamicQuantizeLinear", "QAttention", "QLinearAdd",
                 "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QGemm"}


@dataclass(frozen=True)
class GraphCheck:
    facts: dict[str, Any] = field(default_factory=dict)
    failures: tuple[str, ...] = ()


def _initializer_bytes(model) -> dict[str, int]:
    from onnx import TensorProto, numpy_helper

    sizes: dict[str, int] = {}
    for init in model.graph.initializer:
        name = TensorProto.DataType.Name(init.data_type)
        sizes[name] = sizes.get(name, 0) + numpy_helper.to_array(init).nbytes
    return sizes


def _io_types(model) -> dict[str, str]:
    from onnx import TensorProto

    inits = {i.name for i in model.graph.initializer}
    return {v.name: TensorProto.DataType.Name(v.type.tensor_type.elem_type)
            for v in (*model.graph.input, *model.graph.output) if v.name not in inits}


def check_fp16(model, component: str, keep_io_types: bool = True) -> tuple[dict[str, Any], list[str]]:
    sizes = _initializer_bytes(model)
    floats = sizes.get("FLOAT16", 0) + sizes.get("FLOAT", 0)
    share = sizes.get("FLOAT16", 0) / floats if floats else 0.0
    io = _io_types(model)
    facts = {"initializer_bytes": sizes, "float16_share": round(share, 4), "io_types": io}
    failures = []
    if share < MIN_FLOAT16_SHARE:
        failures.append(f"{component}: only {share:.0%} of float weight bytes are float16 "
                        f"(expected >= {MIN_FLOAT16_SHARE:.0%})")
    if keep_io_types:
        half = sorted(name for name, kind in io.items() if kind == "FLOAT16")
        if half:
            failures.append(f"{component}: graph inputs/outputs {', '.join(half)} are float16, expected float32")
    return facts, failures


def _constant(model, name: str):
    from onnx import numpy_helper

    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in model.graph.node:  # zero points may also be Constant nodes
        if node.op_type == "Constant" and name in node.output:
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
    return None


def check_qdq(model, component: str, op_types: tuple[str, ...] = ("MatMul",), symmetric_activations: bool = True,
              symmetric_weights: bool = True, kept_float: tuple[str, ...] = ()) -> tuple[dict[str, Any], list[str]]:
    """Every quantizable op (bar those kept float) reads its inputs through DequantizeLinear; zero points are int8 0.

    TensorRT's explicit quantization supports only symmetric signed INT8: a non-zero or uint8 zero point makes
    it reject the Q/DQ node.
    """
    initializers = {init.name for init in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    targets = [n for n in model.graph.node if n.op_type in op_types]
    quantized, unquantized = [], []
    for node in targets:
        # Inputs fed by DQ, or weights stored float (then not quantized); constants through Q/DQ count as fed.
        fed = [producers.get(name) is not None and producers[name].op_type == "DequantizeLinear"
               for name in node.input[:2]]
        (quantized if all(fed) else unquantized).append(node.name)
    unexpected = sorted(set(unquantized) - set(kept_float))
    q_nodes = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    dq_nodes = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    bad_zero_points: list[str] = []
    for node in q_nodes + dq_nodes:
        is_weight = node.op_type == "DequantizeLinear" and node.input[0] in initializers
        if not (symmetric_weights if is_weight else symmetric_activations):
            continue
        if len(node.input) < 3 or not node.input[2]:
            continue  # no zero point means 0 of type uint8 for Q, but ORT's QDQ always writes one
        zero_point = _constant(model, node.input[2])
        if zero_point is None or zero_point.dtype.name != "int8" or zero_point.any():
            kind = "missing" if zero_point is None else f"{zero_point.dtype.name} {zero_point.ravel()[:4].tolist()}"
            bad_zero_points.append(f"{node.name or node.output[0]} ({kind})")
    qoperator = sorted({n.op_type for n in model.graph.node if n.op_type in QOPERATOR_OPS})
    facts = {"quantize_linear": len(q_nodes), "dequantize_linear": len(dq_nodes),
             f"{'/'.join(op_types)}_quantized": len(quantized), f"{'/'.join(op_types)}_float": len(unquantized),
             "nonsymmetric_zero_points": len(bad_zero_points), "qoperator_ops": qoperator}
    failures = []
    if not quantized:
        failures.append(f"{component}: no {'/'.join(op_types)} reads its inputs through DequantizeLinear (not QDQ)")
    if unexpected:
        failures.append(f"{component}: {len(unexpected)} {'/'.join(op_types)} nodes are not wrapped in Q/DQ and not "
                        f"kept float by the recipe, e.g. {unexpected[0]}")
    if bad_zero_points:
        failures.append(f"{component}: {len(bad_zero_points)} Q/DQ zero points are not int8 0 (TensorRT needs "
                        f"symmetric INT8), e.g. {bad_zero_points[0]}")
    if qoperator:
        failures.append(f"{component}: QOperator ops {', '.join(qoperator)} in a QDQ graph (TensorRT cannot take them)")
    return facts, failures


def non_standard_ops(model) -> list[str]:
    """Ops outside the ONNX domain (contrib ops): TensorRT cannot parse them, so they split its engine."""
    return sorted({f"{n.domain}.{n.op_type}" for n in model.graph.node if n.domain not in ("", "ai.onnx")})


def check_graph(files: ModelFiles, target) -> GraphCheck:
    """The checks a target's recipe implies, per component."""
    import onnx

    from optpipe.passes.quantize_graph import float_exclusions, recorded_kept_float
    from optpipe.pipeline import build_config
    from optpipe.passes import PASSES

    fp16_spec, quant_spec = target.pass_spec("fp16"), target.pass_spec("quantize")
    tensorrt = target.provider == "TensorrtExecutionProvider"
    facts: dict[str, Any] = {}
    failures: list[str] = []
    for component in files.components:
        model = onnx.load(str(files.path / component))
        comp: dict[str, Any] = {}
        if fp16_spec is not None:
            config = build_config(PASSES["fp16"], fp16_spec.options)
            comp["fp16"], found = check_fp16(model, component, config.keep_io_types)
            failures += found
        if quant_spec is not None:
            config = build_config(PASSES["quantize"], quant_spec.options)
            if config.mode == "static" and config.quant_format == "qdq":
                op_types = tuple(config.op_types) or ("MatMul",)
                # the recipe's roles, plus what the pass decided at run time (sensitivity fallbacks)
                kept = tuple(float_exclusions(model, config)) + tuple(recorded_kept_float(model))
                # Only TensorRT rejects non-symmetric zero points; ORT's CPU/CUDA QDQ kernels take any, and a CPU
                # recipe over all op types dequantizes constants (LayerNorm biases) as uint8 activations.
                comp["qdq"], found = check_qdq(model, component, op_types, tensorrt and config.activation_symmetric,
                                               tensorrt and config.weight_symmetric, kept)
                failures += found
        if tensorrt:
            contrib = non_standard_ops(model)
            comp["tensorrt_unparsable_ops"] = contrib
            if contrib:
                log.warning("%s: %s cannot run inside TensorRT; those nodes fall back to %s", component,
                            ", ".join(contrib), ", ".join(target.fallback_providers) or "CPU")
        comp["io_types"] = _io_types(model)
        facts[component] = comp
    return GraphCheck(facts, tuple(failures))


def cpu_run_errors() -> tuple[type[BaseException], ...]:
    """Errors meaning onnxruntime's CPU kernels cannot load or run a graph made for a GPU provider."""
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

    from optpipe.errors import ArtifactError

    return (ArtifactError, ort_state.Fail, ort_state.NotImplemented, ort_state.RuntimeException,
            ort_state.InvalidGraph)
