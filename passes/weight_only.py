"""weight_only: MatMul weights to 8- or 4-bit blocks (MatMulNBits) with onnxruntime's weight-only quantizers.

For decoders, whose decode step is bound by reading weights, not by arithmetic: activations stay float (or are
quantized on the fly inside MatMulNBits at accuracy_level 4), so there is no activation range to calibrate and
no outlier channel to clip. MatMuls that are already MatMulNBits (GGUF blocks carried over at export) are left
as they are.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from optpipe.errors import InvalidOptionError
from optpipe.passbase import OnnxPass, PassContext, Report, needs_external_data, save_onnx
from optpipe.passes.weight_sensitivity import calibration_ids, group_scores, most_sensitive, sensitivity_groups

log = logging.getLogger("optpipe.weight_only")

# onnxruntime.quantization's weight-only algorithms by the name a recipe uses
ALGORITHMS = ("default", "hqq", "rtn", "k_quant")


@dataclass(frozen=True)
class WeightOnlyConfig:
    bits: int = 4  # 4 or 8
    block_size: int = 32  # weights per scale along the input dimension
    symmetric: bool = False  # asymmetric blocks (a zero point each) fit skewed weight blocks better
    accuracy_level: int = 4  # MatMulNBits compute: 4 = int8 activations (VNNI/AMX/AVX2 kernels), 0 = float
    # default: onnxruntime's block round-to-nearest (4 and 8 bits); hqq: half-quadratic (4 bits, no data);
    # rtn / k_quant: neural-compressor's RTN and llama.cpp-style k-quant search (4 bits)
    algorithm: str = "default"
    lm_head_bits: int = 8  # the output projection (logits) is the most sensitive layer: 8, 4, or 0 to keep float
    keep_float: tuple[str, ...] = ()  # node names or regular expressions kept float
    # mixed precision: the N decoder layers whose quantization alone moves the next-token distribution most on the
    # calibration texts (mean KL) keep their linears float (passes/weight_sensitivity.py); 0 measures nothing
    sensitivity_fallback: int = 0
    sensitivity_texts: int = 8  # calibration texts (<= 64 tokens each) the layers are scored on

    def check(self) -> None:
        if self.bits not in (4, 8):
            raise InvalidOptionError(f"weight_only.bits must be 4 or 8, not {self.bits}")
        if self.lm_head_bits not in (0, 4, 8):
            raise InvalidOptionError(f"weight_only.lm_head_bits must be 0 (float), 4 or 8, not {self.lm_head_bits}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise InvalidOptionError(f"weight_only.block_size must be a power of two >= 16, not {self.block_size}")
        if self.algorithm not in ALGORITHMS:
            raise InvalidOptionError(f"weight_only.algorithm must be one of {', '.join(ALGORITHMS)}, "
                                     f"not {self.algorithm!r}")
        if self.algorithm != "default" and 8 in (self.bits, self.lm_head_bits):
            raise InvalidOptionError(f"weight_only.algorithm={self.algorithm} writes 4-bit weights only; use "
                                     "algorithm=default for 8 bits (and lm_head_bits=4 or 0)")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise InvalidOptionError(f"weight_only.accuracy_level must be 0 to 4, not {self.accuracy_level}")
        if self.sensitivity_fallback < 0 or self.sensitivity_texts < 1:
            raise InvalidOptionError("weight_only.sensitivity_fallback must be >= 0 and sensitivity_texts >= 1")


@dataclass(frozen=True)
class WeightOnlyComponent(Report):
    quantized: dict[str, int] = field(default_factory=dict)  # bits -> MatMuls written as MatMulNBits here
    carried: int = 0  # MatMulNBits already in the input (GGUF blocks carried over at export)
    kept_float: dict[str, str] = field(default_factory=dict)  # node -> why it stays float
    lm_head: str = ""  # what became of the output projection
    layer_sensitivity: dict[str, float] | None = None  # "layer 3" (or a node) -> next-token KL quantized alone
    kept_by_sensitivity: tuple[str, ...] | None = None  # the most sensitive of them, whose linears stay float


@dataclass(frozen=True)
class WeightOnlyReport(Report):
    bits: int = 4
    algorithm: str = "default"
    block_size: int = 32
    accuracy_level: int = 4
    components: dict[str, WeightOnlyComponent] = field(default_factory=dict)


# MatMuls the decoder builder writes beside carried GGUF blocks (the input's block sums, their per-block offsets):
# part of an exact weight, not a layer of their own, so never re-quantized.
BLOCK_OFFSETS = ("/BlockSum", "/BlockOffsets")


def weight_matmuls(model) -> dict[str, str]:
    """MatMul node -> its weight initializer, for MatMuls whose second input is a constant 2-D weight."""
    initializers = {init.name: init for init in model.graph.initializer}
    return {node.name: node.input[1] for node in model.graph.node if node.op_type == "MatMul"
            and node.input[1] in initializers and len(initializers[node.input[1]].dims) == 2
            and not node.name.endswith(BLOCK_OFFSETS)}


def lm_head_nodes(model) -> list[str]:
    """The projection(s) that write the graph's logits output."""
    outputs = {o.name for o in model.graph.output if o.name == "logits"} or {model.graph.output[0].name}
    producers = {out: node for node in model.graph.node for out in node.output}
    found, frontier = [], list(outputs)
    while frontier:  # walk back through reshapes/casts to the MatMul or Gemm
        node = producers.get(frontier.pop())
        if node is None:
            continue
        if node.op_type in ("MatMul", "Gemm", "MatMulNBits"):
            found.append(node.name)
        elif node.op_type in ("Reshape", "Cast", "Identity", "Add"):
            frontier.append(node.input[0])
    return found


class WeightOnlyPass(OnnxPass):
    name = "weight_only"
    Config = WeightOnlyConfig
    Report = WeightOnlyReport
    reads_calibration = True  # the texts mixed precision is measured on (sensitivity_fallback)

    def transform(self, src: Path, dst: Path, config: WeightOnlyConfig, ctx: PassContext) -> WeightOnlyComponent:
        import onnx

        model = onnx.load(str(src))
        candidates = weight_matmuls(model)
        carried = sum(1 for node in model.graph.node if node.op_type == "MatMulNBits")
        heads = lm_head_nodes(model)
        untied = []  # tied heads (a Gemm on the embedding table) get their own MatMul copy to quantize
        for name in heads:
            if name not in candidates and config.lm_head_bits and _untie_head(model, name):
                untied.append(name)
        candidates = weight_matmuls(model)  # again: now with the untied heads
        kept = _kept_float(list(candidates), config.keep_float)
        for name in heads:
            if name not in candidates:
                kept[name] = ("already MatMulNBits (carried over)" if name.startswith("lm_head") and carried
                              else "tied to the embedding table: one float copy serves both")
        if config.lm_head_bits == 0:
            kept.update({n: "lm_head_bits = 0: the output projection stays float" for n in heads if n in candidates})
        head_bits = {n: config.lm_head_bits for n in heads if n in candidates and n not in kept}
        body = [n for n in candidates if n not in kept and n not in head_bits]
        layers = sensitivity_groups(body)
        scores, sensitive = self._sensitivity(model, layers, config, ctx, src.name)
        for label in sensitive:
            reason = (f"{label} kept float by sensitivity: quantized alone it moves next-token KL by "
                      f"{scores[label]:.3g} on the calibration texts (one of the {len(sensitive)} largest of "
                      f"{len(scores)})")
            kept.update({n: reason for n in layers[label]})
        body = [n for n in body if n not in kept]
        ctx.progress(f"  {src.name}: {len(body)} MatMuls to {config.bits}-bit ({config.algorithm}), "
                     f"lm_head {config.lm_head_bits or 'float'}, {carried} already MatMulNBits")
        groups = [(config.bits, body), *((bits, [n]) for n, bits in head_bits.items())]
        quantized: dict[str, int] = {}
        for bits, nodes in groups:
            if nodes:
                model = _quantize(model, nodes, bits, config)
                quantized[str(bits)] = quantized.get(str(bits), 0) + len(nodes)
        save_onnx(model, dst)
        lm_head = "; ".join(f"{n}: {head_bits[n]}-bit" + (_UNTIED if n in untied else "") if n in head_bits
                            else f"{n}: {kept.get(n, 'MatMulNBits')}" for n in heads)
        return WeightOnlyComponent(quantized=quantized, carried=carried, kept_float=kept, lm_head=lm_head,
                                   layer_sensitivity={k: round(v, 6) for k, v in scores.items()} or None,
                                   kept_by_sensitivity=tuple(sensitive) or None)

    def _sensitivity(self, model, groups: dict[str, list[str]], config: WeightOnlyConfig, ctx: PassContext,
                     component: str) -> tuple[dict[str, float], list[str]]:
        """Per-layer scores and the layers to keep float (none unless sensitivity_fallback asks)."""
        if not config.sensitivity_fallback or not groups:
            return {}, []
        if needs_external_data(model):  # the per-group graphs are in-memory sessions
            log.warning("weight_only: %s is over 2 GB; per-layer sensitivity is not measured", component)
            return {}, []
        from optpipe.data.calibration import load_calibration
        from optpipe.source import load_tokenizer

        ids = calibration_ids(load_tokenizer(ctx.source.path), load_calibration(ctx.calibration).texts,
                              config.sensitivity_texts)
        ctx.progress(f"  sensitivity: each of {len(groups)} groups quantized alone, {len(ids)} calibration texts")
        scores = group_scores(model, groups, lambda m, nodes: _quantize(m, nodes, config.bits, config), ids,
                              ctx.progress)
        return scores, most_sensitive(scores, config.sensitivity_fallback)

    def summarize(self, components: dict[str, WeightOnlyComponent], config: WeightOnlyConfig,
                  ctx: PassContext) -> WeightOnlyReport:
        return WeightOnlyReport(bits=config.bits, algorithm=config.algorithm, block_size=config.block_size,
                                accuracy_level=config.accuracy_level, components=components)


_UNTIED = " (its own copy of the tied embedding table; the embedding Gather keeps the float table)"


def _untie_head(model, name: str) -> bool:
    """A tied head, Gemm(x, table, transB=1) on the embedding table (the decoder builder's), becomes a MatMul on
    its own [hidden, vocab] copy of the table, which the quantizer can then take. Reading a float table is what a
    tied head costs: on SmolLM2-135M the float Gemm was 2.7 ms of a 12.6 ms decode step, an 8-bit head 0.9 ms."""
    from onnx import helper, numpy_helper

    index, node = next((i, n) for i, n in enumerate(model.graph.node) if n.name == name)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    tables = {t.name: t for t in model.graph.initializer}
    if (node.op_type != "Gemm" or len(node.input) != 2 or node.input[1] not in tables or attrs.get("transB") != 1
            or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0):
        return False
    weight = numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(tables[node.input[1]]).T),
                                     f"{name.split('/')[0]}.weight.T")
    model.graph.initializer.append(weight)
    model.graph.node.remove(node)
    model.graph.node.insert(index, helper.make_node("MatMul", [node.input[0], weight.name], list(node.output),
                                                    name=name))
    return True


def _kept_float(names: list[str], patterns: tuple[str, ...]) -> dict[str, str]:
    compiled = [re.compile(p) for p in patterns]
    return {n: "kept float by the recipe (keep_float)" for n in names
            if n in patterns or any(p.fullmatch(n) for p in compiled)}


def _quantize(model, nodes: list[str], bits: int, config: WeightOnlyConfig):
    """Quantize exactly `nodes` (MatMul names) of `model` to `bits`; returns the new ModelProto."""
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    algo = {
        "default": lambda: mnq.DefaultWeightOnlyQuantConfig(block_size=config.block_size,
                                                            is_symmetric=config.symmetric,
                                                            accuracy_level=config.accuracy_level, bits=bits),
        "hqq": lambda: mnq.HQQWeightOnlyQuantConfig(block_size=config.block_size, bits=bits),
        "rtn": lambda: mnq.RTNWeightOnlyQuantConfig(),
        "k_quant": lambda: mnq.KQuantWeightOnlyQuantConfig(),
    }[config.algorithm]()
    others = [n for n in weight_matmuls(model) if n not in nodes]  # RTN / k-quant read only the exclusions
    quantizer = mnq.MatMulNBitsQuantizer(model, bits=bits, block_size=config.block_size,
                                         is_symmetric=config.symmetric, accuracy_level=config.accuracy_level,
                                         nodes_to_include=nodes, nodes_to_exclude=others, algo_config=algo)
    quantizer.process()
    return quantizer.model.model
