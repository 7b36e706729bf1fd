"""The CPU encoder rewrites behind cpu-int8's speed: exact in float, and kept by ONNX Runtime at session creation."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from optpipe import optimize
from optpipe.data.calibration import graph_input_names, tokenized_batches
from optpipe.data.texts import calibration_texts, validation_texts
from optpipe.passes.outlier_channels import find_ffns, split_outliers
from optpipe.passes.skip_layernorm import split_skip_layernorm
from optpipe.source import load_tokenizer


@pytest.fixture(scope="module")
def fused_sln(tiny_bert_dir, tmp_path_factory):
    """The tiny BERT fused by ONNX Runtime's optimizer, SkipLayerNormalization left in."""
    out = tmp_path_factory.mktemp("sln") / "fp32"
    optimize(str(tiny_bert_dir), "cpu-fp32", out, overrides=["fuse.split_skip_layernorm=false"])
    return out


def _run(model, feed, path):
    onnx.save(model, str(path))
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(path.with_suffix(".optimized.onnx"))
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(options.optimized_model_filepath, load_external_data=False)
    return session.run(None, feed)[0], [n.op_type for n in optimized.graph.node]


def _feed(model_dir, texts):
    tokenizer = load_tokenizer(model_dir)
    return tokenized_batches(tuple(texts), tokenizer, graph_input_names(model_dir / "model.onnx"), batch_size=8)


def test_skip_layernorm_split_is_exact_and_onnxruntime_does_not_fuse_it_back(fused_sln, tmp_path):
    model = onnx.load(str(fused_sln / "model.onnx"))
    before = sum(n.op_type == "SkipLayerNormalization" for n in model.graph.node)
    feed = _feed(fused_sln, validation_texts()[:8])[0]
    reference, ops_before = _run(model, feed, tmp_path / "a.onnx")
    assert before >= 2 and ops_before.count("SkipLayerNormalization") == before
    assert split_skip_layernorm(model) == before
    out, ops_after = _run(model, feed, tmp_path / "b.onnx")
    np.testing.assert_allclose(out, reference, atol=2e-5)
    # at ORT_ENABLE_ALL, onnxruntime's SkipLayerNormFusion leaves Sum + LayerNormalization alone
    assert "SkipLayerNormalization" not in ops_after and ops_after.count("LayerNormalization") == before


def test_outlier_channels_move_to_a_float_side_path_exactly(fused_sln, tmp_path):
    model = onnx.load(str(fused_sln / "model.onnx"))
    feed = _feed(fused_sln, validation_texts()[:8])[0]
    reference, _ = _run(model, feed, tmp_path / "a.onnx")
    ffns, skipped = find_ffns(model)
    assert len(ffns) == 2 and skipped == []  # the tiny BERT's two layers
    # ratio 1: every FFN gives up its largest channels (at most 3), so the rewrite is exercised everywhere
    split, skipped, side = split_outliers(model, _feed(fused_sln, calibration_texts()), 1.0, 3)
    assert len(split) == 2 and all(1 <= len(v["channels"]) <= 3 for v in split.values()) and skipped == []
    assert len(side) == 4 and all(name.endswith(("_up", "_down")) for name in side)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    for ffn in (f for f in find_ffns(model)[0] if f.down.name in split):  # (the side paths are FFNs too)
        channels = split[ffn.down.name]["channels"]
        assert not inits[ffn.up.input[1]][:, channels].any() and not inits[ffn.down.input[1]][channels].any()
    out, _ = _run(model, feed, tmp_path / "b.onnx")
    np.testing.assert_allclose(out, reference, atol=2e-5)


def test_cpu_int8_quantizes_every_ffn_gemm_of_the_tiny_bert(tiny_bert_dir, tmp_path):
    art = optimize(str(tiny_bert_dir), "cpu-int8", tmp_path / "int8", overrides=["quantize.outlier_channels=1.0"])
    quant = art.manifest["passes"][2]["report"]["components"]["model.onnx"]
    assert quant["outlier_channels"] and quant["float_matmuls"] == {"kept float: outlier channels' side path: float by design": 4}
    ops = [n.op_type for n in onnx.load(str(art.path / "model.onnx")).graph.node]
    assert ops.count("MatMulInteger") == 6 and ops.count("MatMul") == 4  # 3 GEMMs x 2 layers; the side path
    assert art.manifest["validation"]["passed"]
