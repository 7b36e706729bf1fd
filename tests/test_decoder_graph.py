"""decoder_graph: the fused llama/qwen2/mistral graph against PyTorch, through ORT, Optimum and onnxruntime-genai."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from optpipe.errors import UnsupportedModelError
from optpipe.passes.decoder_graph import build_decoder, write_genai_config
from optpipe.passes.nbits import NBitsWeight

TEXTS = ["The river rose after three days of rain and the town flooded.", "She sold it."]
ARCHS = ("llama", "qwen2", "mistral")


@pytest.fixture(scope="module")
def built(arch_dirs, tmp_path_factory):
    """name -> (HF dir, artifact dir with model.onnx + config + tokenizer + genai_config.json, report), built once."""
    done: dict[str, tuple] = {}

    def get(name: str) -> tuple:
        if name not in done:
            source = arch_dirs(name)
            out = tmp_path_factory.mktemp(f"decoder-graph-{name}")
            report = build_decoder(source, out / "model.onnx")
            write_genai_config(source, out)
            done[name] = (source, out, report)
        return done[name]

    return get


def _torch(source: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()


def _batch(source: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, padding_side="left")
    return tokenizer(TEXTS, return_tensors="pt", padding=True, return_token_type_ids=False)


def _session(path: Path, extra_outputs: tuple[str, ...] = ()) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    if extra_outputs:
        model = onnx.load(str(path))
        model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in extra_outputs)
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _empty_past(config, batch: int) -> dict[str, np.ndarray]:
    head_dim = config.hidden_size // config.num_attention_heads
    empty = np.zeros((batch, config.num_key_value_heads, 0, head_dim), np.float32)
    return {f"past_key_values.{i}.{kind}": empty for i in range(config.num_hidden_layers) for kind in ("key", "value")}


def _prefill_and_decode(session, model, enc):
    """ORT and torch logits for a left-padded prefill and one decode step with the returned KV cache."""
    feed = {"input_ids": enc.input_ids.numpy(), "attention_mask": enc.attention_mask.numpy(),
            **_empty_past(model.config, enc.input_ids.shape[0])}
    names = [o.name for o in session.get_outputs()]
    outs = dict(zip(names, session.run(None, feed)))
    positions = (enc.attention_mask.cumsum(-1) - 1).clamp(min=0)  # what generate() passes for left padding
    with torch.no_grad():
        ref = model(**enc, position_ids=positions, use_cache=True)
    step = ref.logits[:, -1].argmax(-1, keepdim=True)
    mask = torch.cat([enc.attention_mask, torch.ones_like(step)], dim=1)
    feed = {"input_ids": step.numpy(), "attention_mask": mask.numpy()}
    feed.update({n.replace("present", "past_key_values"): v for n, v in outs.items() if n.startswith("present")})
    decoded = session.run(["logits"], feed)[0]
    with torch.no_grad():
        ref_step = model(input_ids=step, attention_mask=mask, past_key_values=ref.past_key_values,
                         position_ids=positions[:, -1:] + 1).logits
    return outs["logits"], ref.logits.numpy(), decoded, ref_step.numpy()


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_torch_on_padded_prefill_and_decode(built, arch):
    source, out, _ = built(arch)
    model = _torch(source)
    enc = _batch(source)
    assert (enc.attention_mask == 0).any(), "the batch must be padded for this test to mean anything"
    prefill, ref, decoded, ref_step = _prefill_and_decode(_session(out / "model.onnx"), model, enc)
    valid = enc.attention_mask.numpy().astype(bool)  # pad positions' logits are unspecified
    assert np.abs(prefill - ref)[valid].max() < 1e-3
    assert np.abs(decoded - ref_step).max() < 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_graph_is_fused(built, arch):
    source, out, report = built(arch)
    ops = [n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node]
    layers = report.layers
    assert ops.count("GroupQueryAttention") == layers == report.op_counts["GroupQueryAttention"]
    assert ops.count("SkipSimplifiedLayerNormalization") == 2 * layers
    assert ops.count("SimplifiedLayerNormalization") == 1
    gqa = [n for n in onnx.load(str(out / "model.onnx")).graph.node if n.op_type == "GroupQueryAttention"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gqa[0].attribute}
    assert attrs["do_rotary"] == 1 and attrs["num_heads"] == 4 and attrs["kv_num_heads"] == 2
    assert attrs["local_window_size"] == (6 if arch == "mistral" else -1)
    # q/k/v packed into one linear (GQA's packed input: key and value empty), gate/up into one, split after it
    assert list(gqa[0].input[1:3]) == ["", ""] and gqa[0].input[0].startswith("model.layers.0.self_attn.qkv_proj/")
    assert ops.count("MatMul") == 4 * layers + (arch != "qwen2") and ops.count("Split") == layers
    session = _session(out / "model.onnx")
    assert [i.name for i in session.get_inputs()][:2] == ["input_ids", "attention_mask"]
    assert "position_ids" not in [i.name for i in session.get_inputs()]
    if arch == "qwen2":  # tied: the table is stored once and lm_head reads it
        assert report.tied_lm_head == "gemm"
        names = [i.name for i in onnx.load(str(out / "model.onnx")).graph.initializer]
        assert "model.embed_tokens.weight" in names and not any(n.startswith("lm_head") for n in names)


def test_sliding_window_is_applied(built):
    """The mistral texts are longer than its window of 6: without the window torch gives other logits."""
    source, out, _ = built("mistral")
    model = _torch(source)
    enc = _batch(source)
    prefill, ref, _, _ = _prefill_and_decode(_session(out / "model.onnx"), model, enc)
    model.config.sliding_window = None
    with torch.no_grad():
        unwindowed = model(**enc).logits.numpy()
    valid = enc.attention_mask.numpy().astype(bool)
    assert np.abs(unwindowed - ref)[valid].max() > 1e-2
    assert np.abs(prefill - ref)[valid].max() < 1e-3


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_optimum_generate_equals_torch(built, arch):
    from optimum.onnxruntime import ORTModelForCausalLM

    source, out, _ = built(arch)
    enc = _batch(source)
    kwargs = dict(do_sample=False, max_new_tokens=8, min_new_tokens=8)
    ours = ORTModelForCausalLM.from_pretrained(out).generate(**enc, **kwargs)
    assert torch.equal(ours, _torch(source).generate(**enc, **kwargs))


def _rtn4(w: np.ndarray, block: int = 32) -> NBitsWeight:
    """Symmetric 4-bit round-to-nearest, MatMulNBits layout (zero point 8 implied)."""
    n, k = w.shape
    blocks = w.reshape(n, k // block, block)
    scales = np.abs(blocks).max(axis=-1, keepdims=True) / 7.0
    q = (np.clip(np.round(blocks / scales), -8, 7) + 8).astype(np.uint8)
    packed = q[..., 0::2] | (q[..., 1::2] << 4)
    return NBitsWeight(packed=packed, scales=scales.reshape(-1).astype(np.float32), zero_points=None, bits=4,
                       block_size=block, k=k, n=n)


def test_matmulnbits_override(built, tmp_path):
    source, _, _ = built("llama")
    model = _torch(source)
    name = "model.layers.1.self_attn.q_proj.weight"
    quantized = _rtn4(model.state_dict()[name].numpy())
    report = build_decoder(source, tmp_path / "model.onnx", weights=lambda n: quantized if n == name else None)
    assert report.nbits_linears == (name,) and report.op_counts["MatMulNBits"] == 1
    node = next(n for n in onnx.load(str(tmp_path / "model.onnx")).graph.node if n.op_type == "MatMulNBits")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert (attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]) == (64, 64, 4, 32)
    session = _session(tmp_path / "model.onnx", extra_outputs=(node.input[0], node.output[0]))
    enc = _batch(source)
    feed = {"input_ids": enc.input_ids.numpy(), "attention_mask": enc.attention_mask.numpy(),
            **_empty_past(model.config, 2)}
    outs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))
    x, y = outs[node.input[0]], outs[node.output[0]]
    assert np.abs(y - x @ quantized.dequantize().T).max() < 1e-4
    # end to end: the graph equals torch with the dequantized weight in place
    with torch.no_grad():
        model.get_parameter(name).copy_(torch.from_numpy(quantized.dequantize()))
    prefill, ref, _, _ = _prefill_and_decode(_session(tmp_path / "model.onnx"), model, enc)
    assert np.abs(prefill - ref)[enc.attention_mask.numpy().astype(bool)].max() < 1e-3


def _with_config(source: Path, dest: Path, **changes) -> Path:
    shutil.copytree(source, dest)
    config = json.loads((dest / "config.json").read_text())
    config.update(changes)
    (dest / "config.json").write_text(json.dumps(config))
    return dest


ROPE_SCALING = {
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
    "linear": {"rope_type": "linear", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
}


@pytest.mark.parametrize("kind", sorted(ROPE_SCALING))
def test_rope_scaling_matches_torch(built, tmp_path, kind):
    source, _, _ = built("llama")
    scaled = _with_config(source, tmp_path / kind, rope_scaling=ROPE_SCALING[kind])
    build_decoder(scaled, tmp_path / "model.onnx")
    enc = _batch(scaled)
    prefill, ref, decoded, ref_step = _prefill_and_decode(_session(tmp_path / "model.onnx"), _torch(scaled), enc)
    assert np.abs(prefill - ref)[enc.attention_mask.numpy().astype(bool)].max() < 1e-3
    assert np.abs(decoded - ref_step).max() < 1e-3


def test_external_data_above_threshold(built, tmp_path, monkeypatch):
    """Graphs over the threshold (1.8 GB) keep their weights in model.onnx.data; tried here with a tiny threshold."""
    import optpipe.passbase as passbase

    source, out, _ = built("llama")
    monkeypatch.setattr(passbase, "EXTERNAL_DATA_BYTES", 10_000)  # the one threshold every pass saves with
    (tmp_path / "model.onnx.data").write_bytes(b"stale" * 1000)  # a previous build's data is replaced, not appended to
    build_decoder(source, tmp_path / "model.onnx")
    assert (tmp_path / "model.onnx.data").stat().st_size > 10 * (tmp_path / "model.onnx").stat().st_size
    enc = _batch(source)
    feed = {"input_ids": enc.input_ids.numpy(), "attention_mask": enc.attention_mask.numpy(),
            **_empty_past(_torch(source).config, 2)}
    inline, external = (_session(p).run(["logits"], feed)[0] for p in (out / "model.onnx", tmp_path / "model.onnx"))
    assert np.array_equal(inline, external)


def test_unsupported_models_raise(built, tmp_path):
    from tests.models import tiny_gpt2

    with pytest.raises(UnsupportedModelError, match="model_type 'gpt2'"):
        build_decoder(tiny_gpt2(tmp_path / "gpt2", steps=0), tmp_path / "gpt2.onnx")
    source, _, _ = built("llama")
    dynamic = _with_config(source, tmp_path / "dynamic", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(UnsupportedModelError, match="rope_scaling type 'dynamic'"):
        build_decoder(dynamic, tmp_path / "dynamic.onnx")
    assert not (tmp_path / "gpt2.onnx").exists() and not (tmp_path / "dynamic.onnx").exists()


def test_genai_generates_torch_greedy(built):
    """A batch as onnxruntime-genai pads it (on the right, with pad_token_id): each row is torch's greedy output."""
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    from transformers import AutoTokenizer

    source, out, _ = built("llama")
    config = json.loads((out / "genai_config.json").read_text())
    assert config["model"]["decoder"]["filename"] == "model.onnx" and config["model"]["type"] == "llama"
    rows = [AutoTokenizer.from_pretrained(source)(text, return_token_type_ids=False).input_ids for text in TEXTS]
    width, pad = max(map(len, rows)), config["model"]["pad_token_id"]
    model = og.Model(str(out))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=width + 8, do_sample=False, batch_size=len(rows))
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([row + [pad] * (width - len(row)) for row in rows], dtype=np.int32))
    tokens: list[list[int]] = [[] for _ in rows]
    for _ in range(8):
        generator.generate_next_token()
        for row, token in zip(tokens, generator.get_next_tokens()):
            row.append(int(token))
    reference = _torch(source)
    for ids, generated in zip(rows, tokens):
        expected = reference.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                      do_sample=False, max_new_tokens=8, min_new_tokens=8)[0, len(ids):].tolist()
        assert generated == expected


def test_tied_lm_head_as_matmulnbits_with_float_zero_points(built, tmp_path):
    """An NBits lm_head on a tied model: the head becomes MatMulNBits, the Gather keeps the float table."""
    source, _, _ = built("qwen2")
    model = _torch(source)
    w = model.lm_head.weight.detach().numpy()
    n, k = w.shape
    blocks = w.reshape(n, k // 32, 32)
    low, high = blocks.min(axis=-1, keepdims=True), blocks.max(axis=-1, keepdims=True)
    scales = (high - low) / 15.0
    zero = np.round(-low / scales)
    q = np.clip(np.round(blocks / scales) + zero, 0, 15).astype(np.uint8)
    head = NBitsWeight(packed=q[..., 0::2] | (q[..., 1::2] << 4), scales=scales.reshape(-1).astype(np.float32),
                       zero_points=zero.reshape(-1).astype(np.float32), bits=4, block_size=32, k=k, n=n)
    report = build_decoder(source, tmp_path / "model.onnx", weights=lambda name: head if name == "lm_head.weight"
                           else None, accuracy_level=4)
    assert report.tied_lm_head == "untied" and report.nbits_linears == ("lm_head.weight",)
    with torch.no_grad():
        model.lm_head.weight = torch.nn.Parameter(torch.from_numpy(head.dequantize()))
    enc = _batch(source)
    prefill, ref, decoded, ref_step = _prefill_and_decode(_session(tmp_path / "model.onnx"), model, enc)
    node = next(n for n in onnx.load(str(tmp_path / "model.onnx")).graph.node if n.op_type == "MatMulNBits")
    assert {a.name: a.i for a in node.attribute}["accuracy_level"] == 4
    # level 4 allows int8 activations inside MatMulNBits (ORT 1.32 measured 5e-6 here; logits reach 10)
    assert np.abs(prefill - ref)[enc.attention_mask.numpy().astype(bool)].max() < 1e-2
    assert np.abs(decoded - ref_step).max() < 1e-2
