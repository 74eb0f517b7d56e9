"""Triton kernel of dssn::vote_margin_: fused argmax-and-vote with a margin.

Same rule as the CPU/CUDA kernels (csrc/dssn_noise.h, dssn::margin_below) and the torch
backend (dssn_kernels/ops/vote.py): per NaN-free row, the top value T (first index A of
the maximum) and the runner-up value U (maximum of the other columns, U = T on a tie);
the row is ambiguous iff gap(T, U) < tau, decided exactly in float64 with the TwoSum
error term; an unambiguous row votes for A in counts, an ambiguous row adds 1 to
ambiguous[image, c] for every class c with gap(T, z_c) < tau. NaN rows add to nan_rows.

Pass 1 over the column blocks: block max, its first index and the block's runner-up
(maximum with that one entry removed), merged across blocks (strict ``>``: earlier blocks
win ties; runner-up = max of both runners-up and the smaller of the two maxima). Pass 2,
for ambiguous rows only (masked), adds the ambiguous counts. tau is read from a one-
element float64 tensor: a Python float kernel argument would be float32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreting
from .vote import _column_block, check_vote_args, vote_settings

KERNEL_INTERPRETED = interpreting()


@triton.jit
def _below(a, z, tau):
    """gap(a, z) < tau exactly, a >= z, all float64 (see csrc/dssn_noise.h)."""
    s = a - z
    v = s - a
    e = (a - (s - v)) + ((0.0 - z) - v)
    less = (s < tau) | ((s == tau) & (e < 0.0))
    # a tie is a gap of 0 (inf - inf would be NaN); a tensor condition, not the scalar
    # "0.0 < tau", which Triton's interpreter mistypes in tl.where
    return tl.where(a == z, tl.zeros_like(s) < tau, less)


@triton.jit
def _vote_margin_kernel(counts_ptr, amb_ptr, nan_ptr, logits_ptr, tau_ptr, R, K, stride_r,
                        stride_k, row0, rows_per_image, BLOCK_R: tl.constexpr,
                        BLOCK_K: tl.constexpr, K_BLOCKS: tl.constexpr,
                        IS_FP64: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    row_base = logits_ptr + rows.to(tl.int64) * stride_r
    tau = tl.load(tau_ptr)

    if IS_FP64:
        best = tl.full([BLOCK_R], float("-inf"), tl.float64)
        second = tl.full([BLOCK_R], float("-inf"), tl.float64)
    else:
        best = tl.full([BLOCK_R], float("-inf"), tl.float32)
        second = tl.full([BLOCK_R], float("-inf"), tl.float32)
    arg = tl.zeros([BLOCK_R], dtype=tl.int32)
    nan_seen = tl.zeros([BLOCK_R], dtype=tl.int32)
    for kb in range(K_BLOCKS):
        cols, x, has_nan, block_max, first = _column_block(row_base, row_ok, kb, K, stride_k,
                                                           BLOCK_K, IS_FP64)
        nan_seen = tl.maximum(nan_seen, has_nan)
        block_second = tl.max(tl.where(cols[None, :] == first[:, None], float("-inf"), x),
                              axis=1)
        second = tl.maximum(tl.maximum(second, block_second), tl.minimum(best, block_max))
        better = block_max > best                    # strict: earlier blocks win ties
        arg = tl.where(better, first, arg)
        best = tl.where(better, block_max, best)

    top = best.to(tl.float64)
    valid = row_ok & (nan_seen == 0)
    amb_row = valid & _below(top, second.to(tl.float64), tau)
    image = (rows.to(tl.int64) + row0) // rows_per_image
    tl.atomic_add(counts_ptr + image * K + arg, tl.full([BLOCK_R], 1, tl.int64),
                  mask=valid & ~amb_row, sem="relaxed")
    nans = tl.sum((row_ok & (nan_seen != 0)).to(tl.int64), axis=0)
    tl.atomic_add(nan_ptr, nans, mask=nans > 0, sem="relaxed")

    for kb in range(K_BLOCKS):
        k0 = kb * BLOCK_K
        cols = k0 + tl.arange(0, BLOCK_K)
        ok = amb_row[:, None] & (cols < K)[None, :]
        x = tl.load(row_base[:, None] + cols.to(tl.int64)[None, :] * stride_k,
                    mask=ok, other=0).to(tl.float64)
        member = ok & _below(top[:, None], x, tau)
        tl.atomic_add(amb_ptr + image[:, None] * K + cols.to(tl.int64)[None, :],
                      tl.full([BLOCK_R, BLOCK_K], 1, tl.int64), mask=member, sem="relaxed")


def vote_margin_triton(counts: torch.Tensor, ambiguous: torch.Tensor, nan_rows: torch.Tensor,
                       logits: torch.Tensor, row0: int, rows_per_image: int,
                       margin: float) -> None:
    """Same semantics as torch.ops.dssn.vote_margin_ (in place on counts, ambiguous,
    nan_rows). counts, ambiguous: contiguous int64 [B, K]; nan_rows: int64 with one
    element; logits: [R, K], K >= 2, float32/float16/bfloat16/float64, any strides."""
    row0, rows_per_image = check_vote_args("vote_margin_triton", counts, nan_rows, logits,
                                           row0, rows_per_image, ambiguous=ambiguous,
                                           min_classes=2)
    margin = float(margin)
    if not 0.0 <= margin < float("inf"):
        raise ValueError(f"vote_margin_triton: margin must be finite and >= 0, got {margin}")
    R, K = logits.shape
    if R == 0:
        return
    tau = torch.tensor([margin], dtype=torch.float64, device=logits.device)
    block_r, block_k, num_warps = vote_settings(R, K)
    grid = (triton.cdiv(R, block_r),)
    _vote_margin_kernel[grid](counts, ambiguous, nan_rows, logits, tau, R, K, logits.stride(0),
                              logits.stride(1), row0, rows_per_image, BLOCK_R=block_r,
                              BLOCK_K=block_k, K_BLOCKS=triton.cdiv(K, block_k),
                              IS_FP64=logits.dtype == torch.float64, num_warps=num_warps)
