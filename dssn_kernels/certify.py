"""The certification pipeline: expand variants chunk by chunk into one reused
workspace, run the model, fold its argmax votes into int64 counts, derive the exact
certificate (docs/DESIGN.md, "The certificate")."""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from .backends import resolve_backend
from .inputs import to_levels
from .ops import check_margin, expand_into
from .pipeline import ModelCall, check_batch_size, run_votes, warn_if_training
from .spec import _check_q, check_value_dtype, resolve_num_variants, split_offsets


@dataclass
class Certificate:
    """Exact DSSN certificate of a batch.

    prediction: LongTensor[B], the smoothed classifier's class (top vote count, lowest
        index on ties). radius: float64 Tensor[B], certified L1 radius on the [0, 1]
        scale (= steps / q): every quantized x' with ||x' - x||_1 <= radius gets the same
        prediction. steps: LongTensor[B], the radius in quantization steps. counts:
        LongTensor[B, K], votes of the L variants (each row sums to L when margin = 0).
        num_variants: L; q: the quantization; backend: the backend that ran.

    With a margin tau > 0 (``certify(..., margin=tau)``; README, "What 'exact' means under
    floating point"): a variant whose top logit beats the runner-up by less than tau is
    ambiguous. It is in no class's ``counts``; ``ambiguous[b, c]`` counts the ambiguous
    variants that class c could win when every logit moves by less than tau/2 (an
    ambiguous variant is in at least two classes), ``num_ambiguous[b]`` the ambiguous
    variants themselves, so ``counts[b].sum() + num_ambiguous[b] == L``. ``prediction``
    is the argmax of ``counts`` and ``steps`` the largest r with, for every c != A,
    ``N_A - (N_c + ambiguous_c) - [c < A] >= 2r``: the prediction then holds for every
    quantized x' within the radius and for every evaluation of the model whose logits
    are each within (strictly) tau/2 of the certifying one's. If even r = 0 fails the
    prediction is not certified: steps = -1 and radius = -1/q (negative means "not
    certified", which only happens with a margin). With tau = 0, ambiguous and
    num_ambiguous are zero and everything is as without a margin.
    """
    prediction: torch.Tensor
    radius: torch.Tensor
    steps: torch.Tensor
    counts: torch.Tensor
    num_variants: int
    q: int
    backend: str | None = None
    ambiguous: torch.Tensor | None = None
    num_ambiguous: torch.Tensor | None = None
    margin: float = 0.0

    def __post_init__(self):
        if self.ambiguous is None:
            self.ambiguous = torch.zeros_like(self.counts)
        if self.num_ambiguous is None:
            self.num_ambiguous = torch.zeros(self.counts.shape[0], dtype=torch.int64,
                                             device=self.counts.device)


def certified_steps(counts: torch.Tensor, ambiguous: torch.Tensor | None = None):
    """(prediction A, steps r): A = argmax N (lowest index on ties) and
    r = floor(min over c != A of (N_A - (N_c + amb_c) - [c < A]) / 2), or -1 (not
    certified) when that minimum is negative. Without ambiguous counts (amb = 0) this is
    floor((N_A - N_B - [B < A]) / 2) for the runner-up B, never negative."""
    rows = torch.arange(counts.shape[0], device=counts.device)
    top = counts.argmax(dim=1)
    rival = counts if ambiguous is None else counts + ambiguous
    before = torch.arange(counts.shape[1], device=counts.device)[None, :] < top[:, None]
    slack = counts[rows, top][:, None] - rival - before.long()
    slack[rows, top] = torch.iinfo(torch.int64).max
    steps = torch.div(slack.min(dim=1).values, 2, rounding_mode="floor")
    return top, steps.clamp(min=-1)


def _check_counts(counts, name="counts") -> torch.Tensor:
    if not isinstance(counts, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [B, K], got {type(counts).__name__}")
    if counts.dim() != 2 or counts.dtype.is_floating_point or counts.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer [B, K] tensor, got {counts.dtype} "
                         f"of shape {tuple(counts.shape)}")
    if counts.shape[1] < 2:
        raise ValueError(f"{name} need at least 2 classes, got K={counts.shape[1]}")
    counts = counts.long()
    if counts.numel() and bool((counts < 0).any()):
        raise ValueError(f"{name} must be non-negative")
    return counts


def certificate_from_counts(counts, q, *, ambiguous=None):
    """(prediction LongTensor[B], radius float64 Tensor[B]) from vote counts [B, K].

    ``ambiguous`` [B, K] (optional): the per-class ambiguous counts of a margin vote
    (Certificate.ambiguous); the radius is then -1/q where not certified."""
    counts = _check_counts(counts)
    q = _check_q(q)
    if ambiguous is not None:
        ambiguous = _check_counts(ambiguous, "ambiguous")
        if ambiguous.shape != counts.shape:
            raise ValueError(f"ambiguous {tuple(ambiguous.shape)} must be shaped like counts "
                             f"{tuple(counts.shape)}")
        ambiguous = ambiguous.to(counts.device)
    prediction, steps = certified_steps(counts, ambiguous)
    return prediction, steps.double() / q


def prepare_images(x, q: int, L: int, seed, backend: str):
    """(levels [B, d] on x's device, the concrete backend, int32 split offsets [d] on that
    device): the checked inputs every expansion of x's variants needs."""
    levels = to_levels(x, q)
    backend = resolve_backend(backend, levels.device)
    offsets = split_offsets(levels.shape[1], L, seed).to(device=levels.device,
                                                          dtype=torch.int32)
    return levels, backend, offsets


def certify(model, x, *, sigma=None, lam=None, L=None, q=255, seed=0, batch_size=None,
            backend="auto", num_classes=None, progress=False, dtype=torch.float32,
            channels_last=False, autocast=None, cudnn_benchmark=None,
            margin=0.0) -> Certificate:
    """Exact DSSN certificate of every image in x for the base classifier ``model``.

    model maps float32 [N, *x.shape[1:]] in [0, 1] to logits [N, K]. x is float on the
    k/q grid or integer levels (uint8 for q <= 255). The L = int(2*lambda*q) variants of
    the images are expanded chunk by chunk into one workspace of ``batch_size`` inputs
    (the model's forward batch; images share a forward when L is small), so peak memory
    does not depend on L.

    Model-call options (mostly for GPUs): ``dtype`` of the model input (float16/bfloat16
    for half models), ``channels_last``, ``autocast`` (torch.float16/bfloat16: run the
    model under torch.autocast), ``cudnn_benchmark``. The certificate is exact for the
    base classifier as evaluated, in whatever precision it was evaluated.

    ``margin`` tau >= 0 (0: off): votes that survive floating-point differences. A
    variant whose top logit beats the runner-up by less than tau is ambiguous and counted
    adversarially (see Certificate); the certificate then holds for every evaluation of
    the model whose logits are within tau/2 of this one's (another batch size, GPU, TF32,
    autocast...). README, "What 'exact' means under floating point".
    """
    margin = check_margin(margin)
    call = ModelCall(dtype, channels_last, autocast, cudnn_benchmark)
    L = resolve_num_variants(sigma, lam, q, L)
    check_value_dtype(q, dtype)
    batch_size = check_batch_size(batch_size)
    levels, backend, offsets = prepare_images(x, q, L, seed, backend)
    warn_if_training(model)
    B = levels.shape[0]

    def fill(out, b, t):
        expand_into(out, levels[b:b + out.shape[0]], offsets, L, q, t, backend)

    counts, ambiguous = run_votes(
        model, fill, num_images=B, per_image=L, shape=tuple(x.shape[1:]),
        batch_size=batch_size, backend=backend, device=levels.device,
        num_classes=num_classes, progress=progress, call=call, margin=margin,
        return_ambiguous=True)
    num_ambiguous = L - counts.sum(dim=1)        # every variant votes or is ambiguous
    prediction, steps = certified_steps(counts, ambiguous if margin > 0 else None)
    return Certificate(prediction=prediction, radius=steps.double() / q, steps=steps,
                       counts=counts, num_variants=L, q=q, backend=backend,
                       ambiguous=ambiguous, num_ambiguous=num_ambiguous, margin=margin)


def variants(x, *, sigma=None, lam=None, L=None, q=255, seed=0, start=0, stop=None,
             backend="auto", dtype=torch.float32) -> torch.Tensor:
    """Variants start..stop-1 of every image: [B, stop-start, *x.shape[1:]] of ``dtype``
    (float32 by default; float16/bfloat16 allowed). Every backend returns the same bits:
    the value of the dtype nearest to m/(4q)."""
    L = resolve_num_variants(sigma, lam, q, L)
    check_value_dtype(q, dtype)
    stop = L if stop is None else stop
    for name, value in (("start", start), ("stop", stop)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    start, stop = int(start), int(stop)
    if not 0 <= start <= stop <= L:
        raise ValueError(f"need 0 <= start <= stop <= L = {L}, got start={start}, stop={stop}")
    levels, backend, offsets = prepare_images(x, q, L, seed, backend)
    B, d = levels.shape
    out = torch.empty((B, stop - start, d), dtype=dtype, device=levels.device)
    expand_into(out, levels, offsets, L, q, start, backend)
    return out.view(B, stop - start, *x.shape[1:])
