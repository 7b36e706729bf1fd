"""fp16: float16 weights and compute for CUDA, keeping float32 graph inputs/outputs and ops that need float32."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from optpipe.errors import InvalidOptionError
from optpipe.passbase import OnnxPass, PassContext, Report, needs_external_data

log = logging.getLogger("optpipe.fp16")

FP16_MAX = 65504.0
FP16_MIN_POSITIVE = 5.96e-08

# Op types kept in float32 besides onnxruntime's own block list (float16.DEFAULT_OP_BLOCK_LIST, ML and
# index ops): an unfused RMS/LayerNorm squares activations (Pow) and averages them (ReduceMean); in float16
# x*x overflows for |x| > 256, which T5-style models reach. Fused normalization ops accumulate in float32
# inside their kernels, so fused graphs rarely contain these at all.
KEEP_FLOAT_OPS = ("Pow", "ReduceMean")


@dataclass(frozen=True)
class Fp16Config:
    keep_io_types: bool = True  # float32 graph inputs/outputs: callers feed and read float32 as before
    keep_float_ops: tuple[str, ...] = KEEP_FLOAT_OPS  # op types kept float32, on top of onnxruntime's list
    keep_float_nodes: tuple[str, ...] = ()  # node names kept float32
    force_fp16_initializers: bool = False  # also convert initializers that only feed float32 nodes

    def check(self) -> None:
        bad = [op for op in self.keep_float_ops if not op or not op[0].isupper()]
        if bad:
            raise InvalidOptionError(f"fp16.keep_float_ops takes ONNX op types such as Pow or ReduceMean, not {bad}")


def _float_initializer_facts(model) -> tuple[int, int, list[str]]:
    """Count float32 initializers and those with values float16 cannot hold (clamped by the conversion)."""
    import numpy as np
    from onnx import TensorProto, numpy_helper

    count, params, clamped = 0, 0, []
    for init in model.graph.initializer:
        if init.data_type != TensorProto.FLOAT:
            continue
        count += 1
        values = numpy_helper.to_array(init)
        params += values.size
        magnitude = np.abs(values)
        if values.size and (magnitude.max() > FP16_MAX or ((magnitude > 0) & (magnitude < FP16_MIN_POSITIVE)).any()):
            clamped.append(init.name)
    return count, params, clamped


def _io_types(model) -> dict[str, str]:
    from onnx import TensorProto

    return {v.name: TensorProto.DataType.Name(v.type.tensor_type.elem_type)
            for v in (*model.graph.input, *model.graph.output)}


@dataclass(frozen=True)
class Fp16Component(Report):
    float16_initializers: int = 0
    float32_initializers: int = 0
    float32_initializers_before: int = 0
    casts_added: int = 0
    kept_float: dict[str, str] = field(default_factory=dict)  # node -> why it stays float32
    clamped_initializers: tuple[str, ...] = ()
    io_types: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Fp16Report(Report):
    keep_io_types: bool = True
    components: dict[str, Fp16Component] = field(default_factory=dict)
    note: str = ""


class Fp16Pass(OnnxPass):
    name = "fp16"
    Config = Fp16Config
    Report = Fp16Report

    def transform(self, src: Path, dst: Path, config: Fp16Config, ctx: PassContext) -> Fp16Component:
        import onnx
        from onnx import TensorProto
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST
        from onnxruntime.transformers.onnx_model import OnnxModel

        block_ops = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(config.keep_float_ops))
        ctx.progress(f"  converting {src.name} to float16")
        model = onnx.load(str(src))
        float_inits, _, clamped = _float_initializer_facts(model)
        casts_before = sum(1 for n in model.graph.node if n.op_type == "Cast")
        kept = {n.name or n.output[0]: f"op type {n.op_type} is kept float32"
                for n in model.graph.node if n.op_type in block_ops}
        kept.update({name: "kept float32 by the recipe (keep_float_nodes)" for name in config.keep_float_nodes})
        wrapped = OnnxModel(model)
        # Symbolic shape inference types the outputs of fused contrib ops (Attention, SkipLayerNormalization)
        # that ONNX's own inference does not know; without types the converter cannot place its Casts.
        wrapped.convert_float_to_float16(
            use_symbolic_shape_infer=True,
            keep_io_types=config.keep_io_types,
            op_block_list=block_ops,
            node_block_list=list(config.keep_float_nodes),
            force_fp16_initializers=config.force_fp16_initializers,
        )
        wrapped.save_model_to_file(str(dst), use_external_data_format=needs_external_data(wrapped.model))
        out = wrapped.model
        kinds = [init.data_type for init in out.graph.initializer]
        if clamped:
            log.warning("%s: %d initializers hold values outside float16's range and were clamped",
                        src.name, len(clamped))
        return Fp16Component(
            float16_initializers=kinds.count(TensorProto.FLOAT16),
            float32_initializers=kinds.count(TensorProto.FLOAT),
            float32_initializers_before=float_inits,
            casts_added=sum(1 for n in out.graph.node if n.op_type == "Cast") - casts_before,
            kept_float=kept,
            clamped_initializers=tuple(clamped),
            io_types=_io_types(out),
        )

    def summarize(self, components: dict[str, Fp16Component], config: Fp16Config, ctx: PassContext) -> Fp16Report:
        note = "; ".join(f"{name}: {c.float16_initializers} float16 initializers, {len(c.kept_float)} nodes kept "
                         "float32" for name, c in components.items())
        return Fp16Report(keep_io_types=config.keep_io_types, components=components, note=note)
