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
from dataclasses import dataclass

import numpy as np
import torch

from . import checks, decisions
from .certify import Smoothing, prepare_images
from .ops import expand_into
from .pipeline import ModelCall, VoteRounds
from .spec import check_value_dtype

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


class _Run:
    """The shared early-exit loop; subclasses give the decision rule:
    ``settled(counts, amb, m)`` -> BoolTensor [n], whether each image's answer can no
    longer change whatever its m remaining variants do, and ``need(counts, amb, m)`` ->
    LongTensor [n], how many more variants each image needs before it could settle
    (decisions.more_needed_*). Takes checked arguments (the entry points check them)."""

    def __init__(self, model, x, smoothing: Smoothing, call: ModelCall, *, perm: np.ndarray,
                 chunk_size: int | None):
        self.s, self.call = smoothing, call
        self.q, self.L, self.margin = smoothing.q, smoothing.L, smoothing.margin
        self.chunk_size, self.perm = chunk_size, perm
        self.levels, self.backend, self.offsets = prepare_images(
            x, smoothing.q, smoothing.L, smoothing.seed, smoothing.backend)
        self.shape = tuple(x.shape[1:])
        self.device = self.levels.device
        self.model = model

    def run(self):
        B, d = self.levels.shape
        L, device = self.L, self.device
        checks.check_eval_mode(self.model)
        evaluated = np.zeros(B, dtype=np.int64)
        looks = np.zeros(B, dtype=np.int64)
        done = np.zeros(B, dtype=bool)
        plan = np.zeros(B, dtype=np.int64)
        # Before any vote the rules depend on K only through K >= 2: look with K = 2.
        zeros = torch.zeros((B, 2), dtype=torch.int64)
        self._look(np.arange(B), zeros, zeros if self.margin > 0 else None,
                   evaluated, looks, done, plan)
        rounds = VoteRounds(self.model, shape=self.shape,
                            rows_max=self.call.workspace_rows(self.s.batch_size, B * L),
                            num_images=B, backend=self.backend, device=device,
                            num_classes=self.s.num_classes, call=self.call, margin=self.margin)
        with rounds:
            while plan.any():
                # pack this round: planned variants of active images, in image order
                segments, rows = [], 0
                for b in np.flatnonzero(plan):
                    take = int(min(plan[b], rounds.rows_max - rows))
                    segments.append((int(b), int(evaluated[b]), take))
                    rows += take
                    if rows == rounds.rows_max:
                        break
                groups = _groups(segments)
                # n_img consecutive images, each at the same position of the order
                image_of_row = np.concatenate([np.repeat(np.arange(b, b + n_img), take)
                                               for b, n_img, _, take in groups])

                def fill(block, groups=groups):
                    row = 0
                    for b, n_img, pos, take in groups:
                        self._fill(block[row:row + n_img * take].view(n_img, take, d),
                                   b, n_img, pos, take)
                        row += n_img * take

                rounds.round(rows, fill, image_of_row=torch.from_numpy(image_of_row).to(device))
                # the one host sync of the round (with the look)
                rounds.raise_if_nan((segments[0][0], segments[-1][0]))
                for b, _, take in segments:
                    evaluated[b] += take
                    plan[b] -= take
                ready = np.array([b for b, _, _ in segments if plan[b] == 0], dtype=np.int64)
                if len(ready):
                    idx = torch.from_numpy(ready).to(device)
                    c = rounds.counts.index_select(0, idx).cpu()
                    a = (rounds.ambiguous.index_select(0, idx).cpu()
                         if rounds.ambiguous is not None else None)
                    self._look(ready, c, a, evaluated, looks, done, plan)
        # the model never ran when every image was decided before any variant: K is then
        # unknown unless num_classes was given (counts [B, 0])
        counts, ambiguous = rounds.result()
        return counts, ambiguous, evaluated

    def _fill(self, block, b: int, n_img: int, pos: int, take: int) -> None:
        """Writes variants perm[pos:pos+take] of images b..b+n_img-1 into block
        [n_img, take, d]."""
        d, col = block.shape[2], 0
        for start, n in _runs(self.perm, pos, take):
            out = block[:, col:col + n]
            if n_img > 1 and n < take:   # expand needs a contiguous [n, count, d]
                tmp = torch.empty((n_img, n, d), dtype=block.dtype, device=block.device)
                expand_into(tmp, self.levels[b:b + n_img], self.offsets, self.L, self.q, start,
                            self.backend)
                out.copy_(tmp)
            else:
                expand_into(out, self.levels[b:b + n_img], self.offsets, self.L, self.q, start,
                            self.backend)
            col += n

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
        yes, no = self.answers(counts, amb, m)
        if self.settle_prediction:
            no = no & decisions.prediction_settled(counts, m)
        return yes | no

    def answers(self, counts, amb, m):
        """(yes, no), BoolTensors [n]: every outcome of the m remaining variants certifies
        the current leader at the radius (decisions.certified_settled), or none certifies
        any class (decisions.uncertifiable). Where neither holds the answer is open."""
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
    ``num_classes``, ``dtype``, ``channels_last``, ``autocast``, ``cudnn_benchmark``,
    ``compile``: as in certify (compiled: every round runs at the workspace's one shape).
    The answers equal the full evaluation's for every order, chunk size and batch size
    (deterministic model). On a GPU there is one host sync per round.
"""


def certify_at(model, x, radius, *, sigma=None, lam=None, L=None, q=255, seed=0, margin=0.0,
               batch_size=None, backend="auto", num_classes=None, order="sequential",
               chunk_size=None, settle_prediction=True, dtype=torch.float32,
               channels_last=False, autocast=None, cudnn_benchmark=None,
               compile=False) -> Decision:
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
    smoothing = Smoothing.checked(sigma=sigma, lam=lam, L=L, q=q, seed=seed, margin=margin,
                                  batch_size=batch_size, backend=backend,
                                  num_classes=num_classes)
    return run_certify_at(model, x, radius, smoothing, order=order, chunk_size=chunk_size,
                          settle_prediction=settle_prediction, dtype=dtype,
                          channels_last=channels_last, autocast=autocast,
                          cudnn_benchmark=cudnn_benchmark, compile=compile)


def _run_options(smoothing: Smoothing, order, chunk_size, dtype, channels_last, autocast,
                 cudnn_benchmark, compile=False):
    """The checked per-call options of certify_at and predict: (call, perm, chunk_size)."""
    call = ModelCall.checked(dtype, channels_last, autocast, cudnn_benchmark, compile)
    check_value_dtype(smoothing.q, call.dtype)
    chunk_size = checks.check_chunk_size(chunk_size)
    return call, variant_order(order, smoothing.L), chunk_size


def run_certify_at(model, x, radius, smoothing: Smoothing, *, order="sequential",
                   chunk_size=None, settle_prediction=True, dtype=torch.float32,
                   channels_last=False, autocast=None, cudnn_benchmark=None,
                   compile=False) -> Decision:
    """certify_at with checked smoothing parameters (certify_at, DSSN.certify_at)."""
    q = smoothing.q
    steps = decisions.required_steps(radius, q)
    settle_prediction = checks.check_flag("settle_prediction", settle_prediction)
    call, perm, chunk_size = _run_options(smoothing, order, chunk_size, dtype, channels_last,
                                          autocast, cudnn_benchmark, compile)
    run = _CertifyRun(model, x, smoothing, call, perm=perm, chunk_size=chunk_size, steps=steps,
                      settle_prediction=settle_prediction)
    counts, ambiguous, evaluated = run.run()
    if counts.shape[1]:
        c = counts.cpu()
        a = ambiguous.cpu() if ambiguous is not None else None
    else:  # the model never ran and K is unknown: the rules only need K >= 2
        c = torch.zeros((counts.shape[0], 2), dtype=torch.int64)
        a = torch.zeros_like(c) if ambiguous is not None else None
    m = torch.from_numpy(run.L - evaluated)
    yes, no = run.answers(c, a, m)
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
            cudnn_benchmark=None, compile=False) -> Prediction:
    """The smoothed classifier's prediction for every image of x, stopping an image's
    variants as soon as its leading class cannot be overtaken. Returns a
    :class:`Prediction` (``.prediction`` LongTensor[B] equals ``certify(...).prediction``,
    ``.evaluated`` the variants run per image).
    """
    smoothing = Smoothing.checked(sigma=sigma, lam=lam, L=L, q=q, seed=seed, margin=margin,
                                  batch_size=batch_size, backend=backend,
                                  num_classes=num_classes)
    return run_predict(model, x, smoothing, order=order, chunk_size=chunk_size, dtype=dtype,
                       channels_last=channels_last, autocast=autocast,
                       cudnn_benchmark=cudnn_benchmark, compile=compile)


def run_predict(model, x, smoothing: Smoothing, *, order="sequential", chunk_size=None,
                dtype=torch.float32, channels_last=False, autocast=None,
                cudnn_benchmark=None, compile=False) -> Prediction:
    """predict with checked smoothing parameters (predict, DSSN.predict)."""
    call, perm, chunk_size = _run_options(smoothing, order, chunk_size, dtype, channels_last,
                                          autocast, cudnn_benchmark, compile)
    run = _PredictRun(model, x, smoothing, call, perm=perm, chunk_size=chunk_size)
    counts, ambiguous, evaluated = run.run()
    c = counts.cpu()
    assert bool(decisions.prediction_settled(c, torch.from_numpy(run.L - evaluated)).all())
    return Prediction(prediction=decisions.leader(c).to(counts.device),
                      evaluated=torch.from_numpy(evaluated).to(counts.device), counts=counts,
                      ambiguous=ambiguous, num_variants=run.L, q=run.q, backend=run.backend,
                      margin=run.margin)


certify_at.__doc__ += _COMMON_DOC
predict.__doc__ += _COMMON_DOC
