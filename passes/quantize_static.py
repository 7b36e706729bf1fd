"""Static INT8: calibrate activation ranges on tokenized text, pick float fallbacks by sensitivity, quantize.

Why the recipe looks the way it does (measured on all-MiniLM-L6-v2, fused graph, 32 validation texts):
- The fused graph's contrib ops (Attention, SkipLayerNormalization, BiasGelu) have no ONNX shape inference, so
  without ORT's symbolic shape inference the quantizer cannot type most activations and silently quantizes
  almost nothing. With it, a naive MinMax QDQ recipe quantizes every MatMul and reaches only 0.94 mean cosine.
- Most of that loss is the Q/DQ pair on each MatMul's *output*: those outputs feed bias adds and residual
  SkipLayerNormalizations whose range is wide. Quantizing only the MatMul inputs (activation and weight) lifts
  the same recipe to 0.990; ORT on CPU still runs the MatMuls in integer arithmetic (MatMulIntegerToFloat).
- The rest is a few FFN MatMuls whose inputs carry outliers; the sensitivity step finds them on calibration
  texts and keeps the worst `sensitivity_fallback` of them in float (4 of 18: 0.9955).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from optpipe.data.calibration import (SEQUENCE_LENGTHS, TextCalibrationReader, graph_input_names, load_calibration,
                                      tokenized_batches)
from optpipe.errors import CalibrationDataError
from optpipe.passbase import track
from optpipe.source import load_tokenizer

log = logging.getLogger("optpipe.quantize")

RANGES_FILE = "calibration_ranges.json"
WEIGHTED_OPS = ("MatMul", "Gemm", "Conv")


def ranges_file_name(component: str) -> str:
    stem = Path(component).stem
    return RANGES_FILE if stem == "model" else f"{stem}_{RANGES_FILE}"


def _method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
            "entropy": CalibrationMethod.Entropy}[name]


def _prepare(src: Path, work: Path, large: bool) -> tuple[Path, str]:
    """Symbolic shape inference (which knows ORT's contrib ops) so the quantizer can type every activation."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = work / "prepared.onnx"
    cwd = os.getcwd()
    # When inference is incomplete, onnxruntime dumps sym_shape_infer_temp.onnx and its data into the
    # current directory: keep that inside our scratch directory.
    os.chdir(work)
    try:
        quant_pre_process(str(src), str(prepared), skip_optimization=True, skip_onnx_shape=False,
                          skip_symbolic_shape=False, auto_merge=True, save_as_external_data=large)
        return prepared, "symbolic"
    except Exception as exc:  # some graphs defeat symbolic inference; quantize what ONNX inference can type
        log.warning("symbolic shape inference failed (%s); quantizing with ONNX shape inference only", exc)
        return src, f"onnx only (symbolic inference failed: {_first_line(exc)})"
    finally:
        os.chdir(cwd)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def _quantize(src: Path, dst: Path, config, batches, cache: Path, excluded: list[str], large: bool,
              only: list[str] | None = None, progress=None) -> None:
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    extra: dict[str, Any] = {
        "ActivationSymmetric": config.activation_symmetric,
        "WeightSymmetric": config.weight_symmetric,
        "CalibTensorRangeSymmetric": config.activation_symmetric,
        "CalibPercentile": config.percentile,
        # one batch per collection: histogram calibrators cannot stack batches of different sequence lengths
        "CalibStridedMinMax": 1,
        # activation x activation MatMuls (attention scores in unfused graphs) stay float
        "MatMulConstBOnly": True,
        "DefaultTensorType": onnx.TensorProto.FLOAT,
    }
    if not config.quantize_outputs:
        extra["OpTypesToExcludeOutputQuantization"] = list(WEIGHTED_OPS)
    reader = TextCalibrationReader(batches, progress)  # Ticks for the batches it calibrates on, if any
    quantize_static(
        str(src), str(dst), reader,
        quant_format=QuantFormat.QDQ if config.quant_format == "qdq" else QuantFormat.QOperator,
        op_types_to_quantize=list(config.op_types) or None,
        per_channel=config.per_channel,
        reduce_range=config.reduce_range,
        activation_type=QuantType.QInt8 if config.activation_symmetric else QuantType.QUInt8,
        weight_type=QuantType.QInt8 if config.weight_type == "qint8" else QuantType.QUInt8,
        nodes_to_quantize=only,
        nodes_to_exclude=excluded,
        use_external_data_format=large,
        calibrate_method=_method(config.calibrate_method),
        extra_options=extra,
        calibration_cache_path=str(cache),
    )
    reader.finish()


def _pooled(session, batches) -> np.ndarray:
    """First output per row: mask-mean-pooled when it is (batch, seq, hidden), else flattened."""
    rows = []
    for feed in batches:
        out = session.run(None, feed)[0].astype(np.float32)
        if out.ndim == 3 and "attention_mask" in feed and out.shape[1] == feed["attention_mask"].shape[1]:
            mask = feed["attention_mask"][..., None].astype(np.float32)
            rows.append((out * mask).sum(1) / mask.sum(1))
        else:
            rows.append(out.reshape(out.shape[0], -1))
    return np.concatenate(rows)


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)
    return float(cos.mean())


def _session(path: Path):
    from optpipe.session import create_session

    return create_session(path, threads=None, spinning="off")


def quantizable_nodes(model_path: Path, config) -> list[str]:
    """Weighted nodes the recipe would quantize: the node groups the sensitivity step tries one at a time."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    weights = {init.name for init in model.graph.initializer}
    types = set(config.op_types) & set(WEIGHTED_OPS) if config.op_types else set(WEIGHTED_OPS)
    return [n.name for n in model.graph.node if n.op_type in types and len(n.input) > 1 and n.input[1] in weights]


def activation_matmuls(model_path: Path, config, excluded: list[str]) -> dict[str, str]:
    """MatMuls of two activations (attention scores/context in unfused graphs): left float by MatMulConstBOnly."""
    import onnx

    if config.op_types and "MatMul" not in config.op_types:
        return {}
    model = onnx.load(str(model_path), load_external_data=False)
    weights = {init.name for init in model.graph.initializer}
    weights |= {out for n in model.graph.node if n.op_type == "Constant" for out in n.output}
    return {n.name: "activation x activation MatMul: only MatMuls with a weight operand are quantized"
            for n in model.graph.node
            if n.op_type == "MatMul" and n.name not in excluded and not any(i in weights for i in n.input[:2])}


def sensitivity(prepared: Path, config, batches, cache: Path, work: Path, large: bool, excluded: list[str],
                progress) -> dict[str, float]:
    """Node -> mean-cosine loss on the calibration texts when that node alone is quantized (highest first)."""
    reference = _pooled(_session(prepared), batches)
    losses: dict[str, float] = {}
    candidates = [n for n in quantizable_nodes(prepared, config) if n not in excluded]
    progress(f"  sensitivity: quantizing {len(candidates)} nodes one at a time")
    trial = work / "trial.onnx"
    for name in track(candidates, "sensitivity", progress, unit="node"):  # the first trial calibrates
        _quantize(prepared, trial, config, batches, cache, excluded, large, only=[name], progress=progress)
        losses[name] = round(1.0 - mean_cosine(_pooled(_session(trial), batches), reference), 6)
    return dict(sorted(losses.items(), key=lambda kv: -kv[1]))


def write_ranges(cache: Path, dest: Path, config, calibration: dict[str, Any]) -> int:
    """Our activation ranges file (tensor -> [min, max]) from ORT's calibration cache; returns the tensor count."""
    from onnxruntime.quantization.calibrate import load_tensors_data

    data = load_tensors_data(cache)
    tensors = {}
    for name, value in data.data.items():
        low, high = value.range_value
        tensors[name] = [float(np.asarray(low).min()), float(np.asarray(high).max())]
    dest.write_text(json.dumps({
        "format": 1,
        "method": config.calibrate_method,
        "percentile": config.percentile if config.calibrate_method == "percentile" else None,
        "symmetric": config.activation_symmetric,
        "calibration": calibration,
        "tensors": tensors,
    }, indent=1, sort_keys=False) + "\n")
    return len(tensors)


def calibration_batches(src: Path, config, ctx, calib=None) -> list[dict[str, np.ndarray]]:
    """The calibration texts (--calibration, or the built-in set) tokenized into feeds for `src`'s inputs."""
    calib = calib or load_calibration(ctx.calibration, column=config.calibration_column,
                                      limit=config.calibration_samples)
    try:
        tokenizer = load_tokenizer(ctx.source.path)
    except Exception as exc:
        raise CalibrationDataError(f"calibrating quantization needs the model's tokenizer: {exc}") from exc
    return tokenized_batches(calib.texts, tokenizer, graph_input_names(src))


def quantize_static_component(src: Path, dst: Path, config, excluded_nodes: list[str], large: bool,
                              ctx) -> dict[str, Any]:
    """Calibrate, choose float fallbacks by sensitivity, quantize `src` into `dst`; returns report entries."""
    calib = load_calibration(ctx.calibration, column=config.calibration_column, limit=config.calibration_samples)
    batches = calibration_batches(src, config, ctx, calib)
    work = Path(tempfile.mkdtemp(prefix=".static-", dir=ctx.out_dir))
    try:
        prepared, shape_inference = _prepare(src, work, large)
        cache = work / "ranges-ort.json"
        excluded = list(excluded_nodes)
        kept: dict[str, str] = {}
        losses: dict[str, float] = {}
        ctx.progress(f"  calibrating on {len(calib.texts)} texts ({calib.origin}, {config.calibrate_method}, "
                     f"{len(batches)} batches)")
        if config.sensitivity_fallback:
            losses = sensitivity(prepared, config, batches, cache, work, large, excluded, ctx.progress)
            for rank, (name, loss) in enumerate(list(losses.items())[:config.sensitivity_fallback], start=1):
                kept[name] = (f"sensitivity rank {rank} of {len(losses)}: quantizing it alone costs {loss:.5f} "
                              "mean cosine on the calibration texts")
            excluded += list(kept)
        _quantize(prepared, dst, config, batches, cache, excluded, large, progress=ctx.progress)
        kept.update(activation_matmuls(prepared, config, excluded))
        calibration = {**calib.to_json(), "batches": len(batches), "sequence_lengths": list(SEQUENCE_LENGTHS)}
        ranges = ranges_file_name(dst.name)
        count = write_ranges(cache, dst.parent / ranges, config, calibration)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "quant_format": config.quant_format,
        "calibrate_method": config.calibrate_method,
        **({"percentile": config.percentile} if config.calibrate_method == "percentile" else {}),
        "activations": "int8 symmetric" if config.activation_symmetric else "uint8 asymmetric",
        "weights": f"{config.weight_type} {'symmetric' if config.weight_symmetric else 'asymmetric'}"
                   f"{' per-channel' if config.per_channel else ''}",
        "quantize_outputs": config.quantize_outputs,
        "shape_inference": shape_inference,
        "calibration": calibration,
        "ranges_file": ranges,
        "ranges_tensors": count,
        "sensitivity": losses,
        "kept_by_sensitivity": tuple(list(losses)[:config.sensitivity_fallback]),
        "kept_float": kept,
    }
