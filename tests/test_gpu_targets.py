"""GPU targets built and checked on whatever machine runs the tests (CI has no GPU): cuda-fp16, tensorrt-fp16,
tensorrt-int8. What needs the GPU is deferred in the manifest; what the CPU can check is checked here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto

from optpipe import optimize
from optpipe.errors import ProviderUnavailableError, ValidationFailedError
from optpipe.validation.graph_checks import check_qdq
from optpipe.session import expand_profile_shapes, provider_works, require_provider, resolve_provider_options

HAS_CUDA = provider_works("CUDAExecutionProvider")
HAS_TRT = provider_works("TensorrtExecutionProvider")


def _load(artifact) -> onnx.ModelProto:
    return onnx.load(str(artifact.path / "model.onnx"))


def _io(model) -> dict[str, int]:
    return {v.name: v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)}


def _run_cpu(path, ids: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    return session.run(None, {i.name: feed[i.name] for i in session.get_inputs()})[0]


@pytest.fixture(scope="module")
def cuda_fp16(tiny_bert_dir, tmp_path_factory):
    return optimize(str(tiny_bert_dir), "cuda-fp16", tmp_path_factory.mktemp("gpu") / "cuda-fp16")


@pytest.fixture(scope="module")
def trt_fp16(tiny_bert_dir, tmp_path_factory):
    return optimize(str(tiny_bert_dir), "tensorrt-fp16", tmp_path_factory.mktemp("gpu") / "trt-fp16",
                    overrides=["provider_options.trt_profile_opt_shapes=*:4x64"])


def test_cuda_fp16_publishes_with_validation_deferred_or_run(cuda_fp16):
    v = cuda_fp16.manifest["validation"]
    if HAS_CUDA:
        assert v["deferred"] is None and v["provider"] == "CUDAExecutionProvider"
    else:
        assert v["deferred"] == "CUDAExecutionProvider not available"
        assert v["provider"] == "CPUExecutionProvider"
    # the CPU run of the same float16 graph still had to meet the target's fidelity floors
    assert v["passed"] and v["metrics"]["mean_cosine"] >= v["thresholds"]["mean_cosine"] == 0.999
    assert cuda_fp16.manifest["target"]["provider"] == "CUDAExecutionProvider"
    assert cuda_fp16.manifest["target"]["provider_options"]["arena_extend_strategy"] == "kSameAsRequested"


def test_cuda_fp16_graph_is_float16_inside_float32_outside(cuda_fp16):
    model = _load(cuda_fp16)
    kinds = [init.data_type for init in model.graph.initializer]
    assert kinds.count(TensorProto.FLOAT16) > 0 and kinds.count(TensorProto.FLOAT) == 0
    io = _io(model)
    assert io["last_hidden_state"] == TensorProto.FLOAT and io["input_ids"] == TensorProto.INT64
    ops = {n.op_type for n in model.graph.node}
    assert {"Attention", "SkipLayerNormalization", "Cast"} <= ops  # GPU fusions, then casts at the float32 edges
    # the pass report and the manifest's graph checks agree with the file
    report = cuda_fp16.manifest["passes"][2]["report"]["components"]["model.onnx"]
    assert report["float16_initializers"] == kinds.count(TensorProto.FLOAT16)
    checks = cuda_fp16.manifest["validation"]["checks"]["model.onnx"]["fp16"]
    assert checks["float16_share"] == 1.0 and checks["io_types"]["last_hidden_state"] == "FLOAT"
    fp32_params = sum(np.prod(i.dims) for i in model.graph.initializer) * 4
    assert cuda_fp16.manifest["size"]["onnx_bytes"] < 0.6 * fp32_params + 200_000  # weights halved


def test_fp16_artifact_runs_on_cpu_close_to_float32(cuda_fp16, trt_fp16):
    ids = np.array([[101, 7592, 2088, 2003, 1037, 3231, 102]], dtype=np.int64)
    half = _run_cpu(cuda_fp16.path / "model.onnx", ids)
    full = _run_cpu(trt_fp16.path / "model.onnx", ids)  # the plain float32 export of the same model
    assert half.dtype == np.float32 and half.shape == full.shape
    assert 0 < np.abs(half - full).max() < 0.05  # float16 rounding: different, but close


def test_fp16_keeps_listed_ops_float32(tiny_bert_dir, tmp_path):
    art = optimize(str(tiny_bert_dir), "cuda-fp16", tmp_path / "a",
                   pipeline="export,fp16{keep_float_ops=[Softmax]}")
    model = _load(art)
    producers = {out: n for n in model.graph.node for out in n.output}
    softmax = [n for n in model.graph.node if n.op_type == "Softmax"]
    assert len(softmax) == 2
    for node in softmax:  # its input is cast back to float32 first
        cast = producers[node.input[0]]
        assert cast.op_type == "Cast" and cast.attribute[0].i == TensorProto.FLOAT
    kept = art.manifest["passes"][1]["report"]["components"]["model.onnx"]["kept_float"]
    assert sorted(kept) == sorted(n.name for n in softmax)


def test_failed_graph_check_publishes_nothing(tiny_bert_dir, tmp_path):
    # Keeping every weight-bearing op in float32 leaves the "fp16" artifact mostly float32: the check refuses it.
    keep = "[MatMul,Attention,EmbedLayerNormalization,SkipLayerNormalization,BiasGelu]"
    with pytest.raises(ValidationFailedError, match="float weight bytes are float16"):
        optimize(str(tiny_bert_dir), "cuda-fp16", tmp_path / "a", overrides=[f"fp16.keep_float_ops={keep}"])
    assert list(tmp_path.iterdir()) == []


def test_tensorrt_fp16_plain_graph_caches_and_profiles(trt_fp16):
    m = trt_fp16.manifest
    model = _load(trt_fp16)
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)  # TensorRT parses every node
    assert m["validation"]["checks"]["model.onnx"]["tensorrt_unparsable_ops"] == []
    assert m["validation"]["deferred"] == (None if HAS_TRT else "TensorrtExecutionProvider not available")
    options = m["target"]["provider_options"]
    assert options["trt_fp16_enable"] is True and m["target"]["fallback_providers"] == ["CUDAExecutionProvider"]
    assert options["trt_profile_opt_shapes"] == "*:4x64"  # the --set override, recorded
    resolved = resolve_provider_options(expand_profile_shapes(options, trt_fp16.path / "model.onnx"), trt_fp16.path)
    for key in ("trt_engine_cache_path", "trt_timing_cache_path"):
        path = resolved[key]
        assert os.path.isabs(path) and os.path.isdir(path) and path.startswith(str(trt_fp16.path))
    assert resolved["trt_fp16_enable"] == "true"
    assert resolved["trt_profile_opt_shapes"] == "input_ids:4x64,attention_mask:4x64,token_type_ids:4x64"
    assert resolved["trt_profile_max_shapes"].count(":32x512") == 3


def _exported(trt_fp16, tmp_path, symmetric: bool):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.batches = iter([{"input_ids": rng.integers(1000, 5000, (2, 12)), "attention_mask": np.ones((2, 12),
                                  np.int64), "token_type_ids": np.zeros((2, 12), np.int64)} for _ in range(3)])

        def get_next(self):
            return next(self.batches, None)

    out = tmp_path / f"qdq-{symmetric}.onnx"
    quantize_static(str(trt_fp16.path / "model.onnx"), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=["MatMul"], per_channel=True, weight_type=QuantType.QInt8,
                    activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                    extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True})
    return onnx.load(str(out))


def test_qdq_check_accepts_symmetric_int8_and_rejects_the_rest(trt_fp16, tmp_path):
    facts, failures = check_qdq(_exported(trt_fp16, tmp_path, symmetric=True), "model.onnx")
    assert failures == [] and facts["MatMul_quantized"] == 16 and facts["nonsymmetric_zero_points"] == 0
    assert facts["quantize_linear"] > 0 and facts["dequantize_linear"] > facts["quantize_linear"]
    _, failures = check_qdq(_exported(trt_fp16, tmp_path, symmetric=False), "model.onnx")
    assert len(failures) == 1 and "zero points are not int8 0" in failures[0] and "uint8" in failures[0]
    _, failures = check_qdq(_load(trt_fp16), "model.onnx")  # a float graph is not QDQ at all
    assert any("not QDQ" in f for f in failures)


def test_tensorrt_int8_is_symmetric_qdq(tiny_bert_dir, tmp_path):
    art = optimize(str(tiny_bert_dir), "tensorrt-int8", tmp_path / "int8")
    v = art.manifest["validation"]
    qdq = v["checks"]["model.onnx"]["qdq"]
    assert v["passed"] and qdq["nonsymmetric_zero_points"] == 0 and qdq["MatMul_quantized"] > 0
    assert qdq["qoperator_ops"] == [] and v["checks"]["model.onnx"]["tensorrt_unparsable_ops"] == []
    facts, failures = check_qdq(_load(art), "model.onnx", kept_float=tuple(
        art.manifest["passes"][1]["report"]["components"]["model.onnx"]["kept_float"]))
    assert failures == [] and facts == {k: qdq[k] for k in facts}
    options = art.manifest["target"]["provider_options"]
    assert options["trt_int8_enable"] is True and options["trt_fp16_enable"] is True


@pytest.mark.skipif(HAS_CUDA, reason="CUDA works here: nothing is missing")
def test_missing_provider_is_one_line_with_the_install_command():
    for provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        with pytest.raises(ProviderUnavailableError) as err:
            require_provider(provider)
        message = str(err.value)
        assert err.value.exit_code == 4 and "\n" not in message
        assert message.startswith(f"{provider} is not available") and "pip install" in message
        assert "onnxruntime-gpu" in message
    assert "tensorrt-cu" in str(pytest.raises(ProviderUnavailableError, require_provider,
                                              "TensorrtExecutionProvider").value)


def test_cli_run_says_deferred(tiny_bert_dir, tmp_path, cuda_fp16):
    result = subprocess.run([sys.executable, "-m", "optpipe", "run", str(tiny_bert_dir), "-t", "cuda-fp16",
                             "-o", str(tmp_path / "art")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    if not HAS_CUDA:
        assert "deferred (CUDAExecutionProvider not available)" in result.stdout
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["pipeline"] == "export,fuse{flavor=gpu},fp16{keep_io_types=true}"


@pytest.mark.skipif(HAS_CUDA, reason="CUDA works here: the GPU run is not deferred")
def test_graph_cpu_cannot_run_is_recorded_not_failed(cuda_fp16, tiny_bert_dir, tmp_path):
    """A GPU graph may hold an op with only a CUDA kernel (here BiasAdd): CPU validation says so plainly."""
    from onnx import helper

    from optpipe.passbase import ModelFiles
    from optpipe.source import resolve_source
    from optpipe.targets import load_target
    from optpipe.validation.validate import validate

    shutil.copytree(cuda_fp16.path, tmp_path / "a")
    model = onnx.load(str(tmp_path / "a" / "model.onnx"))
    out = model.graph.output[0]
    hidden = next(n for n in model.graph.node if out.name in n.output)
    hidden.output[list(hidden.output).index(out.name)] = "pre_bias"
    zeros = helper.make_tensor("zero_bias", TensorProto.FLOAT, [64], [0.0] * 64)
    model.graph.initializer.append(zeros)
    model.graph.node.append(helper.make_node("BiasAdd", ["pre_bias", "zero_bias", "pre_bias"], [out.name],
                                             domain="com.microsoft", name="cuda_only_bias_add"))
    onnx.save(model, str(tmp_path / "a" / "model.onnx"))
    files = ModelFiles(tmp_path / "a", "onnx", ("model.onnx",))
    result = validate(resolve_source(str(tiny_bert_dir)), files, load_target("cuda-fp16"), texts=("a short text",))
    assert result.passed and result.metrics == {}
    assert result.deferred.startswith("CUDAExecutionProvider not available; CPUExecutionProvider could not run it")
    assert "BiasAdd" in result.deferred and "\n" not in result.deferred
    assert result.checks["model.onnx"]["fp16"]["float16_share"] > 0.9  # the graph checks still ran


def test_bundled_minilm_cuda_fp16(tmp_path_factory):
    art = optimize(None, "cuda-fp16", tmp_path_factory.mktemp("bundled") / "cuda-fp16")
    m = art.manifest
    assert m["graph"]["model.onnx"]["fused_ops"]["Attention"] == 6
    assert m["graph"]["model.onnx"]["fused_ops"]["SkipLayerNormalization"] == 12
    assert m["validation"]["checks"]["model.onnx"]["fp16"]["float16_share"] == 1.0
    assert m["validation"]["passed"] and m["validation"]["metrics"]["mean_cosine"] >= 0.999
    assert m["size"]["onnx_bytes"] < 0.52 * m["size"]["source_bytes"]


@pytest.mark.skipif(HAS_CUDA, reason="CUDA works here: nothing is missing")
def test_timing_a_gpu_artifact_without_its_provider_is_one_line_exit_4(cuda_fp16, trt_fp16):
    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_latency.py"
    result = subprocess.run([sys.executable, str(script), str(cuda_fp16.path), "--iters", "1", "--warmup", "0"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 4 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "CUDAExecutionProvider is not available" in lines[0] and "pip install" in lines[0]
    # with --cpu the same code path measures on CPU (the dry run of bench/gpu_check.sh)
    ok = subprocess.run([sys.executable, str(script), str(trt_fp16.path), "--cpu", "--batch-sizes", "1,2", "--seq",
                         "16", "--iters", "2", "--warmup", "0"], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert [line.split()[2:4] for line in ok.stdout.splitlines()] == [["bs", "1"], ["bs", "2"]]


@pytest.mark.skipif(HAS_CUDA, reason="CUDA works here: nothing is missing")
def test_harness_bench_refuses_gpu_artifacts_with_exit_4(cuda_fp16, trt_fp16):
    from optpipe.perf.harness import bench

    for artifact, provider in ((cuda_fp16, "CUDAExecutionProvider"), (trt_fp16, "TensorrtExecutionProvider")):
        with pytest.raises(ProviderUnavailableError) as err:
            bench([artifact.path], batches=[1], seqs=[16], runs=2)
        assert err.value.exit_code == 4 and str(err.value).startswith(f"{provider} is not available")


@pytest.mark.skipif(HAS_CUDA, reason="CUDA works here: nothing is missing")
def test_cli_bench_on_a_gpu_artifact_is_one_line_exit_4(cuda_fp16, trt_fp16):
    for artifact, provider in ((cuda_fp16, "CUDAExecutionProvider"), (trt_fp16, "TensorrtExecutionProvider")):
        result = subprocess.run([sys.executable, "-m", "optpipe", "bench", str(artifact.path), "--runs", "2"],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 4 and "Traceback" not in result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("optpipe: error:")]
        assert len(errors) == 1 and f"{provider} is not available" in errors[0] and "pip install" in errors[0]
