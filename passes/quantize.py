"""quantize: INT8 with onnxruntime.quantization, dynamic or static (calibration and sensitivity in quantize_static)."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from optpipe.errors import InvalidOptionError
from optpipe.pipeline import ModelFiles, PassContext, PassResult, copy_aux_files

log = logging.getLogger("optpipe.quantize")

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


@dataclass(frozen=True)
class QuantizeConfig:
    mode: str = "dynamic"  # "dynamic" or "static"
    per_channel: bool = True
    reduce_range: bool = False
    weight_type: str = "qint8"  # "qint8" or "quint8"
    op_types: tuple[str, ...] = ()  # empty: every op type onnxruntime can quantize
    keep_float: tuple[str, ...] = ()  # roles from KEEP_FLOAT_ROLES
    exclude_nodes: tuple[str, ...] = ()  # node names or regular expressions kept in float
    # static mode only (see passes/quantize_static.py)
    quant_format: str = "qdq"  # "qdq" (TensorRT, most accelerators) or "qoperator"
    calibrate_method: str = "minmax"  # "minmax", "percentile" or "entropy"
    percentile: float = 99.999
    activation_symmetric: bool = False  # TensorRT wants symmetric activations
    weight_symmetric: bool = True
    calibration_samples: int = 0  # 0: every calibration text
    calibration_column: str = "text"  # the .csv column / .jsonl field with the texts (or --calibration FILE:COLUMN)
    # keep the N weighted nodes whose quantization alone costs the most fidelity on the calibration texts in float
    sensitivity_fallback: int = 0
    # Q/DQ on MatMul/Gemm outputs too; off by default: those outputs feed wide-range bias and residual adds
    quantize_outputs: bool = False

    def check(self) -> None:
        if self.mode not in ("dynamic", "static"):
            raise InvalidOptionError(f"quantize.mode must be 'dynamic' or 'static', not {self.mode!r}")
        if self.weight_type not in ("qint8", "quint8"):
            raise InvalidOptionError(f"quantize.weight_type must be 'qint8' or 'quint8', not {self.weight_type!r}")
        unknown = sorted(set(self.keep_float) - set(KEEP_FLOAT_ROLES))
        if unknown:
            raise InvalidOptionError(f"quantize.keep_float: unknown role {', '.join(unknown)} "
                                     f"(roles: {', '.join(KEEP_FLOAT_ROLES)})")
        if self.quant_format not in ("qdq", "qoperator"):
            raise InvalidOptionError(f"quantize.quant_format must be 'qdq' or 'qoperator', not {self.quant_format!r}")
        if self.calibrate_method not in ("minmax", "percentile", "entropy"):
            raise InvalidOptionError("quantize.calibrate_method must be 'minmax', 'percentile' or 'entropy', "
                                     f"not {self.calibrate_method!r}")
        if not 50.0 < self.percentile <= 100.0:
            raise InvalidOptionError(f"quantize.percentile must be in (50, 100], not {self.percentile}")
        for key in ("calibration_samples", "sensitivity_fallback"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidOptionError(f"quantize.{key} must be a whole number >= 0, not {value!r}")
        for key in ("per_channel", "reduce_range", "activation_symmetric", "weight_symmetric", "quantize_outputs"):
            if not isinstance(getattr(self, key), bool):
                raise InvalidOptionError(f"quantize.{key} must be true or false, not {getattr(self, key)!r}")
        if not isinstance(self.calibration_column, str) or not self.calibration_column:
            raise InvalidOptionError("quantize.calibration_column must be a column name")


def nodes_in_role(model, role: str) -> list[str]:
    """Find the nodes of a keep_float role from the graph's structure, so it works for any naming."""
    producers = {out: node for node in model.graph.node for out in node.output}
    names = []
    for node in model.graph.node:
        if role == "ffn_output" and node.op_type == "MatMul":
            src = producers.get(node.input[0])
            if src is not None and (src.op_type in GELU_OPS or _is_unfused_gelu(src, producers)):
                names.append(node.name)
        elif role == "attention" and node.op_type in ("Attention", "MultiHeadAttention"):
            names.append(node.name)
        elif role == "lm_head" and node.op_type in ("MatMul", "Gemm"):
            if any(out in {o.name for o in model.graph.output} for out in node.output):
                names.append(node.name)
    return names


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


class QuantizePass:
    name = "quantize"
    consumes = "onnx"
    produces = "onnx"
    Config = QuantizeConfig
    target_dependent = False

    def run(self, files: ModelFiles, config: QuantizeConfig, ctx: PassContext) -> PassResult:
        import onnx

        report: dict = {"mode": config.mode, "per_channel": config.per_channel, "components": {}}
        for component in files.components:
            src = files.path / component
            dst = ctx.out_dir / component
            model = onnx.load(str(src))
            excluded = float_exclusions(model, config)
            large = model.ByteSize() > 1_800_000_000
            ctx.progress(f"  quantizing {component} ({config.mode}, {len(excluded)} nodes kept in float)")
            entry = report["components"].setdefault(component, {})
            if config.mode == "dynamic":
                self._dynamic(src, dst, config, list(excluded), large)
            else:
                from optpipe.passes.quantize_static import quantize_static_component

                static = quantize_static_component(src, dst, config, list(excluded), large, ctx)
                excluded = {**excluded, **static.pop("kept_float")}
                entry.update(static)
                stamp_kept_float(dst, excluded)
            out = onnx.load(str(dst), load_external_data=False)
            entry.update({"integer_ops": integer_op_counts(out), "kept_float": excluded,
                          "quantized_nodes": quantized_node_count(out), "float_matmuls": float_matmuls(out, excluded)})
        copy_aux_files(files.path, ctx.out_dir)
        return PassResult(ModelFiles(ctx.out_dir, "onnx", files.components), report)

    @staticmethod
    def _dynamic(src, dst, config: QuantizeConfig, excluded: list[str], large: bool) -> None:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(
            str(src),
            str(dst),
            op_types_to_quantize=list(config.op_types) or None,
            per_channel=config.per_channel,
            reduce_range=config.reduce_range,
            weight_type=QuantType.QInt8 if config.weight_type == "qint8" else QuantType.QUInt8,
            nodes_to_exclude=excluded,
            use_external_data_format=large,
            # Fused contrib ops (Attention, SkipLayerNormalization) have no ONNX shape inference, so the
            # quantizer cannot type their outputs; they are float. This is the bug Optimum's CLI trips on.
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
