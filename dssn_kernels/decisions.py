"""Exact decision rules on partial vote counts, for early exit (certify_at, predict).

After some of the L variants of an image have voted, with ``N`` the (unambiguous) counts
so far, ``amb`` the ambiguous counts so far (margin mode, else zero) and ``m`` the number
of variants left, every final count is bounded: each variant left either votes for one
class or (margin mode) is ambiguous, so finally ``N_c <= N'_c <= N_c + m`` and
``N'_c + amb'_c <= N_c + amb_c + m``. The rules below are *exact*: each says "yes" iff
the statement holds for every possible outcome of the remaining variants, so stopping on
them never changes an answer, whatever the order the variants are evaluated in.

The full certificate (docs/DESIGN.md, "The certificate"; margin: docs/DESIGN.md,
"The margin rule") is written once, here, in ``class_leads`` and ``certified_steps``:
certify, early exit and the result-file checks all use it. ``A = argmax N`` (lowest
index on ties) and, for ``r`` in steps,

    certified at r  <=>  lead_A >= 2r,
    lead_X = N_X - max over c != X of (N_c + amb_c + [c < X]).

(With amb = 0 this is ``floor((N_A - N_B - [B < A]) / 2) >= r``, the design's formula.)
``lead_X >= 0`` implies that X is the argmax of N, so at most one class can be
certified; ``class_leads`` (lead_X of every class X) is all the rules below need.

* ``certified_settled``: every outcome certifies the current leader A (so the final
  prediction is A as well): its worst case against each rival c is every remaining
  variant going to c, ``lead_A - m >= 2r``. (For r >= 1, "every outcome
  certifies some class" is the same statement: one variant moves N_X - N_Y by at most
  2, so neighbouring outcomes cannot certify different classes. At r = 0 without a
  margin every outcome is certified, and the rule waits until the prediction settles.)
* ``uncertifiable``: no outcome certifies any class: the best case for each A is every
  remaining variant voting for A, ``lead_A + m < 2r`` for every A.
* ``prediction_settled``: the leader of the unambiguous counts cannot be overtaken:
  ``N_A - m >= N_c + [c < A]`` for every c != A (ambiguous variants vote for no class).

With m = 0 the first two are complementary and equal the full certificate.

``more_needed_certify`` / ``more_needed_predict`` give, per image, a lower bound on how
many more variants must be evaluated before the decision can possibly be settled (each
variant moves any of the quantities above by at most 2); early exit evaluates that many
before looking again, which never overshoots a stopping point.
"""
from __future__ import annotations

import math
from fractions import Fraction
from numbers import Rational

import numpy as np
import torch

__all__ = ["required_steps", "leader", "class_leads", "certified_steps", "prediction_settled",
           "certified_settled", "uncertifiable", "more_needed_certify", "more_needed_predict"]


def required_steps(radius, q: int) -> int:
    """The fewest certified quantization steps that make ``radius`` certified.

    ``radius`` is an L1 radius on the [0, 1] scale, >= 0. An int or ``Fraction`` is
    converted exactly: ``ceil(Fraction(radius) * q)``. A float is compared the way the
    full certificate's float64 ``radius = steps / q`` is (``cert.radius >= radius``): the
    smallest ``s`` with ``float64(s) / q >= radius``. The two differ only when the float
    is within rounding of a multiple of 1/q (0.2 at q = 5: the float 0.2 is slightly above
    1/5, yet 1/5 as a float64 equals it).
    """
    if isinstance(radius, (bool, np.bool_)) or not isinstance(radius, (Rational, float, np.floating)):
        raise TypeError(f"radius must be a real number (int, float or Fraction), "
                        f"got {type(radius).__name__}")
    if isinstance(radius, Rational):
        exact = Fraction(int(radius.numerator), int(radius.denominator))
    else:
        if not math.isfinite(float(radius)):
            raise ValueError(f"radius must be finite, got {radius}")
        exact = Fraction(float(radius))
    if exact < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    steps = math.ceil(exact * q)
    # match float64 steps / q >= radius (beyond 2**60 steps no certificate reaches it:
    # L < 2**21, and float(steps) could overflow)
    if not isinstance(radius, Rational) and steps < 2 ** 60:
        while steps > 0 and float(steps - 1) / float(q) >= float(radius):
            steps -= 1
    return int(steps)


def leader(counts: torch.Tensor) -> torch.Tensor:
    """argmax of each row, the lowest index on ties (as torch.argmax)."""
    return counts.argmax(dim=1)


def class_leads(counts: torch.Tensor, ambiguous: torch.Tensor | None = None) -> torch.Tensor:
    """The certificate rule: [B, K] int64, entry (b, X) = lead_X =
    N_X - max over c != X of (N_c + amb_c + [c < X]) (amb = 0 without ``ambiguous``).
    Class X is certified at r steps iff lead_X >= 2r; lead_X >= 0 only for X = argmax N
    (lowest index on ties). K >= 2."""
    counts = counts.long()
    key = counts if ambiguous is None else counts + ambiguous.long()
    B, K = key.shape
    low = torch.iinfo(torch.int64).min // 4
    pad = torch.full((B, 1), low, dtype=torch.int64, device=key.device)
    # the best rival of X: prefix max over c < X (each + 1), suffix max over c > X
    before = torch.cat([pad, key[:, :-1].cummax(dim=1).values + 1], dim=1)
    after = torch.cat([key.flip(1)[:, :-1].cummax(dim=1).values.flip(1), pad], dim=1)
    return counts - torch.maximum(before, after)


def _lead(counts: torch.Tensor, ambiguous: torch.Tensor | None = None):
    """(A, lead_A) per row: the leader and its lead (class_leads at A)."""
    A = leader(counts)
    return A, class_leads(counts, ambiguous).gather(1, A[:, None])[:, 0]


def certified_steps(counts: torch.Tensor, ambiguous: torch.Tensor | None = None):
    """(prediction A, steps r) of complete counts [B, K] (K >= 2): A = argmax N (lowest
    index on ties) and r = floor(lead_A / 2) (class_leads), or -1 (not certified even at
    radius 0) when lead_A < 0, which needs ambiguous counts: without them (amb = 0) r is
    floor((N_A - N_B - [B < A]) / 2) for the runner-up B, never negative."""
    A, lead = _lead(counts, ambiguous)
    return A, torch.div(lead, 2, rounding_mode="floor").clamp(min=-1)


def _remaining(remaining, counts) -> torch.Tensor:
    m = torch.as_tensor(remaining, dtype=torch.int64, device=counts.device)
    return m.expand(counts.shape[0]) if m.dim() == 0 else m


def _steps(steps):
    """Steps as used against int64 counts: values past 2**60 act alike (no count reaches)."""
    if isinstance(steps, torch.Tensor):
        return steps.long()
    return min(int(steps), 2 ** 60)


def prediction_settled(counts: torch.Tensor, remaining) -> torch.Tensor:
    """Bool [B]: no outcome of the ``remaining`` variants can change argmax(counts)."""
    m = _remaining(remaining, counts)
    return _lead(counts)[1] - m >= 0


def certified_settled(counts: torch.Tensor, remaining, steps,
                      ambiguous: torch.Tensor | None = None) -> torch.Tensor:
    """Bool [B]: every outcome certifies the current leader at ``steps`` (so the final
    prediction is the current leader and it is certified)."""
    steps = _steps(steps)
    m = _remaining(remaining, counts)
    return _lead(counts, ambiguous)[1] - m >= 2 * steps


def uncertifiable(counts: torch.Tensor, remaining, steps,
                  ambiguous: torch.Tensor | None = None) -> torch.Tensor:
    """Bool [B]: no outcome of the remaining variants certifies any class at ``steps``."""
    steps = _steps(steps)
    m = _remaining(remaining, counts)
    possible = class_leads(counts, ambiguous) + m[:, None] >= 2 * steps
    return ~possible.any(dim=1)


def _halves(deficit: torch.Tensor) -> torch.Tensor:
    """ceil(deficit / 2) for deficit > 0, else 0."""
    return torch.div(deficit.clamp(min=0) + 1, 2, rounding_mode="floor")


def more_needed_predict(counts: torch.Tensor, remaining) -> torch.Tensor:
    """LongTensor [B]: a lower bound on the further variants needed before
    ``prediction_settled`` can hold (0 where it holds now). One variant raises
    N_X - m - rival_X by at most 2, so class X needs ceil(deficit_X / 2) more."""
    m = _remaining(remaining, counts)
    slack = class_leads(counts) - m[:, None]
    return _halves(-slack).min(dim=1).values


def more_needed_certify(counts: torch.Tensor, remaining, steps,
                        ambiguous: torch.Tensor | None = None,
                        settle_prediction: bool = False) -> torch.Tensor:
    """LongTensor [B]: a lower bound on the further variants needed before the certify_at
    decision can be settled (0 where it is settled now): ``certified_settled``, or
    ``uncertifiable`` (and, with ``settle_prediction``, ``prediction_settled`` too).

    One variant raises N_X - m - rival_X by at most 2 (certified_settled for X needs it
    >= 2r) and lowers N_X + m - rival_X by at most 2 (uncertifiable needs it < 2r for
    every X)."""
    steps = _steps(steps)
    m = _remaining(remaining, counts)
    lead = class_leads(counts, ambiguous)
    need_yes = _halves(2 * steps - (lead - m[:, None])).min(dim=1).values
    possible = lead + m[:, None] - 2 * steps                # >= 0: X can still be certified
    need_no = torch.div(possible + 2, 2, rounding_mode="floor").clamp(min=0).max(dim=1).values
    if settle_prediction:
        need_no = torch.maximum(need_no, more_needed_predict(counts, m))
    return torch.minimum(need_yes, need_no)
