"""Triton kernel of dssn::vote_: fused argmax-and-vote.

Each logits row votes for its argmax, the FIRST index of the maximum on ties (as
torch.argmax), into int64 counts[image, class] with image = (row0 + r) // rows_per_image;
rows holding a NaN are counted in nan_rows and do not vote. The argmax is explicit (block
max, then the smallest index equal to it, then a strict ``>`` across column blocks) rather
than tl.argmax, whose tie-breaking is an implementation detail. Votes are integer atomic
adds, so counts do not depend on the order the programs run in.

Each program reduces BLOCK_R rows, looping over the columns in K_BLOCKS = cdiv(K, BLOCK_K)
blocks of BLOCK_K. K_BLOCKS is a constexpr (a static trip count; one block whenever
K <= MAX_BLOCK), which also keeps the loop a plain Python range in Triton's interpreter:
triton 3.6's interpreter cannot take a range over a runtime int under numpy >= 2.4.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreting
from .tiles import tile_settings

# Whether the kernel below was defined for Triton's interpreter (see triton_available).
KERNEL_INTERPRETED = interpreting()

_LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@triton.jit
def _column_block(row_base, row_ok, kb, K, stride_k, BLOCK_K: tl.constexpr,
                  IS_FP64: tl.constexpr):
    """Column block kb (columns kb * BLOCK_K to kb * BLOCK_K + BLOCK_K - 1) of a program's
    rows (shared with vote_margin): (cols, x: the logits as float32, or float64 for
    float64 input (both exact), -inf where masked; has_nan: 1 where the row holds a NaN
    there; block_max; first: the first column holding block_max)."""
    cols = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = row_ok[:, None] & (cols < K)[None, :]
    x = tl.load(row_base[:, None] + cols.to(tl.int64)[None, :] * stride_k, mask=ok, other=0)
    if IS_FP64:
        x = x.to(tl.float64)
    else:
        x = x.to(tl.float32)                         # exact for float16/bfloat16
    has_nan = tl.max((x != x).to(tl.int32), axis=1)
    x = tl.where(ok, x, float("-inf"))
    block_max = tl.max(x, axis=1)
    first = tl.min(tl.where(ok & (x == block_max[:, None]), cols[None, :], K), axis=1)
    return cols, x, has_nan, block_max, first


@triton.jit
def _vote_kernel(counts_ptr, nan_ptr, logits_ptr, R, K, stride_r, stride_k, row0,
                 rows_per_image, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                 K_BLOCKS: tl.constexpr, IS_FP64: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    row_base = logits_ptr + rows.to(tl.int64) * stride_r

    if IS_FP64:
        best = tl.full([BLOCK_R], float("-inf"), tl.float64)
    else:
        best = tl.full([BLOCK_R], float("-inf"), tl.float32)
    arg = tl.zeros([BLOCK_R], dtype=tl.int32)       # all -inf rows vote 0, as torch
    nan_seen = tl.zeros([BLOCK_R], dtype=tl.int32)
    for kb in range(K_BLOCKS):
        cols, x, has_nan, block_max, first = _column_block(row_base, row_ok, kb, K, stride_k,
                                                           BLOCK_K, IS_FP64)
        nan_seen = tl.maximum(nan_seen, has_nan)
        better = block_max > best                    # strict: earlier blocks win ties
        arg = tl.where(better, first, arg)
        best = tl.where(better, block_max, best)

    image = (rows.to(tl.int64) + row0) // rows_per_image
    voting = row_ok & (nan_seen == 0)
    tl.atomic_add(counts_ptr + image * K + arg, tl.full([BLOCK_R], 1, tl.int64),
                  mask=voting, sem="relaxed")
    nans = tl.sum((row_ok & (nan_seen != 0)).to(tl.int64), axis=0)
    tl.atomic_add(nan_ptr, nans, mask=nans > 0, sem="relaxed")


def vote_settings(R: int, K: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_K, num_warps) for R rows of K logits: the whole row in one block
    when K <= MAX_BLOCK."""
    return tile_settings(R, K)


def check_vote_args(op: str, counts: torch.Tensor, nan_rows: torch.Tensor,
                    logits: torch.Tensor, row0: int, rows_per_image: int, *,
                    ambiguous: torch.Tensor | None = None,
                    min_classes: int = 1) -> tuple[int, int]:
    """The argument checks of vote_triton and vote_margin_triton (``op``, which names
    every error, a ValueError): counts (and ambiguous, shaped like counts) contiguous int64
    [B, K]; nan_rows a contiguous int64 tensor with one element; logits [R, K] of a
    supported dtype, all on one device, CUDA unless interpreted; row0 >= 0,
    rows_per_image >= 1; for R > 0, K >= min_classes and every row mapped to an image of
    counts. Returns (row0, rows_per_image) as ints."""
    named = [("counts", counts)] + ([] if ambiguous is None else [("ambiguous", ambiguous)])
    for name, t in named:
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.dim() != 2 \
                or not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be a contiguous int64 [B, K] tensor")
    if ambiguous is not None and ambiguous.shape != counts.shape:
        raise ValueError(f"{op}: ambiguous {tuple(ambiguous.shape)} must be shaped like "
                         f"counts {tuple(counts.shape)}")
    if nan_rows.dtype != torch.int64 or nan_rows.numel() != 1 or not nan_rows.is_contiguous():
        raise ValueError(f"{op}: nan_rows must be a contiguous int64 tensor with one element")
    if logits.dim() != 2 or logits.shape[1] != counts.shape[1]:
        raise ValueError(f"{op}: logits {tuple(logits.shape)} do not match counts "
                         f"{tuple(counts.shape)}")
    if logits.dtype not in _LOGIT_DTYPES:
        raise ValueError(f"{op}: logits must be float32, float16, bfloat16 or float64, "
                         f"got {logits.dtype}")
    named += [("nan_rows", nan_rows), ("logits", logits)]
    if len({t.device for _, t in named}) != 1:
        names = ", ".join(name for name, _ in named[:-1]) + " and logits"
        devices = ", ".join(str(t.device) for _, t in named)
        raise ValueError(f"{op}: {names} are on different devices ({devices})")
    if not KERNEL_INTERPRETED and logits.device.type != "cuda":
        raise ValueError(f"{op}: needs CUDA tensors (got {logits.device}) unless "
                         "TRITON_INTERPRET=1")
    row0, rows_per_image = int(row0), int(rows_per_image)
    if rows_per_image < 1 or row0 < 0:
        raise ValueError(f"{op}: bad row mapping (row0={row0}, "
                         f"rows_per_image={rows_per_image})")
    R, K = logits.shape
    if R > 0 and K < min_classes:
        raise ValueError(f"{op}: logits have no classes" if min_classes == 1 else
                         f"{op}: logits need at least {min_classes} classes")
    if R > 0 and (row0 + R - 1) // rows_per_image >= counts.shape[0]:
        raise ValueError(f"{op}: rows map past the last image of counts")
    return row0, rows_per_image


def vote_triton(counts: torch.Tensor, nan_rows: torch.Tensor, logits: torch.Tensor,
                row0: int, rows_per_image: int) -> None:
    """Adds each row's vote into ``counts`` (in place); rows with a NaN add to nan_rows.

    counts: contiguous int64 [B, K]; nan_rows: int64 with one element; logits: [R, K]
    float32/float16/bfloat16/float64, any strides; row r votes for image
    (row0 + r) // rows_per_image. Same semantics as torch.ops.dssn.vote_.
    """
    row0, rows_per_image = check_vote_args("vote_triton", counts, nan_rows, logits, row0,
                                           rows_per_image)
    R, K = logits.shape
    if R == 0:
        return
    block_r, block_k, num_warps = vote_settings(R, K)
    grid = (triton.cdiv(R, block_r),)
    _vote_kernel[grid](counts, nan_rows, logits, R, K, logits.stride(0), logits.stride(1),
                       row0, rows_per_image, BLOCK_R=block_r, BLOCK_K=block_k,
                       K_BLOCKS=triton.cdiv(K, block_k), IS_FP64=logits.dtype == torch.float64,
                       num_warps=num_warps)
