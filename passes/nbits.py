"""NBitsWeight: a linear layer's weight already in MatMulNBits' block layout (ONNX Runtime contrib op).

Shared by the writers of MatMulNBits nodes (the decoder graph builder, the weight-only pass) and the producers of
such weights (GGUF blocks carried over, onnxruntime's quantizers)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class NBitsWeight:
    """W (shape [n, k], y = x @ W.T) as MatMulNBits stores it: blocks of `block_size` along k.

    packed: uint8 [n, k_blocks, block_size * bits // 8]; for 4 bits element 2i is the low nibble of byte i.
    scales: float32 [n * k_blocks].
    zero_points: None (symmetric: 2**(bits-1)), uint8 packed as MatMulNBits wants, or float32 [n * k_blocks]
    (the op accepts float zero points of the scales' type: dequantized = (q - zero_point) * scale).
    """

    packed: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    bits: int
    block_size: int
    k: int
    n: int

    @property
    def k_blocks(self) -> int:
        return (self.k + self.block_size - 1) // self.block_size

    def dequantize(self) -> np.ndarray:
        """[n, k] float32, exactly as MatMulNBits computes it at accuracy level 0."""
        raw = self.packed.reshape(self.n, self.k_blocks, -1)
        if self.bits == 4:
            q = np.stack([raw & 0x0F, raw >> 4], axis=-1).reshape(self.n, self.k_blocks, self.block_size)
        elif self.bits == 8:
            q = raw.reshape(self.n, self.k_blocks, self.block_size)
        else:
            raise ValueError(f"MatMulNBits with {self.bits} bits is not handled here")
        scales = self.scales.reshape(self.n, self.k_blocks, 1).astype(np.float32)
        if self.zero_points is None:
            zp = np.float32(2 ** (self.bits - 1))
        elif self.zero_points.dtype == np.uint8:
            zp_raw = self.zero_points.reshape(self.n, -1)
            if self.bits == 4:
                zp = np.stack([zp_raw & 0x0F, zp_raw >> 4], axis=-1).reshape(self.n, -1)[:, : self.k_blocks]
            else:
                zp = zp_raw[:, : self.k_blocks]
            zp = zp.reshape(self.n, self.k_blocks, 1).astype(np.float32)
        else:
            zp = self.zero_points.reshape(self.n, self.k_blocks, 1).astype(np.float32)
        values = (q.astype(np.float32) - zp) * scales
        return values.reshape(self.n, -1)[:, : self.k]


def weight_form(w: "np.ndarray | NBitsWeight") -> tuple:
    """What weights must share to be one MatMul (float: k) or one MatMulNBits node (bits, block, k, zero points)."""
    if not isinstance(w, NBitsWeight):
        return ("float", w.shape[1])
    return ("nbits", w.bits, w.block_size, w.k, "none" if w.zero_points is None else str(w.zero_points.dtype))


def stack_rows(weights: list[NBitsWeight]) -> NBitsWeight:
    """Weights of one `weight_form` stacked along n (their output rows), as one MatMulNBits holds them."""
    def rows(attr: str) -> np.ndarray | None:
        parts = [getattr(w, attr) for w in weights]
        return None if parts[0] is None else np.concatenate([a.reshape(w.n, -1) for a, w in zip(parts, weights)])

    first, zp = weights[0], rows("zero_points")
    zp = zp if zp is None or zp.dtype == np.uint8 else zp.reshape(-1)
    return NBitsWeight(rows("packed"), rows("scales").reshape(-1), zp, first.bits, first.block_size, first.k,
                       sum(w.n for w in weights))
