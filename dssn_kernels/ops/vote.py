"""vote: fused argmax-and-vote. Each logits row votes for its argmax (first index wins
ties, as torch.argmax) in int64 counts; rows holding a NaN are counted, not voted."""
from __future__ import annotations

import torch


def vote_torch(counts: torch.Tensor, nan_rows: torch.Tensor, logits: torch.Tensor,
               row0: int, rows_per_image: int) -> None:
    R = logits.shape[0]
    has_nan = torch.isnan(logits).any(dim=1)
    winner = logits.argmax(dim=1)
    image = torch.div(torch.arange(row0, row0 + R, device=logits.device), rows_per_image,
                      rounding_mode="floor")
    ok = ~has_nan
    counts.index_put_((image[ok], winner[ok]),
                      torch.ones((), dtype=counts.dtype, device=counts.device),
                      accumulate=True)
    nan_rows += has_nan.sum()


def vote_into(counts: torch.Tensor, nan_rows: torch.Tensor, logits: torch.Tensor,
              row0: int, rows_per_image: int, backend: str) -> None:
    """counts: int64 [B, K]; logits: [R, K]; row r votes for image
    (row0 + r) // rows_per_image; nan_rows: int64 [1]."""
    if backend == "torch":
        vote_torch(counts, nan_rows, logits, row0, rows_per_image)
    elif backend == "triton":
        from ..triton import vote_triton
        vote_triton(counts, nan_rows, logits, row0, rows_per_image)
    else:  # cpp, cuda: the native kernels, by the tensors' dispatch key
        torch.ops.dssn.vote_(counts, nan_rows, logits, row0, rows_per_image)
