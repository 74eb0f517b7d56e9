"""expand: write variants start..start+count-1 of a batch of images into a workspace.

The integer formula (DESIGN.md) lives once in Python, here, in ``noise_numerator``;
the native kernels read it from csrc/dssn_noise.h.
"""
from __future__ import annotations

import torch

from ..spec import value_table

_TABLES: dict = {}


def noise_numerator(k: torch.Tensor, j: torch.Tensor, L: int, q: int) -> torch.Tensor:
    """m = 4q * (noised pixel) for integer levels k (0..q) and split indices j (0..L-1)."""
    n = torch.div(k - j - 1, L, rounding_mode="floor") + 1
    top = 2 * L * n + 2 * j + 1
    return top.clamp(max=2 * q) + (top - 2 * L).clamp(min=0)


def cached_value_table(q: int, device, dtype=torch.float32) -> torch.Tensor:
    key = (q, str(device), dtype)
    table = _TABLES.get(key)
    if table is None:
        table = _TABLES[key] = value_table(q, dtype).to(device)
    return table


def expand_torch(out: torch.Tensor, levels: torch.Tensor, offsets: torch.Tensor,
                 L: int, q: int, start: int) -> None:
    count = out.shape[1]
    t = torch.arange(start, start + count, device=levels.device)
    j = (offsets.long()[None, :] + t[:, None]) % L                   # [count, d]
    m = noise_numerator(levels.long()[:, None, :], j[None], L, q)    # [B, count, d]
    torch.index_select(cached_value_table(q, levels.device, out.dtype), 0, m.reshape(-1),
                       out=out.view(-1))


def expand_into(out: torch.Tensor, levels: torch.Tensor, offsets: torch.Tensor,
                L: int, q: int, start: int, backend: str) -> None:
    """out: contiguous float32/float16/bfloat16 [B, count, d]; levels: [B, d] (uint8/int32);
    offsets: int32 [d]. Writes variants start..start+count-1 of each image."""
    if backend == "torch":
        expand_torch(out, levels, offsets, L, q, start)
    elif backend == "triton":
        from ..triton import expand_triton
        expand_triton(out, levels, offsets, L, q, start)
    else:  # cpp, cuda: the native kernels, by the tensors' dispatch key
        torch.ops.dssn.expand_(out, levels, offsets, L, q, start)
