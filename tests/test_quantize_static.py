"""Static INT8 on a tiny BERT: QDQ and QOperator graphs that run and validate, sensitivity fallbacks, the ranges
file in the artifact, calibration from a user file, and option checks."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from optpipe import optimize
from optpipe.errors import InvalidOptionError
from optpipe.passes import PASSES
from optpipe.pipeline import Pipeline
from optpipe.targets.recipe import parse_pipeline


def _ops(path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


@pytest.fixture(scope="module")
def static_qdq(tiny_bert_dir, tmp_path_factory):
    return optimize(str(tiny_bert_dir), "cpu-int8-static", tmp_path_factory.mktemp("static") / "qdq",
                    overrides=["quantize.sensitivity_fallback=2"])


def test_qdq_graph_quantizes_matmul_inputs_and_validates(static_qdq):
    ops = _ops(static_qdq.path / "model.onnx")
    assert ops.get("QuantizeLinear", 0) > 0 and ops.get("DequantizeLinear", 0) > ops["QuantizeLinear"]
    m = static_qdq.manifest
    assert m["validation"]["passed"] and m["validation"]["metrics"]["mean_cosine"] >= 0.99
    report = m["passes"][-1]["report"]["components"]["model.onnx"]
    assert report["calibrate_method"] == "minmax" and report["quant_format"] == "qdq"
    assert report["shape_inference"] == "symbolic"
    # every MatMul's output feeds a float op directly: no QuantizeLinear reads a MatMul output
    model = onnx.load(str(static_qdq.path / "model.onnx"))
    producers = {out: n.op_type for n in model.graph.node for out in n.output}
    assert not [n for n in model.graph.node if n.op_type == "QuantizeLinear" and producers.get(n.input[0]) == "MatMul"]


def test_sensitivity_keeps_the_worst_nodes_float_with_reasons(static_qdq):
    report = static_qdq.manifest["passes"][-1]["report"]["components"]["model.onnx"]
    losses = report["sensitivity"]
    assert len(losses) >= 4 and list(losses.values()) == sorted(losses.values(), reverse=True)
    kept = report["kept_float"]
    assert list(kept) == list(losses)[:2]
    assert all(why.startswith("sensitivity rank") for why in kept.values())
    # the kept nodes are really float in the graph: their weight input is not dequantized
    model = onnx.load(str(static_qdq.path / "model.onnx"))
    producers = {out: n.op_type for n in model.graph.node for out in n.output}
    for node in model.graph.node:
        if node.name in kept:
            assert producers.get(node.input[1]) != "DequantizeLinear"


def test_ranges_file_is_in_the_artifact(static_qdq):
    ranges = json.loads((static_qdq.path / "calibration_ranges.json").read_text())
    report = static_qdq.manifest["passes"][-1]["report"]["components"]["model.onnx"]
    assert report["ranges_file"] == "calibration_ranges.json" and "calibration_ranges.json" in static_qdq.manifest["files"]
    assert ranges["method"] == "minmax" and ranges["calibration"]["origin"] == "built-in"
    assert ranges["calibration"]["sha256"] == report["calibration"]["sha256"] and report["calibration"]["size"] >= 16
    assert len(ranges["tensors"]) == report["ranges_tensors"] > 0
    assert all(low <= high for low, high in ranges["tensors"].values())
    # the ranges are those the graph uses: a MatMul input's scale matches its calibrated range (uint8 asymmetric)
    model = onnx.load(str(static_qdq.path / "model.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    checked = 0
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] in ranges["tensors"]:
            low, high = ranges["tensors"][node.input[0]]
            expected = (max(high, 0) - min(low, 0)) / 255
            assert np.isclose(float(inits[node.input[1]]), expected, rtol=1e-3)
            checked += 1
    assert checked > 0


def test_qoperator_format_uses_qlinear_ops(tiny_bert_dir, tmp_path):
    art = optimize(str(tiny_bert_dir), "cpu-int8-static", tmp_path / "qop",
                   overrides=["quantize.quant_format=qoperator", "quantize.sensitivity_fallback=0"])
    ops = _ops(art.path / "model.onnx")
    assert ops.get("QLinearMatMul", 0) > 0 and art.manifest["validation"]["passed"]
    assert (art.path / "calibration_ranges.json").is_file()


def test_user_calibration_file_percentile_and_symmetric_int8(tiny_bert_dir, tmp_path):
    """Percentile calibration over batches of different lengths, int8 symmetric activations (TensorRT style)."""
    cal = tmp_path / "cal.csv"
    cal.write_text("id,review\n" + "".join(f'{i},"Review {i}: the product arrived {"very " * i}late."\n'
                                           for i in range(12)))
    art = optimize(str(tiny_bert_dir), "cpu-int8-static", tmp_path / "pct", calibration=f"{cal}:review",
                   overrides=["quantize.calibrate_method=percentile", "quantize.activation_symmetric=true",
                              "quantize.sensitivity_fallback=0"])
    report = art.manifest["passes"][-1]["report"]["components"]["model.onnx"]
    assert report["calibration"]["size"] == 12 and report["calibration"]["origin"].endswith("cal.csv:review")
    assert report["calibrate_method"] == "percentile" and report["activations"] == "int8 symmetric"
    assert art.manifest["passes"][-1]["config"]["calibration_column"] == "review"
    model = onnx.load(str(art.path / "model.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    quantizers = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert quantizers and all(inits[n.input[2]].dtype == np.int8 and not inits[n.input[2]].any() for n in quantizers)
    # symmetric int8: each scale is the tensor's largest calibrated magnitude over 127
    ranges = json.loads((art.path / "calibration_ranges.json").read_text())
    assert ranges["symmetric"] and ranges["method"] == "percentile"
    for node in quantizers:
        low, high = ranges["tensors"][node.input[0]]
        assert np.isclose(float(inits[node.input[1]]), max(abs(low), abs(high)) / 127, rtol=1e-3)


@pytest.mark.parametrize("option,fragment", [
    ("quant_format=int4", "quant_format"),
    ("calibrate_method=kl", "calibrate_method"),
    ("percentile=120", "percentile"),
    ("sensitivity_fallback=-1", "sensitivity_fallback"),
])
def test_bad_static_options(option, fragment):
    with pytest.raises(InvalidOptionError, match=fragment):
        Pipeline(parse_pipeline(f"export,quantize{{mode=static,{option}}}"), PASSES)
