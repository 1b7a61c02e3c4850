"""Block-wise weight quantization in numpy, packed the way ONNX Runtime's `MatMulNBits` reads it.

A weight [K, N] (ONNX MatMul's B: K inputs, N outputs) is cut into blocks of `block_size` along K, and
each block of each output column is rounded to the nearest point of its own grid of 2^bits values:
the block's min-max range cut into equal steps (round to nearest, RTN).

MatMulNBits' fast CPU kernels take integer zero points only, so a grid that starts at the block's minimum
can only be placed to within half a step. That offset is the same for all of a block's weights, so its
errors add up in the product instead of averaging out; at 4 bits it costs most of the agreement (SmolLM2:
0.75 top-1 agreement with float32, 0.95 without it). `offsets=True` keeps the exact grid: the remainder
of each block's minimum after its integer zero point is returned as `residuals` [k_blocks, N], which the
graph adds as (the activations' sum over each block) @ residuals (passes/quantize.py). Float zero
points would say the same thing, but send MatMulNBits to a path that dequantizes the whole weight on
every call (~35× slower per product at 4 bits; refused at 8).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DAMPING = 0.1  # GPTQ's dampening of H, as a share of its mean diagonal (a few thousand calibration tokens)
CLIPS = np.linspace(1.0, 0.5, 21)  # shares of a block's range that GPTQ's 4-bit grid search tries (8 bits: 1.0)
COLUMNS = 8192  # columns rounded to nearest at a time (a 1B head's float64 temporaries: 0.1 GB each, not 2)
GPTQ_STEP = 128  # inputs rounded between two updates of the rest (the paper's lazy batch)


@dataclass
class Quantized:
    """MatMulNBits' inputs for one weight: B [N, k_blocks, block bytes], scales [N, k_blocks] and packed
    uint8 zero points [N, ceil(k_blocks · bits / 8)]; residuals [k_blocks, N] or None (see above)."""

    packed: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    bits: int
    block_size: int
    shape: tuple[int, int]  # K, N
    residuals: np.ndarray | None = None


def fits(k: int, block_size: int) -> bool:
    """Whether MatMulNBits can take a weight with `k` inputs in blocks of `block_size` here: whole
    blocks only, so no block holds padding (spexport's choice: a padded block wastes its range)."""
    return k % block_size == 0


def quantize(weight: np.ndarray, bits: int, block_size: int, offsets: bool = False,
             inputs: np.ndarray | None = None) -> Quantized:
    """Codes for `weight` [K, N], rounded to nearest on each block's grid; with calibration `inputs`
    [tokens, K], rounded by GPTQ instead (see gptq)."""
    k, n = weight.shape
    if not fits(k, block_size):
        raise ValueError(f"{k} inputs do not split into blocks of {block_size}")
    if inputs is not None and not offsets:
        codes, scales, zeros = gptq(weight, inputs, bits, block_size)
        return _packed(codes, scales, zeros, bits, block_size, None)
    codes = np.empty((k, n), np.uint8)
    scales, zeros = np.empty((k // block_size, n)), np.empty((k // block_size, n))
    residuals = np.empty((k // block_size, n), np.float32) if offsets else None
    for start in range(0, n, COLUMNS):  # columns round alone: a head's float64 temporaries, a slice at a time
        columns = slice(start, start + COLUMNS)
        codes[:, columns], scales[:, columns], zeros[:, columns], rest = _nearest(weight[:, columns], bits,
                                                                                  block_size, offsets)
        if offsets:
            residuals[:, columns] = rest
    return _packed(codes, scales, zeros, bits, block_size, residuals)


def _nearest(weight: np.ndarray, bits: int, block_size: int, offsets: bool) -> tuple[np.ndarray, ...]:
    """quantize's round to nearest of `weight` [K, N]: codes [K, N], scales and zeros [k_blocks, N] and the
    residuals (None without `offsets`)."""
    k, n = weight.shape
    top = 2 ** bits - 1
    blocks = weight.astype(np.float64).reshape(k // block_size, block_size, n)
    low, high = blocks.min(axis=1), blocks.max(axis=1)
    if not offsets:  # the grid must hold 0, so that the zero point is one of its codes
        low, high = np.minimum(low, 0), np.maximum(high, 0)
    scales = np.where(high > low, (high - low) / top, 1.0)
    zeros = np.clip(np.round(-low / scales), 0, top)
    if offsets:  # codes count steps from the block's own minimum; the zero point's shortfall is the residual
        codes = np.round((blocks - low[:, None]) / scales[:, None])
        residuals = (low + zeros * scales).astype(np.float32)
    else:
        codes, residuals = np.round(blocks / scales[:, None]) + zeros[:, None], None
    return np.clip(codes, 0, top).reshape(k, n), scales, zeros, residuals


def gptq(weight: np.ndarray, inputs: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, ...]:
    """GPTQ (Frantar et al., 2022) with integer zero points: codes [K, N], scales and zero points [k_blocks, N].
    The inputs are rounded one at a time and each one's error is spread over the inputs not yet rounded,
    weighted by the calibration activations' second moments H = XᵀX, so the product x @ W moves as little as it
    can on text like the calibration's. The busiest inputs (largest diagonal of H) are rounded first, while the
    most inputs are left to absorb their errors (act-order); each block's grid (_grid, searched at 4 bits) is
    chosen beforehand on the weights as given ("static groups"), so every code stays in its own block and the
    graph needs no g_idx. Costs nothing at run time: only the codes, scales and zero points change."""
    k, n = weight.shape
    top = 2 ** bits - 1
    x = inputs.astype(np.float64)
    h = x.T @ x
    h[np.diag_indices(k)] += np.where(np.diag(h) > 0, 0.0, 1.0) + DAMPING * np.mean(np.diag(h))
    importance = np.diag(h).astype(np.float32)
    clips = CLIPS if bits == 4 else CLIPS[:1]
    grids = [_grid(weight[b:b + block_size].astype(np.float32), top, importance[b:b + block_size], clips)
             for b in range(0, k, block_size)]
    scales, zeros = (np.stack(found) for found in zip(*grids))
    order = np.argsort(-importance, kind="stable")
    block_of = order // block_size  # the block of the i-th input rounded
    upper = np.linalg.cholesky(np.linalg.inv(h[np.ix_(order, order)])).T.astype(np.float32)  # H⁻¹ = UᵀU
    w = weight[order].astype(np.float32)
    codes = np.zeros((k, n), np.float32)
    for start in range(0, k, GPTQ_STEP):
        stop = min(start + GPTQ_STEP, k)
        errors = np.zeros((stop - start, n), np.float32)
        for i in range(start, stop):
            b = block_of[i]
            codes[i] = np.clip(np.round(w[i] / scales[b]) + zeros[b], 0, top)
            errors[i - start] = (w[i] - (codes[i] - zeros[b]) * scales[b]) / upper[i, i]
            w[i + 1:stop] -= np.outer(upper[i, i + 1:stop], errors[i - start])
        w[stop:] -= upper[start:stop, stop:].T @ errors
    return codes[np.argsort(order)], scales, zeros


def _grid(block: np.ndarray, top: int, importance: np.ndarray, clips: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The grid for one block [block_size, N] of each column: its range with 0 in it, shrunk by the factor of
    `clips` whose grid rounds the block with the least error, each input's error weighted by its `importance`
    (its calibration activations' second moment), as AWQ's clip search does; an outlier weight may be
    clipped where the rest of its block rounds finer."""
    low, high = np.minimum(block.min(axis=0), 0), np.maximum(block.max(axis=0), 0)
    best = (np.full(block.shape[1], np.inf), np.ones(block.shape[1]), np.zeros(block.shape[1]))
    for clip in clips:
        scales = np.where(high > low, (high - low) * clip / top, 1.0)
        zeros = np.clip(np.round(-low * clip / scales), 0, top)
        rounded = (np.clip(np.round(block / scales) + zeros, 0, top) - zeros) * scales
        error = importance @ (block - rounded) ** 2
        better = error < best[0]
        best = tuple(np.where(better, new, old) for new, old in zip((error, scales, zeros), best))
    return best[1].astype(np.float32), best[2].astype(np.float32)


def _packed(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, bits: int, block_size: int,
            residuals: np.ndarray | None) -> Quantized:
    """codes [K, N], scales and zero points [k_blocks, N] in MatMulNBits' layout."""
    k, n = codes.shape
    blocks = codes.astype(np.uint8).reshape(k // block_size, block_size, n)
    packed, zero_points = _pack(blocks.transpose(2, 0, 1), zeros.T.astype(np.uint8), bits)
    return Quantized(packed, np.ascontiguousarray(scales.T, np.float32), zero_points, bits, block_size, (k, n),
                     residuals)


def dequantize(q: Quantized) -> np.ndarray:
    """The weight [K, N] that the graph computes with (for tests and error reports)."""
    k, n = q.shape
    blocks = k // q.block_size
    codes, zeros = _unpack(q.packed, q.zero_points, q.bits, q.block_size, blocks)
    values = (codes.astype(np.float32) - zeros[..., None]) * q.scales[..., None]  # [N, k_blocks, block]
    if q.residuals is not None:
        values += q.residuals.T[..., None]
    return values.reshape(n, k).T


def block_sums(k: int, block_size: int) -> np.ndarray:
    """[K, k_blocks] of ones and zeros: activations @ it sums each block of inputs."""
    return np.kron(np.eye(k // block_size, dtype=np.float32), np.ones((block_size, 1), np.float32))


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
