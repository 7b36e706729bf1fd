"""The node-level writer behind decoder_graph: initializers named after HF parameters, linears (MatMul or
MatMulNBits), norms, GroupQueryAttention and the SiLU-gated MLP of one llama-family layer."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from optpipe.passes.nbits import NBitsWeight, stack_rows, weight_form

MS = "com.microsoft"
WeightSource = Callable[[str], "np.ndarray | NBitsWeight | None"]


@dataclass(frozen=True)
class LayerShape:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    local_window: int  # -1: full causal attention


class GraphWriter:
    """Accumulates nodes and initializers; `param(name)` resolves a weight through the override, else the model."""

    def __init__(self, params: dict[str, np.ndarray], override: WeightSource | None, accuracy_level: int,
                 centered_offsets: bool = False):
        self.params = params
        self.override = override
        self.accuracy_level = accuracy_level
        self.centered_offsets = centered_offsets
        self.nodes: list = []
        self.initializers: list = []
        self.nbits: list[str] = []
        self.overridden: list[str] = []
        self.dequantized: list[str] = []
        self._names: Counter = Counter()
        self._resolved: dict[str, object] = {}
        self._consts: dict[str, tuple[str, np.ndarray]] = {}
        self._block_sums: dict[tuple[str, int, int], str] = {}

    # ---- names and constants ----
    def fresh(self, name: str) -> str:
        self._names[name] += 1
        return name if self._names[name] == 1 else f"{name}_{self._names[name] - 1}"

    def add_init(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(array, order="C"), name))  # keeps 0-d
        return name

    def const(self, name: str, values, dtype=np.int64) -> str:
        """A small constant, shared by every node that asks for the same name."""
        value = np.asarray(values, dtype=dtype)
        if name not in self._consts:
            self._consts[name] = (self.add_init(f"/const/{name}", value), value)
        stored, known = self._consts[name]
        if known.shape != value.shape or not np.array_equal(known, value):
            raise ValueError(f"constant {name!r} asked for with two values")
        return stored

    def node(self, op: str, inputs: list[str], name: str, n_out: int = 1, domain: str = "", **attrs) -> list[str]:
        name = self.fresh(name)
        outs = [f"{name}/output_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, domain=domain or None, **attrs))
        return outs

    def op(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        return self.node(op, inputs, name, **attrs)[0]

    # ---- weights ----
    def overrides(self, name: str) -> bool:
        if name not in self._resolved:
            self._resolved[name] = self.override(name) if self.override is not None else None
        return self._resolved[name] is not None

    def weight(self, name: str) -> np.ndarray | NBitsWeight:
        if not self.overrides(name):
            return self.params[name]
        value = self._resolved[name]
        self.overridden.append(name)
        if isinstance(value, NBitsWeight):
            return value
        value = np.asarray(value, dtype=np.float32)
        if value.shape != self.params[name].shape:
            raise ValueError(f"weights({name!r}) returned shape {value.shape}, the model has {self.params[name].shape}")
        return value

    def float_weight(self, name: str) -> np.ndarray:
        """A weight that has no MatMulNBits form (norms, embeddings, biases): NBits overrides are dequantized."""
        value = self.weight(name)
        if isinstance(value, NBitsWeight):
            self.dequantized.append(name)
            return value.dequantize().reshape(self.params[name].shape)
        return value

    def embedding(self, ids: str, float_table_needed: bool) -> str:
        """The token embedding lookup. A 4/8-bit NBits override with integer zero points (GGUF Q4_0, Q8_0) stays in
        its blocks through GatherBlockQuantized, unless a tied lm_head reads the float table."""
        name = "model.embed_tokens.weight"
        w = self.weight(name) if self.overrides(name) and not float_table_needed else None
        if not isinstance(w, NBitsWeight) or (w.zero_points is not None and w.zero_points.dtype != np.uint8):
            table = self.add_init(name, self.float_weight(name))
            return self.op("Gather", [table, ids], "model.embed_tokens/Gather", axis=0)
        self.nbits.append(name)
        inputs = [self.add_init(f"{name}.qweight", w.packed.reshape(w.n, -1).astype(np.uint8)), ids,
                  self.add_init(f"{name}.scales", w.scales.reshape(w.n, w.k_blocks).astype(np.float32))]
        if w.zero_points is not None:
            inputs.append(self.add_init(f"{name}.qzeros", w.zero_points.reshape(w.n, -1)))
        return self.op("GatherBlockQuantized", inputs, "model.embed_tokens/GatherBlockQuantized", domain=MS,
                       bits=w.bits, block_size=w.block_size, gather_axis=0, quantize_axis=1)

    def block_sums(self, x: str, k: int, block_size: int, prefix: str) -> str:
        """Sums of x over blocks of its last axis, as x @ S (S: [k, k_blocks] of 0 and 1), computed once per input
        and block size: one node where Reshape + ReduceSum are two (every node costs a dispatch on a decode step)."""
        key = (x, k, block_size)
        if key not in self._block_sums:
            k_blocks = (k + block_size - 1) // block_size
            ones = (np.arange(k)[:, None] // block_size == np.arange(k_blocks)[None, :]).astype(np.float32)
            self._block_sums[key] = self.op("MatMul", [x, self.const(f"block_sums_{k}x{block_size}", ones,
                                                                     np.float32)], f"{prefix}/BlockSum")
        return self._block_sums[key]

    def linear(self, x: str, prefix: str) -> str:
        """y = x @ W.T (+ b) for the HF nn.Linear `prefix` (e.g. model.layers.0.self_attn.q_proj)."""
        w_name, b_name = f"{prefix}.weight", f"{prefix}.bias"
        bias = self.float_weight(b_name) if b_name in self.params else None
        return self._write_linear(x, prefix, [w_name], self._checked_weight(w_name), bias)

    def linears(self, x: str, prefixes: list[str], packed: str) -> tuple[str, list[int]] | None:
        """Linears reading the same x as one node, output rows stacked (`packed` names it: q/k/v -> qkv_proj, as
        GroupQueryAttention's packed input and the GenAI builder have them): fewer, larger kernels. Returns
        (output, widths), or None when the weights differ in form (float beside NBits, bits, biases on some)."""
        names = [f"{p}.weight" for p in prefixes]
        weights = [self._checked_weight(n) for n in names]
        biases = [f"{p}.bias" in self.params for p in prefixes]
        if len(set(biases)) != 1 or len({weight_form(w) for w in weights}) != 1:
            return None
        bias = np.concatenate([self.float_weight(f"{p}.bias") for p in prefixes]) if biases[0] else None
        weight = stack_rows(weights) if isinstance(weights[0], NBitsWeight) else np.concatenate(weights, axis=0)
        widths = [w.n if isinstance(w, NBitsWeight) else w.shape[0] for w in weights]
        return self._write_linear(x, packed, names, weight, bias), widths

    def _checked_weight(self, w_name: str) -> np.ndarray | NBitsWeight:
        w = self.weight(w_name)
        if isinstance(w, NBitsWeight) and (w.n, w.k) != self.params[w_name].shape:
            n, k = self.params[w_name].shape
            raise ValueError(f"weights({w_name!r}) is an NBitsWeight for [{w.n}, {w.k}], the model has [{n}, {k}]")
        return w

    def _write_linear(self, x: str, prefix: str, w_names: list[str], w: np.ndarray | NBitsWeight,
                      bias: np.ndarray | None) -> str:
        """y = x @ W.T (+ bias) as MatMul or MatMulNBits; initializers are named `prefix`.weight…"""
        w_name = f"{prefix}.weight"
        if isinstance(w, NBitsWeight):
            self.nbits.extend(w_names)
            inputs = [x, self.add_init(f"{w_name}.qweight", w.packed.reshape(w.n, w.k_blocks, -1).astype(np.uint8)),
                      self.add_init(f"{w_name}.scales", w.scales.reshape(w.n, w.k_blocks).astype(np.float32))]
            zp, offsets = w.zero_points, None
            if zp is not None and zp.dtype != np.uint8 and self.centered_offsets:
                # A float zero point sends onnxruntime's CPU kernel down a path that dequantizes the whole weight on
                # every call (SmolLM2 ffn_up: 1.5 ms against 23 us). ORT computes q*scale - scale*zp; written as
                # (q - c)*scale + scale*(c - zp) with c = 2**(bits-1), the first term is MatMulNBits with its default
                # (centred) zero point, the fast kernel, and the second is blocksum(x) @ offsets.T, a MatMul
                # block_size times smaller. Centring matters at accuracy level 4: with zero point 0 the int8
                # activations meet the large, uncancelled q*scale term (SmolLM2 Q4_1 agreement fell to 0.912).
                centre = np.float32(2 ** (w.bits - 1))
                scales = w.scales.astype(np.float32)
                offsets = (scales * (centre - zp.astype(np.float32))).reshape(w.n, w.k_blocks)
                zp = None
            if zp is not None:
                zp = zp.reshape(w.n, -1) if zp.dtype == np.uint8 else zp.reshape(w.n, w.k_blocks).astype(np.float32)
                inputs.append(self.add_init(f"{w_name}.qzeros", zp))
            if bias is not None:
                inputs += [""] * (4 - len(inputs)) + [self.add_init(f"{prefix}.bias", bias)]
            y = self.op("MatMulNBits", inputs, f"{prefix}/MatMulNBits", domain=MS, K=w.k, N=w.n, bits=w.bits,
                        block_size=w.block_size, accuracy_level=self.accuracy_level)
            if offsets is None:
                return y
            shift = self.op("MatMul", [self.block_sums(x, w.k, w.block_size, prefix),
                                       self.add_init(f"{w_name}.offsets_T", offsets.T.copy())],
                            f"{prefix}/BlockOffsets")
            return self.op("Add", [y, shift], f"{prefix}/AddBlockOffsets")
        y = self.op("MatMul", [x, self.add_init(f"{w_name}.T", w.T)], f"{prefix}/MatMul")
        if bias is not None:
            y = self.op("Add", [y, self.add_init(f"{prefix}.bias", bias)], f"{prefix}/Add")
        return y

    # ---- blocks ----
    def rms_norm(self, x: str, weight_name: str, eps: float) -> str:
        return self.op("SimplifiedLayerNormalization", [x, self.add_init(weight_name, self.float_weight(weight_name))],
                       weight_name.removesuffix(".weight") + "/SimplifiedLayerNorm", axis=-1, epsilon=eps, stash_type=1)

    def skip_rms_norm(self, x: str, skip: str, weight_name: str, eps: float) -> tuple[str, str]:
        """(normed, x + skip): the residual sum comes out of the same node (output 3)."""
        outs = self.node("SkipSimplifiedLayerNormalization",
                         [x, skip, self.add_init(weight_name, self.float_weight(weight_name))],
                         weight_name.removesuffix(".weight") + "/SkipSimplifiedLayerNorm", n_out=4, domain=MS,
                         epsilon=eps)
        self.nodes[-1].output[1] = self.nodes[-1].output[2] = ""  # mean, inv_std_var unused
        return outs[0], outs[3]

    def attention(self, x: str, prefix: str, shape: LayerShape, layer: int, lengths: tuple[str, str],
                  rope: tuple[str, str]) -> str:
        packed = self.linears(x, [f"{prefix}.{p}_proj" for p in "qkv"], f"{prefix}.qkv_proj")
        qkv = [packed[0], "", ""] if packed else [self.linear(x, f"{prefix}.{p}_proj") for p in "qkv"]
        seqlens_k, total_len = lengths
        outs = self.node("GroupQueryAttention",
                         [*qkv, f"past_key_values.{layer}.key", f"past_key_values.{layer}.value", seqlens_k,
                          total_len, rope[0], rope[1]], f"{prefix}/GroupQueryAttention", n_out=3, domain=MS,
                         num_heads=shape.heads, kv_num_heads=shape.kv_heads, do_rotary=1, rotary_interleaved=0,
                         local_window_size=shape.local_window, scale=float(shape.head_dim ** -0.5))
        node = self.nodes[-1]
        node.output[1], node.output[2] = f"present.{layer}.key", f"present.{layer}.value"
        return self.linear(outs[0], f"{prefix}.o_proj")

    def mlp(self, x: str, prefix: str) -> str:
        packed = self.linears(x, [f"{prefix}.gate_proj", f"{prefix}.up_proj"], f"{prefix}.gate_up_proj")
        if packed:
            (y, widths) = packed
            gate, up = self.node("Split", [y, self.const(f"split_{widths[0]}_{widths[1]}", widths)],
                                 f"{prefix}/Split", n_out=2, axis=-1)
        else:
            gate, up = self.linear(x, f"{prefix}.gate_proj"), self.linear(x, f"{prefix}.up_proj")
        silu = self.op("Mul", [gate, self.op("Sigmoid", [gate], f"{prefix}/act_fn/Sigmoid")], f"{prefix}/act_fn/Mul")
        return self.linear(self.op("Mul", [silu, up], f"{prefix}/Mul"), f"{prefix}.down_proj")

    def layer(self, layer: int, hidden: str, residual: str | None, shape: LayerShape, lengths: tuple[str, str],
              rope: tuple[str, str]) -> tuple[str, str]:
        """One decoder layer. Returns (mlp output, residual before it): the next norm adds them."""
        prefix = f"model.layers.{layer}"
        if residual is None:
            normed = self.rms_norm(hidden, f"{prefix}.input_layernorm.weight", shape.eps)
            residual = hidden
        else:
            normed, residual = self.skip_rms_norm(hidden, residual, f"{prefix}.input_layernorm.weight", shape.eps)
        attn = self.attention(normed, f"{prefix}.self_attn", shape, layer, lengths, rope)
        normed, residual = self.skip_rms_norm(attn, residual, f"{prefix}.post_attention_layernorm.weight", shape.eps)
        return self.mlp(normed, f"{prefix}.mlp"), residual


def kv_value_info(layer: int, kind: str, io: str, shape: LayerShape):
    name = f"past_key_values.{layer}.{kind}" if io == "in" else f"present.{layer}.{kind}"
    seq = "past_sequence_length" if io == "in" else "total_sequence_length"
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch_size", shape.kv_heads, seq, shape.head_dim])
