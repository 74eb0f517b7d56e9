"""Triton kernel of dssn::expand_: writes variants start..start+count-1 of a batch of
images straight into a workspace, in float32, float16 or bfloat16.

Math (docs/DESIGN.md, "The integer form of the noise"), per pixel level k in 0..q and
split index j = (v + t) mod L:

    n  = floor((k - j - 1) / L) + 1      computed as (k - j - 1 + L) // L, a >= 0 division
    U  = min(2Ln + 2j + 1, 2q),  Lo = max(2Ln + 2j + 1 - 2L, 0),  m = U + Lo
    value = m / (4q), correctly rounded to float32 by tl.div_rn (IEEE div.rn.f32; plain
    ``/`` is div.full.f32 on the GPU, up to 2 ulp off), then for float16/bfloat16 rounded
    to nearest-even once more (exact for q <= spec.MAX_Q_FOR_DTYPE).

Everything before the division is int32 arithmetic (|values| <= 2(q + L) <= 2^22), so no
float contraction (fma) can occur; the launch also passes enable_fp_fusion=False, and
tests/test_triton_expand.py checks the sm_80 PTX (div.rn.f32, no float fma/mad).
float32 -> float16 uses Triton's conversion (cvt.rn.f16.f32 on the GPU, numpy's RNE cast
in the interpreter); float32 -> bfloat16 is done on the bits (add 0x7FFF + lsb, shift),
because the interpreter's float32 -> bfloat16 cast truncates (triton 3.9).

Each program writes a [BLOCK_T variants, BLOCK_D pixels] tile of one image: the levels
and offsets of BLOCK_D pixels are loaded once and reused for BLOCK_T variants; stores are
contiguous along the pixels.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreting
from .tiles import tile_settings
from ..spec import MAX_LEVELS_PLUS_VARIANTS, check_value_dtype

# Whether the kernel below was defined for Triton's interpreter (see triton_available).
KERNEL_INTERPRETED = interpreting()

_OUT_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_LEVEL_DTYPES = (torch.uint8, torch.int32)

_MAX_GRID_Y = 65535


@triton.jit
def _expand_kernel(out_ptr, levels_ptr, offsets_ptr, count, d, L, q, start, four_q,
                   BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, OUT_KIND: tl.constexpr):
    pid_bt = tl.program_id(0)          # image b, block of variants
    pid_d = tl.program_id(1)           # block of pixels
    t_blocks = tl.cdiv(count, BLOCK_T)
    b = pid_bt // t_blocks
    tb = pid_bt - b * t_blocks

    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d
    k = tl.load(levels_ptr + b.to(tl.int64) * d + cols, mask=col_ok, other=0).to(tl.int32)
    v = tl.load(offsets_ptr + cols, mask=col_ok, other=0).to(tl.int32)

    tt = tb * BLOCK_T + tl.arange(0, BLOCK_T)      # variant index within the window
    t_ok = tt < count
    t = tl.where(t_ok, tt + start, 0)              # keeps masked lanes' j in 0..L-1

    j = v[None, :] + t[:, None]                    # v, t in 0..L-1
    j = tl.where(j >= L, j - L, j)
    a = k[None, :] - j - 1 + L                     # in 0..q+L-1: // is floor here
    n = a // L                                     # = floor((k - j - 1) / L) + 1
    top = 2 * L * n + 2 * j + 1
    m = tl.minimum(top, 2 * q) + tl.maximum(top - 2 * L, 0)   # 0..4q, exact in fp32

    val = tl.div_rn(m.to(tl.float32), four_q)      # correctly rounded m / (4q)

    rows = b.to(tl.int64) * count + tt             # row of out viewed as [B*count, d]
    ptrs = out_ptr + rows[:, None] * d + cols[None, :]
    mask = t_ok[:, None] & col_ok[None, :]
    if OUT_KIND == 0:
        tl.store(ptrs, val, mask=mask)
    elif OUT_KIND == 1:
        tl.store(ptrs, val.to(tl.float16), mask=mask)
    else:
        # float32 -> bfloat16, round to nearest even, on the bits (val is finite, >= 0);
        # out is passed as an int16 view.
        bits = val.to(tl.int32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        tl.store(ptrs, (bits >> 16).to(tl.int16), mask=mask)


def expand_settings(count: int, d: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_D, num_warps) for a window of ``count`` variants of ``d`` pixels:
    pixels first (contiguous stores)."""
    return tile_settings(count, d)


def _check(out, levels, offsets, L, q, start):
    if not isinstance(out, torch.Tensor) or out.dtype not in _OUT_KIND or out.dim() != 3 \
            or not out.is_contiguous():
        raise ValueError("expand_triton: out must be a contiguous float32/float16/bfloat16 "
                         f"[B, count, d] tensor, got {getattr(out, 'dtype', type(out))} "
                         f"{tuple(getattr(out, 'shape', ()))}")
    if levels.dtype not in _LEVEL_DTYPES or levels.dim() != 2 or not levels.is_contiguous():
        raise ValueError("expand_triton: levels must be a contiguous uint8 or int32 [B, d] "
                         f"tensor, got {levels.dtype} {tuple(levels.shape)}")
    if offsets.dtype != torch.int32 or offsets.dim() != 1 or not offsets.is_contiguous():
        raise ValueError("expand_triton: offsets must be a contiguous int32 [d] tensor, "
                         f"got {offsets.dtype} {tuple(offsets.shape)}")
    B, d = levels.shape
    if out.shape[0] != B or out.shape[2] != d or offsets.shape[0] != d:
        raise ValueError(f"expand_triton: shapes of out {tuple(out.shape)}, levels "
                         f"{tuple(levels.shape)} and offsets {tuple(offsets.shape)} disagree")
    if not (out.device == levels.device == offsets.device):
        raise ValueError(f"expand_triton: out, levels and offsets are on different devices "
                         f"({out.device}, {levels.device}, {offsets.device})")
    if not KERNEL_INTERPRETED and out.device.type != "cuda":
        raise ValueError(f"expand_triton: needs CUDA tensors (got {out.device}) unless "
                         "TRITON_INTERPRET=1")
    L, q, start = int(L), int(q), int(start)
    if L < 1 or q < 1 or q + L > MAX_LEVELS_PLUS_VARIANTS:
        raise ValueError(f"expand_triton: need L >= 1, q >= 1 and q + L <= "
                         f"{MAX_LEVELS_PLUS_VARIANTS} (got L={L}, q={q})")
    count = out.shape[1]
    if start < 0 or start + count > L:
        raise ValueError(f"expand_triton: variant window [{start}, {start + count}) is "
                         f"outside 0..{L}")
    check_value_dtype(q, out.dtype)
    return L, q, start


def expand_triton(out: torch.Tensor, levels: torch.Tensor, offsets: torch.Tensor,
                  L: int, q: int, start: int) -> None:
    """Writes variants start..start+count-1 of each image into ``out`` (in place).

    out: contiguous [B, count, d], float32, float16 or bfloat16; levels: contiguous
    [B, d] uint8 or int32 holding k in 0..q; offsets: contiguous int32 [d] in 0..L-1.
    Same semantics and bits as torch.ops.dssn.expand_ (float32), and for float16/bfloat16
    the nearest value of the dtype to m/(4q) (= spec.value_table(q, dtype)[m]).
    Levels and offsets are not range-checked (the callers validate them).
    """
    L, q, start = _check(out, levels, offsets, L, q, start)
    B, count, d = out.shape
    if out.numel() == 0:
        return
    block_t, block_d, num_warps = expand_settings(count, d)
    grid = (B * triton.cdiv(count, block_t), triton.cdiv(d, block_d))
    if grid[1] > _MAX_GRID_Y or grid[0] >= 2 ** 31:
        raise ValueError(f"expand_triton: problem too large for one launch (grid {grid})")
    target = out.view(torch.int16) if out.dtype == torch.bfloat16 else out
    # four_q goes in as an fp32 scalar (4q < 2^23 is exact); a float argument, unlike an
    # int equal to 1, is never specialized into a constexpr.
    _expand_kernel[grid](target, levels, offsets, count, d, L, q, start, float(4 * q),
                         BLOCK_T=block_t, BLOCK_D=block_d, OUT_KIND=_OUT_KIND[out.dtype],
                         num_warps=num_warps, enable_fp_fusion=False)
