"""The bundled all-MiniLM-L6-v2 end to end through the Python API (built once per session)."""

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from optpipe import Artifact, optimize
from optpipe.errors import OutputError, ValidationFailedError


def test_cpu_int8_meets_fidelity_and_is_fused_and_quantized(bundled_int8):
    m = bundled_int8.manifest
    assert m["validation"]["passed"] and m["validation"]["metrics"]["mean_cosine"] >= 0.99
    assert m["validation"]["thresholds"]["mean_cosine"] == 0.99
    graph = m["graph"]["model.onnx"]
    # fused by ONNX Runtime's optimizer, then split back on CPU (its SkipLayerNormalization kernel is slow there)
    fuse = m["passes"][1]["report"]["components"]["model.onnx"]
    assert fuse["fused"]["SkipLayerNormalization"] == fuse["split_skip_layernorm"] == 12
    assert graph["fused_ops"].get("LayerNormalization", 0) == 12 and "SkipLayerNormalization" not in graph["fused_ops"]
    assert graph["fused_ops"].get("QAttention", 0) + graph["fused_ops"].get("Attention", 0) == 6
    # every one of the 18 FFN and projection GEMMs is INT8: the FFN outlier channels are on a small float side path
    assert graph["integer_ops"].get("MatMulInteger", 0) == 18
    outliers = m["passes"][2]["report"]["components"]["model.onnx"]["outlier_channels"]
    assert 1 <= len(outliers) <= 6 and all(1 <= len(v["channels"]) <= 8 for v in outliers.values())
    # the manifest's claim matches the file on disk
    ops = [n.op_type for n in onnx.load(str(bundled_int8.path / "model.onnx")).graph.node]
    assert {"LayerNormalization", "Sum", "QAttention", "MatMulInteger"} <= set(ops)
    assert "SkipLayerNormalization" not in ops and ops.count("MatMul") == 2 * len(outliers)
    # the kernels that really run (after ONNX Runtime's session-time fusions) and their share of the time
    profile = m["profile"]["workloads"]["forward"]
    assert profile["ms_per_run"] > 0 and abs(sum(v["share"] for v in profile["ops"].values()) - 1) < 0.01
    assert profile["ops"]["DynamicQuantizeMatMul"]["nodes"] == 18 and profile["ops"]["QAttention"]["nodes"] == 6
    assert "SkipLayerNormalization" not in profile["ops"] and profile["ops"]["LayerNormalization"]["nodes"] == 12
    assert m["size"]["onnx_bytes"] < m["size"]["source_bytes"] / 2


def test_manifest_records_source_target_passes_versions_and_files(bundled_int8):
    m = bundled_int8.manifest
    assert m["source"]["id"] == "sentence-transformers/all-MiniLM-L6-v2" and len(m["source"]["content_sha256"]) == 64
    assert m["target"]["name"] == "cpu-int8" and m["pipeline"] == m["target"]["pipeline"]
    assert [p["name"] for p in m["passes"]] == ["export", "fuse", "quantize"]
    assert all(p["seconds"] >= 0 and "report" in p for p in m["passes"])
    quant = m["passes"][2]["report"]["components"]["model.onnx"]
    # only the outlier channels' side path (two small MatMuls per FFN it serves) stays float, each with its reason
    assert len(quant["kept_float"]) == 2 * len(quant["outlier_channels"]) > 0
    assert all("outlier channels" in why for why in quant["kept_float"].values())
    assert {"torch", "transformers", "optimum", "onnx", "onnxruntime"} <= set(m["versions"])
    assert {"model.onnx", "config.json", "tokenizer.json"} <= set(m["files"])
    assert bundled_int8.verify() == []


def test_verify_reports_edited_files_but_not_runtime_caches(bundled_int8, tmp_path):
    import shutil

    from optpipe import Artifact
    from optpipe.artifact import file_table

    copy = Artifact.load(shutil.copytree(bundled_int8.path, tmp_path / "art"))
    (copy.path / "trt_cache").mkdir()
    (copy.path / "trt_cache" / "engine.timing").write_bytes(b"written by TensorRT at run time")
    assert copy.verify() == [] and "trt_cache/engine.timing" not in file_table(copy.path)
    with open(copy.path / "config.json", "a") as f:
        f.write(" ")
    (copy.path / "tokenizer.json").unlink()
    assert sorted(copy.verify()) == ["config.json: changed since publishing", "tokenizer.json: missing"]


def test_artifact_loads_with_optimum_and_plain_onnxruntime(bundled_int8):
    from optimum.onnxruntime import ORTModelForFeatureExtraction
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bundled_int8.path)
    model = ORTModelForFeatureExtraction.from_pretrained(bundled_int8.path)
    enc = tokenizer(["a test sentence", "another one"], padding=True, return_tensors="pt")
    hidden = model(**enc).last_hidden_state
    assert tuple(hidden.shape[:2]) == tuple(enc["input_ids"].shape) and hidden.shape[2] == 384
    session = ort.InferenceSession(str(bundled_int8.path / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = {i.name: enc[i.name].numpy() for i in session.get_inputs()}
    plain = session.run(None, feed)[0]
    assert np.allclose(plain, hidden.numpy(), atol=1e-4)


def test_artifact_load_round_trip(bundled_int8):
    again = Artifact.load(bundled_int8.path)
    assert again.manifest == bundled_int8.manifest
    assert again.target.pipeline == bundled_int8.manifest["target"]["pipeline"]


def test_existing_output_is_refused_then_overwritten(bundled_int8, tiny_bert_dir):
    before = (bundled_int8.path / "manifest.json").read_text()
    with pytest.raises(OutputError, match="--overwrite"):
        optimize(str(tiny_bert_dir), "cpu-int8", bundled_int8.path)
    assert (bundled_int8.path / "manifest.json").read_text() == before


def test_overwrite_replaces(tiny_bert_dir, tmp_path):
    out = tmp_path / "art"
    optimize(str(tiny_bert_dir), "cpu-fp32", out)
    art = optimize(str(tiny_bert_dir), "cpu-int8", out, overwrite=True)
    assert Artifact.load(out).manifest["target"]["name"] == "cpu-int8" == art.manifest["target"]["name"]
    assert [p.name for p in tmp_path.iterdir()] == ["art"]  # no staging or backup left behind
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask  # as mkdir makes it, not mkdtemp's private 0700


def test_failed_validation_publishes_nothing(tiny_bert_dir, tmp_path):
    out = tmp_path / "strict"
    # No INT8 model matches PyTorch bit for bit: a cosine floor of 1.0 with max_abs_diff 0 cannot pass.
    with pytest.raises(ValidationFailedError, match="max_abs_diff"):
        optimize(str(tiny_bert_dir), "cpu-int8", out, overrides=["validate.max_abs_diff=0.0"])
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_is_one_line_and_leaves_nothing(tiny_bert_dir, tmp_path, monkeypatch):
    """ENOSPC while the artifact is staged (the pass outputs are cached by then): one line, no partial directory."""
    import errno
    import shutil

    import optpipe.api

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    optimize(str(tiny_bert_dir), "cpu-fp32", tmp_path / "warm")  # the passes' outputs are in the cache now
    shutil.rmtree(tmp_path / "warm")
    monkeypatch.setattr(optpipe.api.shutil, "copytree", full)  # shutil itself: undone after the test
    with pytest.raises(OutputError, match="disk full while building the artifact") as info:
        optimize(str(tiny_bert_dir), "cpu-fp32", tmp_path / "art")
    assert "\n" not in str(info.value) and list(tmp_path.iterdir()) == []
