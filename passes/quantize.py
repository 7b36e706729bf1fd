"""quantize: INT8 with onnxruntime.quantization, dynamic or static (calibration and sensitivity in quantize_static)."""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optpipe.errors import CalibrationDataError, InvalidOptionError
from optpipe.passbase import OnnxPass, PassContext, Report, needs_external_data, save_onnx
from optpipe.passes.quantize_graph import (KEEP_FLOAT_ROLES, float_exclusions, float_matmuls, integer_op_counts,
                                          quantized_node_count, stamp_kept_float, unmatched_roles)

log = logging.getLogger("optpipe.quantize")

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
    # FFN activation channels whose calibration max exceeds this many times the FFN's 99th percentile are computed
    # apart in float, so every FFN GEMM can be INT8 (passes/outlier_channels.py); 0 turns it off
    outlier_channels: float = 0.0
    outlier_max_channels: int = 8

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
        if isinstance(self.outlier_channels, bool) or not isinstance(self.outlier_channels, (int, float)) or not (
                self.outlier_channels == 0 or self.outlier_channels >= 1):
            raise InvalidOptionError(f"quantize.outlier_channels must be 0 (off) or a ratio >= 1, not "
                                     f"{self.outlier_channels!r}")
        for key in ("calibration_samples", "sensitivity_fallback", "outlier_max_channels"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidOptionError(f"quantize.{key} must be a whole number >= 0, not {value!r}")
        for key in ("per_channel", "reduce_range", "activation_symmetric", "weight_symmetric", "quantize_outputs"):
            if not isinstance(getattr(self, key), bool):
                raise InvalidOptionError(f"quantize.{key} must be true or false, not {getattr(self, key)!r}")
        if not isinstance(self.calibration_column, str) or not self.calibration_column:
            raise InvalidOptionError("quantize.calibration_column must be a column name")
        if self.mode == "dynamic":  # a static-only option set on a dynamic recipe would silently do nothing
            defaults = QuantizeConfig()
            ignored = [key for key in STATIC_ONLY if getattr(self, key) != getattr(defaults, key)]
            if ignored:
                raise InvalidOptionError(f"quantize.{ignored[0]} applies to mode=static only (this recipe is "
                                         "dynamic: add quantize.mode=static, or drop the option)")


# Options that only static quantization reads (passes/quantize_static.py).
STATIC_ONLY = ("quant_format", "calibrate_method", "percentile", "activation_symmetric", "weight_symmetric",
               "sensitivity_fallback", "quantize_outputs")


@dataclass(frozen=True)
class QuantizedComponent(Report):
    integer_ops: dict[str, int] = field(default_factory=dict)
    kept_float: dict[str, str] = field(default_factory=dict)  # node -> why it stays float
    quantized_nodes: int = 0
    float_matmuls: dict[str, int] = field(default_factory=dict)  # why a MatMul stayed float -> how many
    unmatched_roles: tuple[str, ...] = ()  # keep_float roles that matched no node here
    # FFN down-projection -> its outlier channels computed in float beside the INT8 GEMMs, and why FFNs were not
    outlier_channels: dict[str, Any] | None = None
    outlier_skipped: tuple[str, ...] | None = None
    # static mode (passes/quantize_static.py)
    quant_format: str | None = None
    calibrate_method: str | None = None
    percentile: float | None = None
    activations: str | None = None
    weights: str | None = None
    quantize_outputs: bool | None = None
    shape_inference: str | None = None
    calibration: dict[str, Any] | None = None
    ranges_file: str | None = None
    ranges_tensors: int | None = None
    sensitivity: dict[str, float] | None = None  # node -> fidelity lost when quantized alone
    kept_by_sensitivity: tuple[str, ...] | None = None  # the most sensitive nodes, kept float for that reason


@dataclass(frozen=True)
class QuantizeReport(Report):
    mode: str = "dynamic"
    per_channel: bool = True
    components: dict[str, QuantizedComponent] = field(default_factory=dict)


class QuantizePass(OnnxPass):
    name = "quantize"
    Config = QuantizeConfig
    Report = QuantizeReport
    reads_calibration = True

    def transform(self, src: Path, dst: Path, config: QuantizeConfig, ctx: PassContext) -> QuantizedComponent:
        import onnx

        model = onnx.load(str(src))
        excluded = float_exclusions(model, config)
        unmatched = unmatched_roles(model, config)
        for role in unmatched:
            log.warning("quantize: keep_float role %r matches no node in %s; nothing is kept float for it",
                        role, src.name)
        large = needs_external_data(model)
        outliers: dict[str, Any] = {}
        work = Path(tempfile.mkdtemp(prefix=".quantize-", dir=dst.parent))
        try:
            if config.outlier_channels and large:  # the calibration probe is an in-memory model (< 2 GB)
                outliers = {"outlier_channels": {}, "outlier_skipped": ("a model over 2 GB: not probed",)}
                log.warning("quantize: %s is over 2 GB; its FFN outlier channels are not split", src.name)
            elif config.outlier_channels:
                src, outliers = self._split_outliers(model, src, work, config, ctx)
                side = outliers.pop("float")
                excluded.update({name: "outlier channels' side path: float by design" for name in side})
            del model
            static = self._quantize(src, dst, config, excluded, large, ctx)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if config.mode == "static":
            excluded = {**excluded, **static.pop("kept_float")}
            stamp_kept_float(dst, excluded)
        out = onnx.load(str(dst), load_external_data=False)
        entry = QuantizedComponent(integer_ops=integer_op_counts(out), kept_float=excluded,
                                   quantized_nodes=quantized_node_count(out), float_matmuls=float_matmuls(out, excluded),
                                   unmatched_roles=unmatched, **outliers, **static)
        ctx.progress(f"  {src.name}: {entry.quantized_nodes} nodes quantized, {len(entry.kept_float)} kept in float")
        return entry

    def _quantize(self, src: Path, dst: Path, config: QuantizeConfig, excluded: dict[str, str], large: bool,
                  ctx: PassContext) -> dict[str, Any]:
        static: dict[str, Any] = {}
        if config.mode == "dynamic":
            ctx.progress(f"  quantizing {src.name} (dynamic)")
            self._dynamic(src, dst, config, list(excluded), large)
        else:
            from optpipe.passes.quantize_static import quantize_static_component

            ctx.progress(f"  quantizing {src.name} (static, {config.quant_format})")
            static = quantize_static_component(src, dst, config, list(excluded), large, ctx)
        return static

    @staticmethod
    def _split_outliers(model, src: Path, work: Path, config: QuantizeConfig,
                        ctx: PassContext) -> tuple[Path, dict[str, Any]]:
        """The graph with FFN outlier channels on a float side path (in `work`), and the report entries."""
        from optpipe.passes.outlier_channels import split_outliers
        from optpipe.passes.quantize_static import calibration_batches

        try:
            batches = calibration_batches(src, config, ctx)
        except CalibrationDataError as exc:  # e.g. a seq2seq decoder, fed encoder states rather than text
            log.info("quantize: no outlier channels for %s: %s", src.name, exc)
            return src, {"outlier_channels": {}, "outlier_skipped": (f"calibration cannot feed {src.name}: {exc}",),
                         "float": []}
        ctx.progress(f"  {src.name}: finding FFN outlier channels on {len(batches)} calibration batches")
        split, skipped, side = split_outliers(model, batches, float(config.outlier_channels),
                                              config.outlier_max_channels)
        for reason in skipped:
            log.info("quantize: outlier channels: %s", reason)
        if not split:
            return src, {"outlier_channels": {}, "outlier_skipped": tuple(skipped), "float": []}
        rewritten = work / src.name
        save_onnx(model, rewritten)
        return rewritten, {"outlier_channels": split, "outlier_skipped": tuple(skipped), "float": side}

    def summarize(self, components: dict[str, QuantizedComponent], config: QuantizeConfig,
                  ctx: PassContext) -> QuantizeReport:
        return QuantizeReport(mode=config.mode, per_channel=config.per_channel, components=components)

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
