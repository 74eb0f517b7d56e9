"""Block sizes of the Triton kernels, computed from the problem shape: a 2-D tile of
about TILE elements, the inner (contiguous) dimension first, up to MAX_BLOCK wide, and the
warps that fill it."""
from __future__ import annotations

import triton

TILE = 4096
MAX_BLOCK = 1024


def tile_settings(rows: int, cols: int) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_COLS, num_warps) for a [rows, cols] problem."""
    block_c = min(triton.next_power_of_2(cols), MAX_BLOCK)
    block_r = min(triton.next_power_of_2(rows), max(1, TILE // block_c))
    tile = block_r * block_c
    num_warps = 8 if tile >= 4096 else 4 if tile >= 1024 else 2 if tile >= 256 else 1
    return block_r, block_c, num_warps
