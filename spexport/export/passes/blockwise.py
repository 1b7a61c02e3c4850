"""Block-wise weight quantization in numpy, packed the way ONNX Runtime's `MatMulNBits` reads it.

A weight [K, N] (ONNX MatMul's B: K inputs, N outputs) is cut into blocks of `block_size` along K.
Each block of each output column gets its own scale and an integer zero point (asymmetric: the grid
covers the block's own range). Integer zero points keep ONNX Runtime's fast prepacked CPU kernels;
float zero points send MatMulNBits to a path that dequantizes the whole weight on every call.

Two ways to choose the codes:
- round to nearest (RTN), with a search over clipped ranges that minimises each block's squared
  error (it helps 4 bits, and never picks a worse range than the plain min-max one);
- GPTQ (Frantar et al. 2022), given H = 2·XᵀX of the activations the weight multiplies: rounds one
  input row at a time and spreads its error over the rows not yet rounded, weighted by H⁻¹, so the
  product X·W, not W itself, stays close. The activations come from a few fixed calibration texts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CLIP_STEPS = np.linspace(1.0, 0.75, 11)  # fractions of the min-max range tried by the clip search
DAMPING = 0.01  # GPTQ: fraction of H's mean diagonal added to it, for a stable inverse
GPTQ_ROWS = 128  # GPTQ: input rows updated together before the rest of the weight is


@dataclass
class Quantized:
    """MatMulNBits' inputs for one weight: B [N, k_blocks, block bytes], scales [N, k_blocks] and
    packed uint8 zero points [N, ceil(k_blocks · bits / 8)]."""

    packed: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    bits: int
    block_size: int
    shape: tuple[int, int]  # K, N


def fits(k: int, block_size: int) -> bool:
    """Whether MatMulNBits can take a weight with `k` inputs in blocks of `block_size` here: whole
    blocks only, so no block holds padding (spexport's choice: a padded block wastes its range)."""
    return k % block_size == 0


@dataclass
class Curvature:
    """What GPTQ needs from the activations X [rows, K] that a weight multiplies: the upper Cholesky
    factor of (H + damping)⁻¹ with H = 2·XᵀX/rows, and the inputs that never fire. Weights that read
    the same activations (queries, keys and values) share one."""

    inverse: np.ndarray
    dead: np.ndarray

    @classmethod
    def of(cls, activations: np.ndarray) -> Curvature:
        x = activations.reshape(-1, activations.shape[-1]).astype(np.float64)
        h = 2 * x.T @ x / len(x)
        dead = np.diag(h) == 0
        h[dead, dead] = 1
        h[np.diag_indices(len(h))] += DAMPING * np.mean(np.diag(h))
        return cls(np.linalg.cholesky(np.linalg.inv(h)).T.astype(np.float32), dead)


def quantize(weight: np.ndarray, bits: int, block_size: int, curvature: Curvature | None = None) -> Quantized:
    """Codes for `weight` [K, N]: GPTQ when the activations' `curvature` is given, else round to nearest."""
    k, n = weight.shape
    if not fits(k, block_size):
        raise ValueError(f"{k} inputs do not split into blocks of {block_size}")
    if curvature is None:
        codes, scales, zeros = _round_to_nearest(weight.astype(np.float64), bits, block_size)
    else:
        codes, scales, zeros = _gptq(weight.astype(np.float32), curvature, bits, block_size)
    packed, zero_points = _pack(codes.T.reshape(n, k // block_size, block_size), zeros.T.astype(np.uint8), bits)
    return Quantized(packed, np.ascontiguousarray(scales.T, np.float32), zero_points, bits, block_size, (k, n))


def dequantize(q: Quantized) -> np.ndarray:
    """The weight [K, N] that MatMulNBits computes with (for tests and error reports)."""
    k, n = q.shape
    codes, zeros = _unpack(q.packed, q.zero_points, q.bits, q.block_size, k // q.block_size)
    return ((codes.astype(np.float32) - zeros[..., None]) * q.scales[..., None]).reshape(n, k).T


def _grid(block: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Scale and integer zero point per column of `block` [rows, N] that minimise its squared error
    over the clipped ranges tried (the range always holds 0, so the zero point is a valid code)."""
    top = 2 ** bits - 1
    low, high = np.minimum(block.min(axis=0), 0), np.maximum(block.max(axis=0), 0)
    flat = (low == 0) & (high == 0)
    low, high = np.where(flat, -1, low), np.where(flat, 1, high)
    best = np.full(block.shape[1], np.inf)
    scale, zero = np.ones(block.shape[1]), np.zeros(block.shape[1])
    for fraction in CLIP_STEPS:
        s = (high - low) * fraction / top
        z = np.round(-low * fraction / s)
        error = (((np.clip(np.round(block / s) + z, 0, top) - z) * s - block) ** 2).sum(axis=0)
        better = error < best
        best[better], scale[better], zero[better] = error[better], s[better], z[better]
    return scale, zero


def _round_to_nearest(weight: np.ndarray, bits: int, block_size: int):
    k, n = weight.shape
    top = 2 ** bits - 1
    codes = np.empty((k, n), np.uint8)
    scales, zeros = np.empty((k // block_size, n)), np.empty((k // block_size, n))
    for b in range(k // block_size):
        rows = slice(b * block_size, (b + 1) * block_size)
        scales[b], zeros[b] = _grid(weight[rows], bits)
        codes[rows] = np.clip(np.round(weight[rows] / scales[b]) + zeros[b], 0, top)
    return codes, scales, zeros


def _gptq(weight: np.ndarray, curvature: Curvature, bits: int, block_size: int):
    """GPTQ's lazy-batch algorithm over input rows in order; each block's grid is chosen when its
    first row comes up, from the rows as earlier errors have left them."""
    k, n = weight.shape
    top = 2 ** bits - 1
    inverse = curvature.inverse
    weight = weight.copy()
    weight[curvature.dead] = 0  # inputs that never fire: their rows cannot matter
    codes = np.empty((k, n), np.uint8)
    scales, zeros = np.empty((k // block_size, n)), np.empty((k // block_size, n))
    step = max(GPTQ_ROWS, block_size)
    for start in range(0, k, step):
        end = min(start + step, k)
        rows, errors, inv = weight[start:end].copy(), np.zeros((end - start, n), np.float32), inverse[start:end,
                                                                                                    start:end]
        for i in range(end - start):
            if (start + i) % block_size == 0:
                b = (start + i) // block_size
                scales[b], zeros[b] = _grid(rows[i:i + block_size], bits)
                s, z = scales[b].astype(np.float32), zeros[b].astype(np.float32)
            code = np.clip(np.round(rows[i] / s) + z, 0, top)
            codes[start + i] = code
            errors[i] = (rows[i] - (code - z) * s) / inv[i, i]
            rows[i:] -= np.outer(inv[i, i:], errors[i])
        weight[end:] -= inverse[start:end, end:].T @ errors
    return codes, scales, zeros


def _pack(codes: np.ndarray, zeros: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """codes [N, k_blocks, block], zeros [N, k_blocks] -> bytes, low bits first (MatMulNBits' layout)."""
    if bits == 8:
        return np.ascontiguousarray(codes), np.ascontiguousarray(zeros)
    if zeros.shape[1] % 2:
        zeros = np.pad(zeros, ((0, 0), (0, 1)))
    return (np.ascontiguousarray(codes[..., 0::2] | (codes[..., 1::2] << 4)),
            np.ascontiguousarray(zeros[:, 0::2] | (zeros[:, 1::2] << 4)))


def _unpack(packed: np.ndarray, zero_points: np.ndarray, bits: int, block_size: int, blocks: int):
    if bits == 8:
        return packed, zero_points[:, :blocks].astype(np.float32)
    codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:2], block_size)
    zeros = np.stack([zero_points & 0x0F, zero_points >> 4], axis=-1).reshape(len(zero_points), -1)[:, :blocks]
    return codes, zeros.astype(np.float32)
