"""A GGUF's own quantized blocks carried over into MatMulNBits' layout, so nothing is re-quantized.

ggml's blocks (ggml-common.h; gguf-py's gguf/quants.py is the dequantizer transformers uses): Q4_0 fp16 d + 16
bytes of nibbles, d * (q - 8); Q4_1 fp16 d, m + nibbles, d * q + m; Q8_0 fp16 d + 32 int8, d * q; Q4_K 256 = 8 x 32
with fp16 d, dmin, 6-bit (sc, mn) each, (d * sc) * q - dmin * mn. A Q4 block's byte j holds element j (low nibble)
and j + 16 (high); MatMulNBits wants 2i low and 2i + 1 high in byte i: nibbles are re-paired, never re-rounded.
Q4_0 and Q8_0 are bit-exact (symmetric, no zero-point input). Q4_1 and Q4_K take a float zero point, which ORT's
CPU kernel applies as q * scale + (-scale * zp) (contrib_ops/cpu/quantization/matmul_nbits_impl.cc): zp is chosen
so that -scale * zp rounds to exactly the block's offset, and ORT then rounds d * q + m once, as gguf does. For a
few blocks no float32 zp does (0.03 % of SmolLM2's Q4_1 blocks): off by <= 1 ulp of the block's largest value, as
is `NBitsWeight.dequantize()`'s (q - zp) * scale. Other types raise: the weight-only pass re-quantizes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np

from optpipe.errors import UnsupportedModelError
from optpipe.passes.nbits import NBitsWeight

QK, QK_K = 32, 256  # ggml's block length (Q4_K: sub-block) and K-quant super-block length
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")  # Llama's parameter layout


@dataclass(frozen=True)
class CarriedWeights:
    """What a GGUF holds in MatMulNBits form, keyed by Hugging Face parameter name, and what it does not."""

    weights: dict[str, NBitsWeight]
    types: dict[str, str]  # HF parameter name -> the GGUF type its blocks came from
    skipped: dict[str, str]  # GGUF tensor name -> why it was not carried over

    def to_json(self) -> dict:
        return {"carried": dict(self.types), "skipped": dict(self.skipped)}


def nbits_from_gguf(reader_or_path, tensor_name: str) -> NBitsWeight:
    """One GGUF tensor ([n, k], y = x @ W.T) as an NBitsWeight, in the GGUF's own row order (no permutation)."""
    for tensor in _reader(reader_or_path).tensors:
        if tensor.name == tensor_name:
            return _nbits(tensor)
    raise KeyError(f"the GGUF has no tensor {tensor_name!r}")


def gguf_weights(gguf_path, model_type: str, num_layers: int) -> CarriedWeights:
    """Every block-quantized linear weight of a llama / mistral / qwen2 GGUF, keyed by HF parameter name.

    llama's attn_q / attn_k rows are permuted as transformers' GGUF loader permutes them, so each weight matches
    `AutoModelForCausalLM.from_pretrained(..., gguf_file=...)`. Tied embeddings (no `output.weight`): the token
    embedding is `lm_head.weight` too.
    """
    reader = _reader(gguf_path)
    tensors = {t.name: t for t in reader.tensors}
    arch = _field(reader, "general.architecture")
    to_hf = {gguf_name: hf for hf, gguf_name in hf_to_gguf_names(model_type, num_layers, arch).items()}
    heads, kv_heads = (_field(reader, f"{arch}.attention.{key}") for key in ("head_count", "head_count_kv"))
    weights: dict[str, NBitsWeight] = {}
    types, skipped = {}, {}
    for name, tensor in tensors.items():
        kind = tensor.tensor_type.name
        if name not in to_hf:
            skipped[name] = f"no {model_type} parameter maps to it"
        elif len(tensor.shape) != 2:
            skipped[name] = f"{kind}, {len(tensor.shape)}-D (norm or bias): stays float"
        elif kind not in _CONVERTERS:
            skipped[name] = f"{kind}: not carried over (only {', '.join(_CONVERTERS)}); re-quantized instead"
        else:
            weight = _nbits(tensor)
            # transformers' LlamaTensorProcessor: chosen by the GGUF's architecture, and only with both head counts
            if arch == "llama" and heads and kv_heads and name.endswith((".attn_q.weight", ".attn_k.weight")):
                n_head = heads if name.endswith(".attn_q.weight") else kv_heads
                weight = permute_rows(weight, qk_row_permutation(weight.n, n_head))
            weights[to_hf[name]], types[to_hf[name]] = weight, kind
    if "output.weight" not in tensors and "model.embed_tokens.weight" in weights:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
        types["lm_head.weight"] = types["model.embed_tokens.weight"]
    return CarriedWeights(weights, types, skipped)


def hf_to_gguf_names(model_type: str, num_layers: int, gguf_arch: str | None = None) -> dict[str, str]:
    """HF parameter name -> GGUF tensor name, through gguf-py's TensorNameMap (as transformers maps them)."""
    import gguf

    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"GGUF blocks are carried over for {', '.join(SUPPORTED_MODEL_TYPES)} models, not {model_type}")
    by_name = {value: key for key, value in gguf.MODEL_ARCH_NAMES.items()}
    # llama.cpp writes mistral as "llama", and gguf-py has no plain "mistral" arch: the tensor names are llama's
    name_map = gguf.get_tensor_name_map(by_name.get(gguf_arch or "") or by_name.get(model_type) or by_name["llama"],
                                        num_layers)
    layer = [f"self_attn.{p}_proj.weight" for p in "qkvo"] + [f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    layer += ["input_layernorm.weight", "post_attention_layernorm.weight"]
    layer += [f"self_attn.{p}_proj.bias" for p in "qkv"] if model_type == "qwen2" else []
    params = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    params += [f"model.layers.{i}.{param}" for i in range(num_layers) for param in layer]
    bases = {param: param.rsplit(".", 1) for param in params}
    return {param: f"{name_map.get_name(base)}.{suffix}" for param, (base, suffix) in bases.items()
            if name_map.get_name(base) is not None}


def qk_row_permutation(n_rows: int, n_head: int) -> np.ndarray:
    """The row order transformers gives llama's attn_q / attn_k: new[r] = old[perm[r]].

    llama.cpp's converter interleaves each head's two rotary halves; transformers' `_reverse_permute_weights`
    undoes it with w.reshape(n_head, dim, 2, k).swapaxes(2, 1). Rows hold whole blocks, so blocks move with them.
    """
    return np.arange(n_rows).reshape(n_head, n_rows // n_head // 2, 2).swapaxes(1, 2).reshape(-1)


def permute_rows(weight: NBitsWeight, perm: np.ndarray) -> NBitsWeight:
    def rows(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a.reshape(weight.n, -1)[perm]).reshape(a.shape)

    zp = None if weight.zero_points is None else rows(weight.zero_points)
    return NBitsWeight(rows(weight.packed), rows(weight.scales), zp, weight.bits, weight.block_size, weight.k, weight.n)


def ort_dequantize(weight: NBitsWeight) -> np.ndarray:
    """[n, k] float32 as onnxruntime's CPU MatMulNBits dequantizes B (float zero points: q * s + (-s * zp))."""
    if weight.zero_points is None or weight.zero_points.dtype == np.uint8:
        return weight.dequantize()
    raw = weight.packed.reshape(weight.n, weight.k_blocks, -1)
    q = np.stack([raw & 0x0F, raw >> 4], axis=-1).reshape(weight.n, weight.k_blocks, weight.block_size)
    s = weight.scales.reshape(weight.n, weight.k_blocks, 1).astype(np.float32)
    zp = weight.zero_points.reshape(weight.n, weight.k_blocks, 1).astype(np.float32)
    return (q.astype(np.float32) * s + (-s * zp)).reshape(weight.n, -1)[:, : weight.k]


def inexact_blocks(weight: NBitsWeight, reference: np.ndarray) -> int:
    """How many blocks onnxruntime would not dequantize bit for bit to `reference` ([n, k] float32)."""
    same = (ort_dequantize(weight) == reference).reshape(weight.n, weight.k_blocks, -1)
    return int((~same.all(axis=-1)).sum())


# --- raw GGUF rows (uint8 [n, bytes per row]) -> NBitsWeight ---------------------------------------------------


def _nbits(tensor) -> NBitsWeight:
    kind = tensor.tensor_type.name
    if kind not in _CONVERTERS:
        raise UnsupportedModelError(
            f"GGUF tensor {tensor.name} is {kind}, which has no exact MatMulNBits form here (carried over: "
            f"{', '.join(_CONVERTERS)}); it falls back to re-quantization from the dequantized weight")
    if len(tensor.shape) != 2:
        raise UnsupportedModelError(f"GGUF tensor {tensor.name} is {len(tensor.shape)}-D; MatMulNBits needs 2-D")
    k, n = (int(d) for d in tensor.shape)  # ggml order: ne[0] is the row length
    return _CONVERTERS[kind](np.asarray(tensor.data, dtype=np.uint8).reshape(n, -1), n, k)


def _pair_nibbles(q: np.ndarray) -> np.ndarray:  # MatMulNBits: element 2i low, 2i + 1 high
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def _half(raw: np.ndarray) -> np.ndarray:  # little-endian fp16 from 2 bytes
    return np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32)


def _q4_0(raw: np.ndarray, n: int, k: int) -> NBitsWeight:
    blocks = raw.reshape(n, k // QK, 18)
    q = np.concatenate([blocks[..., 2:] & 0x0F, blocks[..., 2:] >> 4], axis=-1)
    return NBitsWeight(_pair_nibbles(q), _half(blocks[..., 0:2]).reshape(-1), None, 4, QK, k, n)


def _q8_0(raw: np.ndarray, n: int, k: int) -> NBitsWeight:
    blocks = raw.reshape(n, k // QK, 34)
    packed = np.ascontiguousarray(blocks[..., 2:]) ^ np.uint8(0x80)  # int8 q -> uint8 q + 128, zero point 128
    return NBitsWeight(packed, _half(blocks[..., 0:2]).reshape(-1), None, 8, QK, k, n)


def _q4_1(raw: np.ndarray, n: int, k: int) -> NBitsWeight:
    blocks = raw.reshape(n, k // QK, 20)
    q = np.concatenate([blocks[..., 4:] & 0x0F, blocks[..., 4:] >> 4], axis=-1)
    return _affine(q, _half(blocks[..., 0:2]), _half(blocks[..., 2:4]), n, k)


def _q4_k(raw: np.ndarray, n: int, k: int) -> NBitsWeight:
    blocks = raw.reshape(n, k // QK_K, 144)
    packed = blocks[..., 4:16].reshape(n, k // QK_K, 3, 4)  # ggml's get_scale_min_k4
    d6, m6, hi = packed[..., 0, :], packed[..., 1, :], packed[..., 2, :]
    sc = np.concatenate([d6 & 0x3F, (hi & 0x0F) | ((d6 >> 2) & 0x30)], axis=-1).astype(np.float32)
    mn = np.concatenate([m6 & 0x3F, (hi >> 4) | ((m6 >> 2) & 0x30)], axis=-1).astype(np.float32)
    scale = _half(blocks[..., 0:2])[..., None] * sc  # exact: fp16 times a 6-bit integer, as gguf-py computes it
    offset = -(_half(blocks[..., 2:4])[..., None] * mn)
    qs = blocks[..., 16:].reshape(n, k // QK_K, 4, 32)  # chunk c: low nibbles are sub-block 2c, high ones 2c + 1
    q = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(n, -1, QK)
    return _affine(q, scale.reshape(n, -1), offset.reshape(n, -1), n, k)


def _affine(q: np.ndarray, scale: np.ndarray, offset: np.ndarray, n: int, k: int) -> NBitsWeight:
    """Blocks of scale * q + offset (q < 16, rounded once as gguf does) with a float zero point.

    ORT computes q * scale + (-scale * zp), q * scale exact. Wanted: -scale * zp == offset. No float32 zp reaches
    it when the products step more coarsely than offset's ulp; then the block is tried mirrored (q' = 15 - q,
    scale' = -scale, offset' = offset + 15 * scale), and failing that keeps the zp that gets most values exact.
    A block of scale 0 is constant: it becomes q = 1, scale = offset, zp = 0.
    """
    qf, constant = q.astype(np.float32), scale == 0
    reference = scale[..., None] * qf + offset[..., None]
    scale = np.where(constant, np.float32(1), scale)
    mirrored64 = offset.astype(np.float64) + 15 * scale.astype(np.float64)
    forms = [(False, scale, offset, np.ones_like(constant)),  # (mirrored, scale, wanted -scale * zp, usable)
             (True, -scale, mirrored64.astype(np.float32), mirrored64.astype(np.float32) == mirrored64)]
    flip, out_scale, zp, done = np.zeros_like(constant), scale.copy(), _zp_candidates(scale, offset)[0], constant.copy()
    for mirrored, s, wanted, usable in forms:
        for candidate in _zp_candidates(s, wanted):
            hit = ~done & usable & ((-s * candidate) == wanted)
            flip, out_scale, zp = (np.where(hit, a, b) for a, b in ((mirrored, flip), (s, out_scale), (candidate, zp)))
            done |= hit
    rest = np.nonzero(~done)
    if rest[0].size:
        fewest = np.full(rest[0].size, QK + 1)
        for mirrored, s, wanted, usable in forms:
            s, wanted = s[rest], np.where(usable[rest], wanted[rest], offset[rest])
            qq = 15 - qf[rest] if mirrored else qf[rest]
            for candidate in _zp_candidates(s, wanted):
                off = (qq * s[:, None] + (-s * candidate)[:, None] != reference[rest]).sum(axis=-1)
                better = off < fewest
                fewest = np.where(better, off, fewest)
                for array, value in ((flip, mirrored), (out_scale, s), (zp, candidate)):
                    array[rest] = np.where(better, value, array[rest])
    q = np.where(constant[..., None], 1, np.where(flip[..., None], 15 - q, q)).astype(np.uint8)
    out_scale, zp = np.where(constant, offset, out_scale), np.where(constant, np.float32(0), zp)
    return NBitsWeight(_pair_nibbles(q).reshape(n, -1, QK // 2), out_scale.reshape(-1).astype(np.float32),
                       zp.reshape(-1).astype(np.float32), 4, QK, k, n)


def _zp_candidates(scale: np.ndarray, wanted: np.ndarray, reach: int = 4) -> list[np.ndarray]:  # around -wanted/scale
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        centre = np.nan_to_num(-wanted.astype(np.float64) / scale.astype(np.float64)).astype(np.float32)
    up, down = [centre], [centre]
    for _ in range(reach):
        up, down = up + [np.nextafter(up[-1], np.float32(np.inf))], down + [np.nextafter(down[-1], np.float32(-np.inf))]
    return [centre] + [c for pair in zip(up[1:], down[1:]) for c in pair]


_CONVERTERS = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q8_0": _q8_0, "Q4_K": _q4_k}


def _reader(reader_or_path):
    from optpipe.gguf_source import read_gguf

    return read_gguf(Path(reader_or_path)) if isinstance(reader_or_path, (str, PathLike)) else reader_or_path


def _field(reader, key: str):
    return None if (field := reader.get_field(key)) is None else field.contents()
