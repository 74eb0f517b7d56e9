"""expand: write variants start..start+count-1 of a batch of images into a workspace.

The integer formula (docs/DESIGN.md, "The integer form of the noise") lives once in
Python, here, in ``noise_numerator``; the native kernels read it from csrc/dssn_noise.h.
"""
from __future__ import annotations

import functools

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


# Largest (q + 1) * L for which expand_torch gathers from a [q + 1, L] table of the noised
# values (16 MiB in float32; q = 255 up to L = 16384); beyond it, the formula runs per
# element. Both give the same bits (tests/test_expand.py).
MAX_TABLE_ENTRIES = 1 << 22


@functools.lru_cache(maxsize=16)
def split_value_table(q: int, L: int, device: torch.device, dtype) -> torch.Tensor:
    """Flat [(q + 1) * L]: entry k * L + j is the noised value of level k at split index j."""
    k = torch.arange(q + 1, device=device)[:, None]
    j = torch.arange(L, device=device)[None, :]
    return cached_value_table(q, device, dtype)[noise_numerator(k, j, L, q)].reshape(-1)


def expand_torch(out: torch.Tensor, levels: torch.Tensor, offsets: torch.Tensor,
                 L: int, q: int, start: int) -> None:
    count = out.shape[1]
    if (q + 1) * L <= MAX_TABLE_ENTRIES:  # one int32 index pass and one gather
        t = torch.arange(start, start + count, dtype=torch.int32, device=levels.device)
        j = offsets.to(torch.int32)[None, :] + t[:, None]             # < 2L
        j = torch.where(j >= L, j - L, j)                               # [count, d]
        index = (levels.to(torch.int32) * L)[:, None, :] + j[None]      # [B, count, d]
        table = split_value_table(q, L, levels.device, out.dtype)
        torch.index_select(table, 0, index.view(-1), out=out.view(-1))
        return
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
