"""A fused ONNX graph for llama-family decoders (llama, qwen2, mistral), written directly from the HF weights.

ONNX Runtime's transformer optimizer has no llama fusion and onnxruntime-genai's builder needs transformers >= 5,
so this writes what the GenAI builder writes: Gather embedding, (Skip)SimplifiedLayerNormalization,
GroupQueryAttention with rotary inside, SiLU-gated MLP, MatMul or MatMulNBits linears. The graph's inputs and
outputs are the names ORTModelForCausalLM and onnxruntime-genai feed and read (no position_ids: GQA derives
positions from attention_mask).

GroupQueryAttention takes right-padded prompts (row s of a prompt is position s). Hugging Face pads generators on
the left, so the graph rotates each row of a prompt by its count of leading pad tokens before the layers and
rotates the hidden states back after them; a right-padded or unpadded batch is left as it is.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

from optpipe.errors import ModelNotFoundError, UnsupportedModelError
from optpipe.passbase import save_onnx
from optpipe.passes.decoder_layers import GraphWriter, LayerShape, WeightSource, kv_value_info

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
_ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # static frequencies: they fit a precomputed cos/sin cache
_INT64_MAX = np.iinfo(np.int64).max


@dataclass(frozen=True)
class DecoderGraphReport:
    model_type: str
    layers: int
    op_counts: dict[str, int]
    nodes: int
    nbits_linears: tuple[str, ...]  # HF weight names written as MatMulNBits
    overridden: tuple[str, ...]  # HF parameter names taken from `weights` (float or NBits)
    tied_lm_head: str  # "untied", or how the shared embedding table serves as lm_head ("gemm" / "transpose")
    path: Path
    notes: tuple[str, ...] = ()


def _config(model_dir: Path):
    from transformers import AutoConfig

    if not (model_dir / "config.json").is_file():
        raise ModelNotFoundError(f"no config.json in {model_dir}: the decoder graph builder needs a Hugging Face "
                                 "model directory")
    try:
        return AutoConfig.from_pretrained(model_dir)
    except (KeyError, ValueError) as exc:  # a model_type this transformers does not know
        raise UnsupportedModelError(f"unsupported model: transformers cannot read {model_dir / 'config.json'} "
                                    f"({str(exc).splitlines()[0]})") from exc


def _check_supported(config) -> None:
    model_type = config.model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(f"unsupported model: the decoder graph builder handles "
                                    f"{', '.join(SUPPORTED_MODEL_TYPES)}, not model_type {model_type!r}")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"unsupported model: {model_type} with hidden_act {config.hidden_act!r} "
                                    "(the decoder graph builder writes a SiLU-gated MLP)")
    rope_type = _rope_type(config)
    if rope_type not in _ROPE_TYPES:
        raise UnsupportedModelError(f"unsupported model: rope_scaling type {rope_type!r} (the decoder graph builder "
                                    f"handles {', '.join(_ROPE_TYPES)})")
    if getattr(config, "partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError(f"unsupported model: partial_rotary_factor {config.partial_rotary_factor}")


def _rope_type(config) -> str:
    scaling = getattr(config, "rope_scaling", None) or {}
    return scaling.get("rope_type", scaling.get("type", "default"))


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _local_windows(config) -> list[int]:
    """GroupQueryAttention's local_window_size per layer (-1: full attention)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if config.model_type == "mistral":
        return [window or -1] * config.num_hidden_layers
    if layer_types is not None and window:
        return [window if kind == "sliding_attention" else -1 for kind in layer_types]
    return [-1] * config.num_hidden_layers


def rope_caches(config) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [max_position_embeddings, head_dim / 2] in float32, computed as transformers computes them."""
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[_rope_type(config)](config, "cpu")
    positions = torch.arange(config.max_position_embeddings, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq.float())
    return ((freqs.cos() * attention_scaling).numpy().astype(np.float32),
            (freqs.sin() * attention_scaling).numpy().astype(np.float32))


def _load(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    tied = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    params = {name: t.detach().numpy() for name, t in model.state_dict().items()}
    return model.config, params, tied


def _mask_lengths(g: GraphWriter) -> tuple[str, str]:
    """seqlens_k = ReduceSum(attention_mask) - 1 (int32) and total_sequence_length = its width, as GenAI does."""
    summed = g.op("ReduceSum", ["attention_mask", g.const("axes_1", [1])], "/model/attn_mask/ReduceSum", keepdims=0)
    seqlens = g.op("Cast", [g.op("Sub", [summed, g.const("one", 1)], "/model/attn_mask/Sub")],
                   "/model/attn_mask/seqlens_k", to=TensorProto.INT32)
    width = g.op("Gather", [g.op("Shape", ["attention_mask"], "/model/attn_mask/Shape"), g.const("idx_1", 1)],
                 "/model/attn_mask/Gather", axis=0)
    return seqlens, g.op("Cast", [width], "/model/attn_mask/total_seq_len", to=TensorProto.INT32)


def _left_pad_rotation(g: GraphWriter) -> tuple[str, str, str, str]:
    """Per row, its count of leading pads among the new tokens, and the index maps that move them to the end."""
    p = "/model/pad_rotation"
    shape = g.op("Shape", ["input_ids"], f"{p}/Shape")
    batch = g.op("Gather", [shape, g.const("idx_0", 0)], f"{p}/batch", axis=0)
    seq = g.op("Gather", [shape, g.const("idx_1", 1)], f"{p}/seq", axis=0)
    start = g.op("Unsqueeze", [g.op("Neg", [seq], f"{p}/Neg"), g.const("axes_0", [0])], f"{p}/start")
    new_mask = g.op("Slice", ["attention_mask", start, g.const("int64_max", [_INT64_MAX]), g.const("axes_1", [1])],
                    f"{p}/new_mask")
    pads = g.op("ArgMax", [g.op("Cast", [new_mask], f"{p}/Cast", to=TensorProto.INT32)], f"{p}/pads",
                axis=1, keepdims=1)  # first 1 in the row: 0 for an unpadded or right-padded row
    steps = g.op("Range", [g.const("zero", 0), seq, g.const("one", 1)], f"{p}/Range")
    gather_in = g.op("Mod", [g.op("Add", [steps, pads], f"{p}/shift_in"), seq], f"{p}/index_in")
    back = g.op("Mod", [g.op("Add", [g.op("Sub", [steps, pads], f"{p}/Sub"), seq], f"{p}/wrap"), seq], f"{p}/Mod")
    rows = g.op("Unsqueeze", [g.op("Range", [g.const("zero", 0), batch, g.const("one", 1)], f"{p}/rows"),
                              g.const("axes_m1", [-1])], f"{p}/rows2d")
    gather_out = g.op("Add", [back, g.op("Mul", [rows, seq], f"{p}/row_start")], f"{p}/index_out")
    return gather_in, gather_out, batch, seq


def _lm_head(g: GraphWriter, x: str, tied: bool, tied_head: str, hidden: int, batch: str, seq: str) -> tuple[str, str]:
    if not tied or g.overrides("lm_head.weight"):
        return g.linear(x, "lm_head"), "untied"
    table = "model.embed_tokens.weight"
    vocab = g.params[table].shape[0]
    if tied_head == "transpose":  # ORT folds the Transpose of an initializer once, at session creation
        t = g.op("Transpose", [table], "lm_head/Transpose", perm=[1, 0])
        return g.op("MatMul", [x, t], "lm_head/MatMul"), "transpose"
    flat = g.op("Reshape", [x, g.const("rows_by_hidden", [-1, hidden])], "lm_head/Reshape")
    logits = g.op("Gemm", [flat, table], "lm_head/Gemm", transB=1)
    out_shape = g.op("Concat", [g.op("Unsqueeze", [batch, g.const("axes_0", [0])], "lm_head/batch"),
                                g.op("Unsqueeze", [seq, g.const("axes_0", [0])], "lm_head/seq"),
                                g.const("vocab", [vocab])], "lm_head/shape", axis=0)
    return g.op("Reshape", [logits, out_shape], "lm_head/Reshape_out"), "gemm"


def build_decoder(model_dir: Path, out_path: Path, *, weights: WeightSource | None = None, accuracy_level: int = 0,
                  progress: Callable[[str], None] | None = None, tied_head: str = "gemm",
                  centered_offsets: bool = False) -> DecoderGraphReport:
    """Write the fused ONNX graph of the llama/qwen2/mistral model in `model_dir` to `out_path` (model.onnx).

    weights(hf_param_name) may return an NBitsWeight (that linear becomes MatMulNBits), a float array (used instead
    of the model's) or None (the model's own). A tied lm_head reads the (possibly overridden) embedding table unless
    weights("lm_head.weight") gives it its own; tied_head says how: Gemm(transB=1) or MatMul on a Transpose.
    Only model.onnx is written; write_genai_config copies config and tokenizer files beside it.
    """
    if tied_head not in ("gemm", "transpose"):
        raise ValueError(f"tied_head must be 'gemm' or 'transpose', not {tied_head!r}")
    say = progress or (lambda message: None)
    model_dir, out_path = Path(model_dir), Path(out_path)
    _check_supported(_config(model_dir))
    say(f"  loading {model_dir.name} in float32")
    config, params, tied = _load(model_dir)
    windows = _local_windows(config)
    head_dim = _head_dim(config)
    g = GraphWriter(params, weights, accuracy_level, centered_offsets)
    cos, sin = rope_caches(config)
    rope = (g.add_init("cos_cache", cos), g.add_init("sin_cache", sin))
    lengths = _mask_lengths(g)
    gather_in, gather_out, batch, seq = _left_pad_rotation(g)
    ids = g.op("GatherElements", ["input_ids", gather_in], "/model/pad_rotation/input_ids", axis=1)
    hidden = g.embedding(ids, float_table_needed=tied and not g.overrides("lm_head.weight"))
    residual = None
    for i in range(config.num_hidden_layers):
        say(f"  layer {i + 1}/{config.num_hidden_layers}")
        shape = LayerShape(config.hidden_size, config.num_attention_heads, config.num_key_value_heads, head_dim,
                           float(config.rms_norm_eps), windows[i])
        hidden, residual = g.layer(i, hidden, residual, shape, lengths, rope)
    normed, _ = g.skip_rms_norm(hidden, residual, "model.norm.weight", float(config.rms_norm_eps))
    g.nodes[-1].output[3] = ""
    flat = g.op("Reshape", [normed, g.const("rows_by_hidden", [-1, config.hidden_size])], "/model/pad_rotation/flat")
    normed = g.op("Gather", [flat, gather_out], "/model/pad_rotation/hidden", axis=0)
    logits, head_kind = _lm_head(g, normed, tied, tied_head, config.hidden_size, batch, seq)
    g.nodes[-1].output[0] = "logits"
    kv_shape = LayerShape(config.hidden_size, config.num_attention_heads, config.num_key_value_heads, head_dim,
                          0.0, -1)
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                            ["batch_size", "total_sequence_length"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                             ["batch_size", "sequence_length", config.vocab_size])]
    for i in range(config.num_hidden_layers):
        inputs += [kv_value_info(i, "key", "in", kv_shape), kv_value_info(i, "value", "in", kv_shape)]
        outputs += [kv_value_info(i, "key", "out", kv_shape), kv_value_info(i, "value", "out", kv_shape)]
    graph = helper.make_graph(g.nodes, f"{config.model_type}_decoder", inputs, outputs, g.initializers)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="optpipe.decoder_graph")
    model.ir_version = 8
    say(f"  writing {out_path.name}")
    save_onnx(model, out_path)
    notes = ["no position_ids input: GroupQueryAttention takes positions from attention_mask (ORTModelForCausalLM "
             "logs a 'legacy ONNX model' warning for this; generation is unaffected)"]
    if tied and head_kind != "untied":
        notes.append(f"tied lm_head reads the embedding table through {head_kind} (stored once); gemm is the default: "
                     "decode speed and session memory equal transpose's within noise "
                     "(bench/results/decoder_graph_speed.txt)")
    if g.dequantized:
        notes.append(f"NBits weights dequantized to float (no MatMul to take them): {', '.join(g.dequantized)}")
    if any(w > 0 for w in windows):
        notes.append(f"sliding window {max(windows)} -> GroupQueryAttention local_window_size")
    return DecoderGraphReport(
        model_type=config.model_type, layers=config.num_hidden_layers,
        op_counts=dict(sorted(Counter(n.op_type for n in g.nodes).items())), nodes=len(g.nodes),
        nbits_linears=tuple(g.nbits), overridden=tuple(dict.fromkeys(g.overridden)), tied_lm_head=head_kind,
        path=out_path, notes=tuple(notes))


from optpipe.passes.decoder_genai import write_genai_config  # noqa: E402  (re-exported: part of this module's API)

__all__ = ["DecoderGraphReport", "build_decoder", "rope_caches", "write_genai_config", "SUPPORTED_MODEL_TYPES"]
