"""Every common architecture through cpu-int8 (and cpu-fp32 for generation equality), on tiny real models.

Each artifact is checked the way a user would use it: the manifest's per-component claims against the files,
loading with the matching Optimum class, and `.generate()` for generators compared with PyTorch.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from optpipe import Artifact, optimize
from optpipe.errors import UnsupportedModelError

TEXTS = ["The river rose after three days of rain.", "She sold the old piano to a school."]
SEQ2SEQ = ("encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx")


@pytest.fixture(scope="module")
def artifacts(arch_dirs, tmp_path_factory):
    """Artifacts by (model name, target), built on first use; the pass cache shares export and fuse."""
    built: dict[tuple[str, str], Artifact] = {}

    def get(name: str, target: str = "cpu-int8") -> Artifact:
        if (name, target) not in built:
            out = tmp_path_factory.mktemp(f"{name}-{target}") / "artifact"
            built[(name, target)] = optimize(str(arch_dirs(name)), target=target, output=out)
        return built[(name, target)]

    return get


def _component_facts(artifact: Artifact) -> dict[str, tuple[dict, dict]]:
    """component -> (fuse report, quantize report), as the manifest records them."""
    passes = {p["name"]: p["report"] for p in artifact.manifest["passes"]}
    return {c: (passes["fuse"]["components"][c], passes["quantize"]["components"][c])
            for c in artifact.manifest["components"]}


def _assert_quantized_everywhere(artifact: Artifact) -> None:
    for component, (fused, quantized) in _component_facts(artifact).items():
        on_disk = {n.op_type for n in onnx.load(str(artifact.path / component)).graph.node}
        assert quantized["integer_ops"].get("MatMulInteger", 0) > 0, component
        assert quantized["quantized_nodes"] >= quantized["integer_ops"]["MatMulInteger"], component
        # every MatMul left in float is accounted for with a reason
        nodes = onnx.load(str(artifact.path / component)).graph.node
        dequantized = {out for n in nodes if n.op_type == "DequantizeLinear" for out in n.output}
        float_count = sum(1 for n in nodes if n.op_type in ("MatMul", "Gemm") and n.input[1] not in dequantized)
        assert sum(quantized["float_matmuls"].values()) == float_count, component
        assert "MatMulInteger" in on_disk, component
        graph = artifact.manifest["graph"][component]
        assert graph["integer_ops"] == {k: v for k, v in quantized["integer_ops"].items() if k in graph["integer_ops"]}
        # the fuse report's counts are still what the published graph holds (quantization keeps fused ops)
        # (but for SkipLayerNormalization, split into Sum + LayerNormalization on CPU)
        for op, count in fused["fused"].items():
            split = fused.get("split_skip_layernorm", 0)
            if op in graph["fused_ops"]:
                assert graph["fused_ops"][op] == count + (split if op == "LayerNormalization" else 0), (component, op)
            assert op != "SkipLayerNormalization" or graph["fused_ops"].get(op, 0) == count - split


@pytest.mark.parametrize("name,task,optimum_class", [
    ("distilbert-sequence-classification", "text-classification", "ORTModelForSequenceClassification"),
    ("roberta-sequence-classification", "text-classification", "ORTModelForSequenceClassification"),
    ("roberta-token-classification", "token-classification", "ORTModelForTokenClassification"),
    ("distilbert", "feature-extraction", "ORTModelForFeatureExtraction"),
    ("electra-sequence-classification", "text-classification", "ORTModelForSequenceClassification"),
    ("mpnet", "feature-extraction", "ORTModelForFeatureExtraction"),
    ("albert-token-classification", "token-classification", "ORTModelForTokenClassification"),
])
def test_encoder_int8_publishes_fused_quantized_and_loads_with_optimum(artifacts, arch_dirs, name, task,
                                                                       optimum_class):
    import optimum.onnxruntime as ort_models
    from transformers import AutoTokenizer

    artifact = artifacts(name)
    m = artifact.manifest
    assert m["source"]["task"] == task and m["validation"]["passed"]
    assert m["components"] == ["model.onnx"]
    fuse = m["passes"][1]["report"]
    assert fuse["model_type"] == "bert" and fuse["num_heads"] == 4 and fuse["hidden_size"] == 64
    fused = fuse["components"]["model.onnx"]
    assert fused["fused"].get("SkipLayerNormalization", 0) >= 2 and fused["split_skip_layernorm"] >= 2
    assert m["graph"]["model.onnx"]["fused_ops"].get("LayerNormalization", 0) >= 2
    _assert_quantized_everywhere(artifact)
    if task != "feature-extraction":
        metrics = m["validation"]["metrics"]
        assert metrics["top1_agreement"] >= m["validation"]["thresholds"]["top1_agreement"] == 0.9
        assert 0 < metrics["max_abs_diff"] < 1.0  # int8 moves the logits, but not wildly

    tokenizer = AutoTokenizer.from_pretrained(artifact.path)
    model = getattr(ort_models, optimum_class).from_pretrained(artifact.path)
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    out = model(**enc)
    first = out.logits if task != "feature-extraction" else out.last_hidden_state
    session = ort.InferenceSession(str(artifact.path / "model.onnx"), providers=["CPUExecutionProvider"])
    plain = session.run(None, {i.name: enc[i.name].numpy() for i in session.get_inputs()})[0]
    assert np.allclose(first.detach().numpy(), plain, atol=1e-4)
    assert float(first.std()) > 1e-2  # the tiny model's outputs are not constant


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_causal_lm_int8_with_kv_cache_loads_and_generates(artifacts, name):
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    artifact = artifacts(name)
    m = artifact.manifest
    assert m["source"]["task"] == "text-generation" and m["validation"]["passed"]
    assert m["passes"][0]["report"]["task"] == "text-generation-with-past"
    assert m["components"] == ["model.onnx"]
    inputs = {i.name for i in onnx.load(str(artifact.path / "model.onnx"), load_external_data=False).graph.input}
    assert {"past_key_values.0.key", "past_key_values.1.value"} <= inputs
    # decoders get cpu-int8's [decoder] recipe: 8-bit weight-only MatMulNBits, not dynamic INT8
    weight_only = next(p["report"] for p in m["passes"] if p["name"] == "weight_only")["components"]["model.onnx"]
    ops = m["graph"]["model.onnx"]["ops"]
    assert ops["MatMulNBits"] == sum(weight_only["quantized"].values()) + weight_only["carried"] > 0
    assert "MatMulInteger" not in ops
    metrics = m["validation"]["metrics"]
    assert metrics["next_token_agreement"] >= 0.95 and "greedy_match" in metrics and "perplexity_ratio" in metrics

    tokenizer = AutoTokenizer.from_pretrained(artifact.path)
    model = ORTModelForCausalLM.from_pretrained(artifact.path)
    assert model.use_cache
    enc = tokenizer("The river rose", return_tensors="pt")
    tokens = model.generate(**enc, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert tokens.shape == (1, enc["input_ids"].shape[1] + 8)


def test_llama_is_fused_at_export_and_fuse_says_so(artifacts):
    m = artifacts("llama").manifest
    assert m["passes"][0]["report"]["exporter"] == "optpipe decoder builder"
    fuse = m["passes"][1]["report"]
    assert fuse["note"] == "the exporter wrote the graph fused; nothing left to fuse"
    assert fuse["components"]["model.onnx"]["fused"]["GroupQueryAttention"] == 2
    assert "already fused at export" in fuse["components"]["model.onnx"]["skipped"]


@pytest.mark.parametrize("name,fusion", [("t5", "SkipSimplifiedLayerNormalization"),
                                         ("bart", "SkipLayerNormalization")])
def test_seq2seq_int8_every_component_fused_quantized_and_generates(artifacts, name, fusion):
    from optimum.onnxruntime import ORTModelForSeq2SeqLM
    from transformers import AutoTokenizer

    artifact = artifacts(name)
    m = artifact.manifest
    assert m["source"]["task"] == "text2text-generation" and m["validation"]["passed"]
    assert tuple(m["components"]) == SEQ2SEQ
    assert "decoder_model_merged.onnx" in m["passes"][0]["report"]["dropped"]
    for component in SEQ2SEQ:
        fused = m["passes"][1]["report"]["components"][component]["fused"]
        assert fused.get(fusion, 0) >= 2, component
    _assert_quantized_everywhere(artifact)
    if name == "t5":
        assert "RelativePositionBias" in m["passes"][1]["report"]["note"]

    tokenizer = AutoTokenizer.from_pretrained(artifact.path)
    model = ORTModelForSeq2SeqLM.from_pretrained(artifact.path)
    assert model.decoder_with_past is not None or model.decoder.is_merged is False
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    tokens = model.generate(**enc, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert tokens.shape[0] == 2 and tokens.shape[1] >= 9
    # the quantized decoder_with_past (KV cache) continues exactly as the quantized decoder without cache does
    uncached = model.generate(**enc, max_new_tokens=8, min_new_tokens=8, do_sample=False, use_cache=False)
    assert tokens.tolist() == uncached.tolist()


@pytest.mark.parametrize("name", ["gpt2", "llama", "t5", "bart"])
def test_fp32_greedy_generation_equals_pytorch(artifacts, arch_dirs, name):
    """The validator's greedy_match, re-checked here independently on other prompts."""
    from optimum.onnxruntime import ORTModelForCausalLM, ORTModelForSeq2SeqLM
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    artifact = artifacts(name, "cpu-fp32")
    metrics = artifact.manifest["validation"]["metrics"]
    assert metrics["greedy_match"] == 1.0 and metrics["next_token_agreement"] >= 0.99
    seq2seq = name in ("t5", "bart")
    ref_cls, ort_cls = ((AutoModelForSeq2SeqLM, ORTModelForSeq2SeqLM) if seq2seq
                        else (AutoModelForCausalLM, ORTModelForCausalLM))
    reference = ref_cls.from_pretrained(arch_dirs(name)).eval()
    model = ort_cls.from_pretrained(artifact.path)
    tokenizer = AutoTokenizer.from_pretrained(artifact.path)
    kwargs = {"max_new_tokens": 12, "min_new_tokens": 12, "do_sample": False, "num_beams": 1}
    for text in ("A quiet street at night", "Numbers like 42 and 7"):
        enc = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            expected = reference.generate(**enc, **kwargs)
        got = model.generate(**enc, **kwargs)
        assert got.tolist() == expected.tolist()
        assert len(set(expected[0, -12:].tolist())) > 1  # not one token repeated: the model is not degenerate


def test_supported_tasks_in_a_fresh_process():
    """optimum fills its task registry only when its ONNX configs are imported: the check must not depend on
    another import having done it first."""
    import subprocess
    import sys

    code = ("from optpipe.passes.export import supported_tasks; "
            "print(','.join(supported_tasks('distilbert')), '|', ','.join(supported_tasks('ctrl')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300).stdout
    supported, unsupported = out.strip().split("|")
    assert "text-classification" in supported and "token-classification" in supported
    assert unsupported.strip() == ""


def test_unsupported_architecture_is_a_one_line_error(arch_dirs, tmp_path):
    from tests.test_cli import assert_one_line_error, optpipe

    with pytest.raises(UnsupportedModelError, match=r"model_type 'ctrl' for task text-generation") as info:
        optimize(str(arch_dirs("ctrl")), target="cpu-int8", output=tmp_path / "api")
    assert "\n" not in str(info.value)
    result = optpipe("run", str(arch_dirs("ctrl")), "--target", "cpu-int8", "--output", str(tmp_path / "cli"))
    assert_one_line_error(result, "cannot export model_type 'ctrl'")
    assert not (tmp_path / "api").exists() and not (tmp_path / "cli").exists()
