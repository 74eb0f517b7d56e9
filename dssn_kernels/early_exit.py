"""Early exit, same answers: ``certify_at`` (is each image robust at one radius?) and
``predict`` (the smoothed class) without evaluating all L variants when the answer is
already determined.

After some variants of an image have voted, the counts so far and the number left bound
every final count; the exact rules of :mod:`dssn_kernels.decisions` say when no outcome
of the remaining variants can change the answer, and the image then drops out of the
batch (the others go on). The answers are those of the full evaluation, whatever the
order the variants are evaluated in, the chunking or the batch composition (for a
deterministic model: one whose vote on an input does not depend on the batch).

The loop: every image has a *plan*, the number of variants it evaluates before its
decision is looked at again. By default the plan is the fewest variants after which the
decision could possibly be settled (``decisions.more_needed_*``: evaluating fewer could
never stop earlier, so nothing is overshot), at least 1, and from an image's eighth look
on at least 1/8 of its remaining variants (so an image near the boundary takes O(log L)
looks, not L). ``chunk_size=k`` fixes the plan to k variants instead. Each round packs
the planned variants of the active images, in image order, into one forward batch of up
to ``batch_size`` rows (a plan larger than the room left continues next round), runs the
model, adds the votes, and checks the images whose plan is complete. The check copies
those images' counts to the host: one device-to-host sync per round on a GPU.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch

from . import decisions
from .certify import prepare_images
from .ops import check_margin, expand_into, vote_into, vote_margin_into
from .pipeline import ModelCall, check_batch_size, check_logits, warn_if_training
from .spec import _check_q, check_value_dtype, resolve_num_variants

__all__ = ["Decision", "Prediction", "certify_at", "predict", "variant_order", "ORDERS"]

ORDERS = ("sequential", "reversed", "strided")

# From an image's eighth look on, its plan is at least this fraction of its remaining
# variants (bounds the number of rounds by O(log L) per image).
_FLOOR_AFTER_LOOKS = 8
_FLOOR_FRACTION = 8


@dataclass
class Prediction:
    """Result of :func:`predict`, per image of the batch x [B, ...].

    prediction: LongTensor[B], the smoothed classifier's class, equal to the full
        evaluation's ``certify(...).prediction`` (top vote count, lowest index on ties;
        with a margin, ambiguous variants vote for no class).
    evaluated: LongTensor[B], variants evaluated (1..L).
    counts: LongTensor[B, K], the votes of the evaluated variants; ambiguous: the
        ambiguous counts of those variants (margin > 0), else None. (K = num_classes
        when the model never ran: certify_at with a radius out of reach and
        settle_prediction=False; K = 0 if num_classes was not given either.)
    num_variants: L; q; backend: the backend that ran; margin: the vote margin.
    """
    prediction: torch.Tensor
    evaluated: torch.Tensor
    counts: torch.Tensor
    ambiguous: torch.Tensor | None
    num_variants: int
    q: int
    backend: str
    margin: float = 0.0


@dataclass(kw_only=True)
class Decision(Prediction):
    """Result of :func:`certify_at`: everything in :class:`Prediction`, plus

    certified: BoolTensor[B], whether the image is certified at ``radius``: exactly
        ``certify(...).radius >= radius`` of the full evaluation (= steps >= steps_required).
    prediction: as in Prediction, always exact. With ``settle_prediction=False``, -1 where
        the image is not certified and its prediction was not settled when it stopped
        (where ``certified`` is True the prediction is always settled).
    radius: the radius asked (as given); steps_required: the fewest certified steps that
        reach it (``decisions.required_steps``).
    """
    certified: torch.Tensor
    radius: object
    steps_required: int


def variant_order(order, L: int) -> np.ndarray:
    """The order variants are evaluated in, as a permutation of 0..L-1 (int64 array).

    "sequential" (default): 0, 1, ..., L-1. "reversed": L-1, ..., 0. "strided": with
    s = ceil(sqrt(L)), 0, s, 2s, ..., then 1, 1+s, ... (spread over the period). Or a
    permutation of 0..L-1 given as a sequence, numpy array or LongTensor. The answers do
    not depend on the order; the number of variants evaluated may.
    """
    if order is None or (isinstance(order, str) and order == "sequential"):
        return np.arange(L, dtype=np.int64)
    if isinstance(order, str):
        if order == "reversed":
            return np.arange(L - 1, -1, -1, dtype=np.int64)
        if order == "strided":
            s = math.isqrt(L - 1) + 1 if L > 1 else 1
            return np.concatenate([np.arange(r, L, s, dtype=np.int64) for r in range(s)])
        raise ValueError(f"unknown order {order!r}; choose one of {', '.join(ORDERS)} "
                         f"or give a permutation of 0..L-1")
    if isinstance(order, torch.Tensor):
        if order.dtype.is_floating_point or order.dtype == torch.bool or order.is_complex():
            raise TypeError(f"order must hold integers, got {order.dtype}")
        perm = order.detach().cpu().numpy()
    else:
        try:
            perm = np.asarray(order)
        except Exception as exc:  # noqa: BLE001
            raise TypeError(f"order must be a name or a permutation, got {type(order).__name__}") from exc
        if perm.dtype == object or perm.dtype == bool or not np.issubdtype(perm.dtype, np.integer):
            raise TypeError(f"order must be a name ({', '.join(ORDERS)}) or a permutation of "
                            f"0..L-1 of ints, got {type(order).__name__}")
    perm = perm.astype(np.int64).reshape(-1) if perm.ndim == 1 else perm
    if perm.ndim != 1 or perm.shape[0] != L or not np.array_equal(np.sort(perm), np.arange(L)):
        raise ValueError(f"order must be a permutation of 0..L-1 = 0..{L - 1}")
    return perm


def _runs(perm: np.ndarray, pos: int, count: int):
    """Splits perm[pos:pos+count] into runs of consecutive variant indices: (start, n)."""
    seg = perm[pos:pos + count]
    breaks = np.flatnonzero(np.diff(seg) != 1) + 1
    bounds = np.concatenate([[0], breaks, [len(seg)]])
    for a, b in zip(bounds[:-1], bounds[1:]):
        yield int(seg[a]), int(b - a)


def _groups(segments):
    """Merges segments (image, position, count) of consecutive images with the same
    position and count into (first image, number of images, position, count)."""
    out = []
    for b, pos, take in segments:
        if out and out[-1][0] + out[-1][1] == b and out[-1][2:] == (pos, take):
            out[-1] = (out[-1][0], out[-1][1] + 1, pos, take)
        else:
            out.append((b, 1, pos, take))
    return out


def _check_chunk_size(chunk_size):
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")
    return int(chunk_size)


def _check_flag(name, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


class _Run:
    """The shared early-exit loop; ``_status`` and ``_need`` are the decision rule."""

    def __init__(self, model, x, *, sigma, lam, L, q, seed, batch_size, backend, num_classes,
                 margin, order, chunk_size, dtype, channels_last, autocast, cudnn_benchmark):
        self.call = ModelCall(dtype, channels_last, autocast, cudnn_benchmark)
        self.q = q = _check_q(q)
        self.L = L = resolve_num_variants(sigma, lam, q, L)
        check_value_dtype(q, dtype)
        self.batch_size = check_batch_size(batch_size)
        self.margin = check_margin(margin)
        self.chunk_size = _check_chunk_size(chunk_size)
        if num_classes is not None and (isinstance(num_classes, bool)
                                        or not isinstance(num_classes, int) or num_classes < 2):
            raise ValueError(f"num_classes must be None or an int >= 2, got {num_classes!r}")
        self.num_classes = num_classes
        self.perm = variant_order(order, L)
        self.levels, self.backend, self.offsets = prepare_images(x, q, L, seed, backend)
        self.shape = tuple(x.shape[1:])
        self.device = self.levels.device
        self.model = model

    # subclasses: status(counts, amb, m) -> (done, certified, prediction_known) and
    # need(counts, amb, m) -> LongTensor of further variants before a decision can settle

    def run(self):
        B, d = self.levels.shape
        L, device = self.L, self.device
        warn_if_training(self.model)
        evaluated = np.zeros(B, dtype=np.int64)
        looks = np.zeros(B, dtype=np.int64)
        done = np.zeros(B, dtype=bool)
        plan = np.zeros(B, dtype=np.int64)
        # Before any vote the rules depend on K only through K >= 2: look with K = 2.
        zeros = torch.zeros((B, 2), dtype=torch.int64)
        self._look(np.arange(B), zeros, zeros if self.margin > 0 else None,
                   evaluated, looks, done, plan)
        counts = ambiguous = None
        K = self.num_classes
        rows_max = min(self.batch_size, B * L)
        with self.call.session():
            workspace = torch.empty((rows_max, d), dtype=self.call.dtype, device=device)
            nan_rows = torch.zeros(1, dtype=torch.int64, device=device)
            while plan.any():
                # pack this round: planned variants of active images, in image order
                segments, rows = [], 0
                for b in np.flatnonzero(plan):
                    take = int(min(plan[b], rows_max - rows))
                    segments.append((int(b), int(evaluated[b]), take))
                    rows += take
                    if rows == rows_max:
                        break
                image_of_row = np.empty(rows, dtype=np.int64)
                row = 0
                for b, n_img, pos, take in _groups(segments):
                    # n_img consecutive images, each at the same position of the order
                    block = workspace[row:row + n_img * take].view(n_img, take, d)
                    col = 0
                    for start, n in _runs(self.perm, pos, take):
                        out = block[:, col:col + n]
                        if n_img > 1 and n < take:   # expand needs a contiguous [n, count, d]
                            tmp = torch.empty((n_img, n, d), dtype=block.dtype, device=device)
                            expand_into(tmp, self.levels[b:b + n_img], self.offsets, L,
                                        self.q, start, self.backend)
                            out.copy_(tmp)
                        else:
                            expand_into(out, self.levels[b:b + n_img], self.offsets, L,
                                        self.q, start, self.backend)
                        col += n
                    image_of_row[row:row + n_img * take] = np.repeat(
                        np.arange(b, b + n_img), take)
                    row += n_img * take
                logits = self.call(self.model, workspace[:rows].view(rows, *self.shape))
                check_logits(logits, rows, K)
                if counts is None:
                    K = logits.shape[1]
                    counts = torch.zeros((B, K), dtype=torch.int64, device=device)
                    if self.margin > 0:
                        ambiguous = torch.zeros((B, K), dtype=torch.int64, device=device)
                # one vote row per input, then added into its image's counts
                votes = torch.zeros((rows, K), dtype=torch.int64, device=device)
                index = torch.from_numpy(image_of_row).to(device)
                if self.margin > 0:
                    amb = torch.zeros((rows, K), dtype=torch.int64, device=device)
                    vote_margin_into(votes, amb, nan_rows, logits, 0, 1, self.margin,
                                     self.backend)
                    ambiguous.index_add_(0, index, amb)
                else:
                    vote_into(votes, nan_rows, logits, 0, 1, self.backend)
                counts.index_add_(0, index, votes)
                if nan_rows.item():  # the one host sync of the round (with the look)
                    bad = sorted({b for b, _, _ in segments})
                    raise ValueError(f"model returned NaN logits for {nan_rows.item()} "
                                     f"input(s) of image(s) {bad[0]}..{bad[-1]}")
                for b, _, take in segments:
                    evaluated[b] += take
                    plan[b] -= take
                ready = np.array([b for b, _, _ in segments if plan[b] == 0], dtype=np.int64)
                if len(ready):
                    idx = torch.from_numpy(ready).to(device)
                    c = counts.index_select(0, idx).cpu()
                    a = ambiguous.index_select(0, idx).cpu() if ambiguous is not None else None
                    self._look(ready, c, a, evaluated, looks, done, plan)
        if counts is None:  # every image was decided before any variant ran
            K = K or 0      # the model never ran: K unknown unless num_classes was given
            counts = torch.zeros((B, K), dtype=torch.int64, device=device)
            if self.margin > 0:
                ambiguous = torch.zeros((B, K), dtype=torch.int64, device=device)
        return counts, ambiguous, evaluated

    def _look(self, idx, counts, amb, evaluated, looks, done, plan):
        """Checks images idx (their counts on the host): marks the settled ones done and
        plans the next variants of the others."""
        m = torch.from_numpy(self.L - evaluated[idx])
        settled = self.settled(counts, amb, m).numpy()
        need = self.need(counts, amb, m).numpy()
        looks[idx] += 1
        if self.chunk_size is not None:
            step = np.full(len(idx), self.chunk_size, dtype=np.int64)
        else:
            floor = np.where(looks[idx] >= _FLOOR_AFTER_LOOKS,
                             -(-m.numpy() // _FLOOR_FRACTION), 1)
            step = np.maximum(need, floor)
        step = np.minimum(step, m.numpy())
        done[idx] = settled
        plan[idx] = np.where(settled, 0, step)
        assert not np.any((plan[idx] == 0) & ~settled), "unsettled image with no variant left"


class _CertifyRun(_Run):
    def __init__(self, *args, steps, settle_prediction, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps = steps
        self.settle_prediction = settle_prediction

    def settled(self, counts, amb, m):
        yes, no = self._yes_no(counts, amb, m)
        if self.settle_prediction:
            no = no & decisions.prediction_settled(counts, m)
        return yes | no

    def _yes_no(self, counts, amb, m):
        yes = decisions.certified_settled(counts, m, self.steps, amb)
        no = decisions.uncertifiable(counts, m, self.steps, amb)
        return yes, no

    def need(self, counts, amb, m):
        return decisions.more_needed_certify(counts, m, self.steps, amb, self.settle_prediction)


class _PredictRun(_Run):
    def settled(self, counts, amb, m):
        return decisions.prediction_settled(counts, m)

    def need(self, counts, amb, m):
        return decisions.more_needed_predict(counts, m)


_COMMON_DOC = """
    Smoothing: ``sigma``, ``lam`` or ``L`` (exactly one), ``q``, ``seed``, as in
    :func:`dssn_kernels.certify`. ``margin`` (>= 0): variants whose top logit beats the
    runner-up by less than the margin vote for no class (as ``certify(..., margin=)``).
    ``batch_size``: rows of one forward batch (images share it). ``chunk_size``: None
    (default) plans the fewest variants after which a decision could be settled; an int
    evaluates that many variants of an image between looks. ``order``: the order each
    image's variants are evaluated in (:func:`variant_order`). ``backend``,
    ``num_classes``, ``dtype``, ``channels_last``, ``autocast``, ``cudnn_benchmark``: as
    in certify. The answers equal the full evaluation's for every order, chunk size and
    batch size (deterministic model). On a GPU there is one host sync per round.
"""


def certify_at(model, x, radius, *, sigma=None, lam=None, L=None, q=255, seed=0, margin=0.0,
               batch_size=None, backend="auto", num_classes=None, order="sequential",
               chunk_size=None, settle_prediction=True, dtype=torch.float32,
               channels_last=False, autocast=None, cudnn_benchmark=None) -> Decision:
    """Is every image of x certified at the L1 ``radius`` ([0, 1] scale)? Stops evaluating
    an image's variants as soon as no outcome of the rest can change the answer.

    ``certified`` equals ``certify(...).radius >= radius`` of the full evaluation (with the
    comparison done as that float64 comparison; an int or Fraction radius exactly).
    ``prediction`` equals the full evaluation's prediction: by default each image goes on
    until its prediction is settled too (where it is certified it always is). With
    ``settle_prediction=False`` an uncertifiable image stops as soon as that is known, and
    its prediction is -1 unless it was already settled (fewer variants for "is it robust?"
    questions).
    """
    q = _check_q(q)
    steps = decisions.required_steps(radius, q)
    settle_prediction = _check_flag("settle_prediction", settle_prediction)
    run = _CertifyRun(model, x, sigma=sigma, lam=lam, L=L, q=q, seed=seed,
                      batch_size=batch_size, backend=backend, num_classes=num_classes,
                      margin=margin, order=order, chunk_size=chunk_size, dtype=dtype,
                      channels_last=channels_last, autocast=autocast,
                      cudnn_benchmark=cudnn_benchmark, steps=steps,
                      settle_prediction=settle_prediction)
    counts, ambiguous, evaluated = run.run()
    if counts.shape[1]:
        c = counts.cpu()
        a = ambiguous.cpu() if ambiguous is not None else None
    else:  # the model never ran and K is unknown: the rules only need K >= 2
        c = torch.zeros((counts.shape[0], 2), dtype=torch.int64)
        a = torch.zeros_like(c) if ambiguous is not None else None
    m = torch.from_numpy(run.L - evaluated)
    yes, no = run._yes_no(c, a, m)
    known = yes | decisions.prediction_settled(c, m)
    prediction = torch.where(known, decisions.leader(c), torch.full_like(m, -1))
    assert bool((yes | no).all()) and (not settle_prediction or bool(known.all()))
    return Decision(prediction=prediction.to(counts.device),
                    evaluated=torch.from_numpy(evaluated).to(counts.device), counts=counts,
                    ambiguous=ambiguous, num_variants=run.L, q=q, backend=run.backend,
                    margin=run.margin, certified=yes.to(counts.device), radius=radius,
                    steps_required=steps)


def predict(model, x, *, sigma=None, lam=None, L=None, q=255, seed=0, margin=0.0,
            batch_size=None, backend="auto", num_classes=None, order="sequential",
            chunk_size=None, dtype=torch.float32, channels_last=False, autocast=None,
            cudnn_benchmark=None) -> Prediction:
    """The smoothed classifier's prediction for every image of x, stopping an image's
    variants as soon as its leading class cannot be overtaken. Returns a
    :class:`Prediction` (``.prediction`` LongTensor[B] equals ``certify(...).prediction``,
    ``.evaluated`` the variants run per image).
    """
    run = _PredictRun(model, x, sigma=sigma, lam=lam, L=L, q=q, seed=seed,
                      batch_size=batch_size, backend=backend, num_classes=num_classes,
                      margin=margin, order=order, chunk_size=chunk_size, dtype=dtype,
                      channels_last=channels_last, autocast=autocast,
                      cudnn_benchmark=cudnn_benchmark)
    counts, ambiguous, evaluated = run.run()
    c = counts.cpu()
    assert bool(decisions.prediction_settled(c, torch.from_numpy(run.L - evaluated)).all())
    return Prediction(prediction=decisions.leader(c).to(counts.device),
                      evaluated=torch.from_numpy(evaluated).to(counts.device), counts=counts,
                      ambiguous=ambiguous, num_variants=run.L, q=run.q, backend=run.backend,
                      margin=run.margin)


certify_at.__doc__ += _COMMON_DOC
predict.__doc__ += _COMMON_DOC
