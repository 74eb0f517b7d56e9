"""vote: fused argmax-and-vote. Each logits row votes for its argmax (first index wins
ties, as torch.argmax) in int64 counts; rows holding a NaN are counted, not voted.

vote_margin: the same with a margin tau: rows whose top logit beats the runner-up by less
than tau vote for no class and are recorded, per class they could go to, in ``ambiguous``.
"""
from __future__ import annotations

import torch


def vote_torch(counts: torch.Tensor, nan_rows: torch.Tensor, logits: torch.Tensor,
               row0: int, rows_per_image: int) -> None:
    R = logits.shape[0]
    has_nan = torch.isnan(logits).any(dim=1)
    winner = logits.argmax(dim=1)
    image = torch.div(torch.arange(row0, row0 + R, device=logits.device), rows_per_image,
                      rounding_mode="floor")
    # every row adds 1, or 0 for a NaN row (its argmax is still a valid index): no
    # boolean-mask indexing, so no device-to-host sync on a GPU
    counts.index_put_((image, winner), (~has_nan).to(counts.dtype), accumulate=True)
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


# --- vote with a margin -----------------------------------------------------------------
#
# The rule (identical in every backend; README, "What 'exact' means under floating point"):
# logits are read exactly as float64 (float16/bfloat16/float32 convert exactly). For a
# NaN-free row with top value T (first index of the maximum: A) and runner-up value U (the
# maximum over the other columns; U = T on a tie), and margin tau >= 0:
#
#   gap(T, z) = 0 if T == z, else the exact real T - z (+inf when T = +inf or z = -inf);
#   the row is AMBIGUOUS iff gap(T, U) < tau (so never when tau = 0);
#   an unambiguous row votes for A (counts[b, A] += 1), exactly as vote_;
#   an ambiguous row does not vote: ambiguous[b, c] += 1 for every class c with
#   gap(T, z_c) < tau (the classes that can become the argmax when every logit moves by
#   less than tau/2; T's own class is one of them), and that is all.
#
# "gap < tau" is decided exactly, without rounding: s = fl(T - z) with the error-free
# transformation TwoSum, e = (T - (s - v)) + (-z - v), v = s - T, gives T - z = s + e
# exactly, so gap < tau <=> s < tau or (s == tau and e < 0). Only additions: no fused
# multiply-add can change it (float64 logits: below 2^1023 in magnitude, as TwoSum needs).

def margin_below(top: torch.Tensor, z: torch.Tensor, tau: float) -> torch.Tensor:
    """Bool: gap(top, z) < tau, exactly (float64 tensors, top >= z, broadcastable)."""
    s = top - z
    v = s - top
    e = (top - (s - v)) + ((-z) - v)
    less = (s < tau) | ((s == tau) & (e < 0))
    return torch.where(top == z, torch.tensor(tau > 0, device=less.device), less)


def vote_margin_torch(counts: torch.Tensor, ambiguous: torch.Tensor, nan_rows: torch.Tensor,
                      logits: torch.Tensor, row0: int, rows_per_image: int,
                      margin: float) -> None:
    R, K = logits.shape
    if R == 0:
        return
    x = logits.double()                                 # exact
    has_nan = torch.isnan(x).any(dim=1)
    rows = torch.arange(R, device=x.device)
    winner = x.argmax(dim=1)                            # first index of the maximum
    top = x[rows, winner]
    others = x.clone()
    others[rows, winner] = float("-inf")
    runner = others.max(dim=1).values
    ok = ~has_nan
    amb_row = ok & margin_below(top, runner, margin)
    vote = ok & ~amb_row
    image = torch.div(torch.arange(row0, row0 + R, device=x.device), rows_per_image,
                      rounding_mode="floor")
    # adds of 0/1 rather than boolean-mask indexing: no device-to-host sync on a GPU
    counts.index_put_((image, winner), vote.to(counts.dtype), accumulate=True)
    member = amb_row[:, None] & margin_below(top[:, None], x, margin)     # [R, K]
    ambiguous.index_add_(0, image, member.to(ambiguous.dtype))
    nan_rows += has_nan.sum()


def vote_margin_into(counts: torch.Tensor, ambiguous: torch.Tensor, nan_rows: torch.Tensor,
                     logits: torch.Tensor, row0: int, rows_per_image: int, margin: float,
                     backend: str) -> None:
    """vote_into with a margin (the rule above): counts, ambiguous: int64 [B, K];
    logits: [R, K] with K >= 2; row r belongs to image (row0 + r) // rows_per_image;
    nan_rows: int64 [1]. margin = 0 gives exactly vote_into (and no ambiguous row)."""
    margin = float(margin)
    if backend == "torch":
        vote_margin_torch(counts, ambiguous, nan_rows, logits, row0, rows_per_image, margin)
    elif backend == "triton":
        from ..triton import vote_margin_triton
        vote_margin_triton(counts, ambiguous, nan_rows, logits, row0, rows_per_image, margin)
    else:  # cpp, cuda: the native kernels, by the tensors' dispatch key
        torch.ops.dssn.vote_margin_(counts, ambiguous, nan_rows, logits, row0, rows_per_image,
                                    margin)
