"""Decoders end to end: llama / qwen2 / mistral through cpu-fp32, cpu-int8 (8-bit weight-only) and cpu-int4,
fused at export, validated against PyTorch (next-token agreement, perplexity ratio), loadable by Optimum; a GGUF
source whose blocks are carried over unchanged; and the errors a user meets."""

from __future__ import annotations

import onnx
import pytest

from optpipe import optimize
from optpipe.errors import UnsupportedModelError
from tests import models
from tests.test_gguf import tokenizer_fields, write_gguf  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def decoder_dirs(tmp_path_factory):
    built = {}

    def get(name):
        if name not in built:
            built[name] = getattr(models, f"tiny_{name}")(tmp_path_factory.mktemp(name) / "model")
        return built[name]

    return get


def _ops(artifact) -> dict[str, int]:
    return artifact.manifest["graph"]["model.onnx"]["ops"]


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral"])
def test_decoder_int8_is_fused_weight_only_and_validated(decoder_dirs, tmp_path, name):
    art = optimize(str(decoder_dirs(name)), "cpu-int8", tmp_path / "int8")
    m = art.manifest
    assert m["pipeline"].startswith("export{gguf_blocks=true},fuse") and "weight_only{bits=8" in m["pipeline"]
    ops = _ops(art)
    assert ops["GroupQueryAttention"] == 2 and ops["SkipSimplifiedLayerNormalization"] >= 3
    assert ops.get("MatMulInteger", 0) == 0 and ops.get("DynamicQuantizeLinear", 0) == 0  # not dynamic INT8
    report = m["passes"][2]["report"]["components"]["model.onnx"]
    # q/k/v and gate/up are packed (one node each, as GroupQueryAttention and the GenAI builder take them):
    # qkv, o, gate_up, down per layer, 2 layers, and the lm_head unless it is tied to the float embedding table
    assert report["lm_head"]
    assert ops["MatMulNBits"] == sum(report["quantized"].values()) == 4 * 2 + ("-bit" in report["lm_head"])
    v = m["validation"]
    assert v["passed"] and v["metrics"]["next_token_agreement"] >= 0.95
    assert v["metrics"]["perplexity_ratio"] <= 1.03 and v["thresholds"]["perplexity_ratio"] == 1.03
    assert (art.path / "genai_config.json").is_file()
    profile = m["profile"]["workloads"]  # one profiled session, its trace split by run: each window is one step
    assert set(profile) == {"prefill", "decode"}
    assert all(p["ops"]["GroupQueryAttention"]["nodes"] == 2 and p["ms_per_run"] > 0 for p in profile.values())


def test_int4_smaller_than_int8_and_generates_with_optimum(decoder_dirs, tmp_path):
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    int8 = optimize(str(decoder_dirs("llama")), "cpu-int8", tmp_path / "int8")
    int4 = optimize(str(decoder_dirs("llama")), "cpu-int4", tmp_path / "int4")
    assert [p["cached"] for p in int4.manifest["passes"]][:2] == [True, True]  # export and fuse shared with int8
    def qkv_bytes(art):  # the first layer's packed q/k/v weight as MatMulNBits stores it
        return sum(len(i.raw_data) for i in onnx.load(str(art.path / "model.onnx")).graph.initializer
                   if i.name.startswith("model.layers.0.self_attn.qkv_proj.weight.T_Q"))

    assert 0 < qkv_bytes(int4) * 2 <= qkv_bytes(int8)
    bits = {next(a.i for a in node.attribute if a.name == "bits")
            for node in onnx.load(str(int4.path / "model.onnx")).graph.node if node.op_type == "MatMulNBits"}
    assert 4 in bits
    assert int4.manifest["validation"]["metrics"]["perplexity_ratio"] <= 1.15
    tokenizer = AutoTokenizer.from_pretrained(int4.path)
    model = ORTModelForCausalLM.from_pretrained(int4.path)
    out = model.generate(**tokenizer(["a quiet street"], return_tensors="pt"), max_new_tokens=6, min_new_tokens=6,
                         do_sample=False)
    assert out.shape[1] >= 6


def test_cpu_int4_of_an_encoder_says_what_to_use(tiny_bert_dir, tmp_path):
    with pytest.raises(UnsupportedModelError, match="cpu-int4 is for decoders.*use cpu-int8"):
        optimize(str(tiny_bert_dir), "cpu-int4", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_optimum_only_export_options_are_refused_on_the_fused_graph(decoder_dirs, tmp_path):
    from optpipe.errors import InvalidOptionError

    for option in ("use_past=false", "opset=17"):
        with pytest.raises(InvalidOptionError, match=f"export.{option}: .*export.decoder=optimum"):
            optimize(str(decoder_dirs("llama")), "cpu-fp32", tmp_path / "x", pipeline=f"export{{{option}}}")
    assert not (tmp_path / "x").exists()


def test_pad_less_tokenizer_is_handled(decoder_dirs, tmp_path):
    """Llama-3, Mistral and SmolLM2 ship no pad token; validation pads batches anyway."""
    import shutil

    from transformers import AutoTokenizer

    src = tmp_path / "nopad"
    shutil.copytree(decoder_dirs("llama"), src)
    tokenizer = AutoTokenizer.from_pretrained(src)
    tokenizer.eos_token = "[SEP]"  # as LLM tokenizers do: an end-of-sequence token, and no pad token
    tokenizer.pad_token = None
    tokenizer.save_pretrained(src)
    assert AutoTokenizer.from_pretrained(src).pad_token is None
    art = optimize(str(src), "cpu-fp32", tmp_path / "fp32")
    assert art.manifest["validation"]["metrics"]["next_token_agreement"] >= 0.99


def test_gguf_q4_source_carries_its_blocks_to_cpu_int4(tmp_path, tokenizer_fields):
    """A tiny llama GGUF (Q4_0 / Q4_1 / Q8_0 linears) through cpu-int4: the carried MatMulNBits dequantize to the
    GGUF's own values, so the artifact agrees with the (dequantized) PyTorch model almost exactly."""
    path = tmp_path / "tiny.gguf"
    write_gguf(path, tokenizer_fields)
    # float compute (accuracy level 0) isolates the weights: carried blocks must reproduce the model exactly
    art = optimize(str(path), "cpu-int4", tmp_path / "int4", overrides=["export.accuracy_level=0"])
    export = art.manifest["passes"][0]["report"]
    assert export["exporter"] == "optpipe decoder builder" and export["gguf_blocks"]["carried"]
    assert art.manifest["source"]["gguf_types"]
    v = art.manifest["validation"]
    assert v["thresholds"]["next_token_agreement"] == 0.95 and v["passed"]
    assert v["metrics"]["next_token_agreement"] >= 0.99 and v["metrics"]["max_abs_diff"] < 1e-3
    assert abs(v["metrics"]["perplexity_ratio"] - 1) < 1e-3
    ops = _ops(art)
    assert ops["MatMulNBits"] >= 10 and ops.get("MatMul", 0) >= 1  # Q4_1 blocks: MatMulNBits + block offsets
    if export["gguf_blocks"]["carried"].get("model.embed_tokens.weight") in ("Q4_0", "Q8_0"):
        assert ops["GatherBlockQuantized"] == 1  # the embedding stays in its blocks: no float table is stored
        stored = {i.name for i in onnx.load(str(art.path / "model.onnx")).graph.initializer}
        assert "model.embed_tokens.weight" not in stored


def test_mixed_precision_keeps_the_most_sensitive_layer_float(decoder_dirs, tmp_path):
    """weight_only.sensitivity_fallback=1: each layer quantized alone, scored by next-token KL on the calibration
    texts; the worst one keeps its linears float and the report says which and why."""
    art = optimize(str(decoder_dirs("llama")), "cpu-int8", tmp_path / "mixed",
                   overrides=["weight_only.sensitivity_fallback=1"])
    report = art.manifest["passes"][2]["report"]["components"]["model.onnx"]
    scores = {int(label.removeprefix("layer ")): kl for label, kl in report["layer_sensitivity"].items()}
    assert sorted(scores) == [0, 1] and all(kl > 0 for kl in scores.values())
    worst = max(scores, key=scores.get)
    assert report["kept_by_sensitivity"] == [f"layer {worst}"]
    kept = [name for name, why in report["kept_float"].items() if "by sensitivity" in why]
    graph = onnx.load(str(art.path / "model.onnx")).graph
    assert kept and set(kept) <= {n.name for n in graph.node if n.op_type == "MatMul"}
    assert all(f"model.layers.{worst}." in name for name in kept)
    nbits = [n.name for n in graph.node if n.op_type == "MatMulNBits"]
    assert nbits and not any(f"model.layers.{worst}." in name for name in nbits)
    assert art.manifest["validation"]["passed"]


def test_tied_head_is_quantized_through_its_own_copy(decoder_dirs, tmp_path):
    """qwen2's lm_head is tied: cpu-int8 gives it an 8-bit copy; the embedding Gather keeps the float table."""
    art = optimize(str(decoder_dirs("qwen2")), "cpu-int8", tmp_path / "tied")
    report = art.manifest["passes"][2]["report"]["components"]["model.onnx"]
    assert "8-bit (its own copy of the tied embedding table" in report["lm_head"]
    graph = onnx.load(str(art.path / "model.onnx")).graph
    assert [n.name for n in graph.node if n.op_type == "MatMulNBits" and n.name.startswith("lm_head")]
    assert any(n.op_type == "Gather" and n.input[0] == "model.embed_tokens.weight" for n in graph.node)
    assert art.manifest["validation"]["passed"]


def test_a_refused_weight_only_artifact_suggests_mixed_precision(decoder_dirs, tmp_path):
    from optpipe.errors import ValidationFailedError

    with pytest.raises(ValidationFailedError, match=r"--set weight_only\.sensitivity_fallback=5"):
        optimize(str(decoder_dirs("llama")), "cpu-int8", tmp_path / "x", overrides=["validate.perplexity_ratio=0.5"])
    assert not (tmp_path / "x").exists()


def test_sensitivity_groups_are_layers_or_else_nodes():
    from optpipe.passes.weight_sensitivity import sensitivity_groups

    names = ["model.layers.12.mlp.down_proj/MatMul", "/transformer/h.3/attn/c_attn/MatMul",
             "model.layers.12.self_attn.qkv_proj/MatMul", "lm_head/Gemm"]
    assert sensitivity_groups(names) == {"layer 3": [names[1]], "layer 12": [names[0], names[2]]}
    fused = ["FullyConnect_MatMul_0", "FullyConnect_MatMul_1"]  # ORT's gpt2 fusion: no layer index left
    assert sensitivity_groups(fused) == {name: [name] for name in fused}


def test_mixed_precision_node_by_node_when_names_have_no_layer(decoder_dirs, tmp_path):
    """gpt2 after ONNX Runtime's fusion: the most sensitive single MatMul stays float, named in the report."""
    art = optimize(str(decoder_dirs("gpt2")), "cpu-int8", tmp_path / "gpt2",
                   overrides=["weight_only.sensitivity_fallback=1"])
    report = art.manifest["passes"][-1]["report"]["components"]["model.onnx"]
    (kept,) = report["kept_by_sensitivity"]
    assert kept in report["layer_sensitivity"] and len(report["layer_sensitivity"]) >= 4
    assert "by sensitivity" in report["kept_float"][kept]
    graph = onnx.load(str(art.path / "model.onnx")).graph
    assert any(n.name == kept and n.op_type == "MatMul" for n in graph.node)
