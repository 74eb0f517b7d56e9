"""The certification pipeline: expand variants chunk by chunk into one reused
workspace, run the model, fold its argmax votes into int64 counts, derive the exact
certificate (docs/DESIGN.md, "The certificate")."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import checks
from .backends import resolve_backend
from .decisions import certified_steps
from .inputs import to_levels
from .ops import expand_into
from .pipeline import ModelCall, run_votes
from .spec import check_value_dtype, offsets, resolve_num_variants


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


def certificate_from_counts(counts, q, *, ambiguous=None):
    """(prediction LongTensor[B], radius float64 Tensor[B]) from vote counts [B, K].

    ``ambiguous`` [B, K] (optional): the per-class ambiguous counts of a margin vote
    (Certificate.ambiguous); the radius is then -1/q where not certified."""
    counts = checks.check_counts(counts)
    q = checks.check_q(q)
    if ambiguous is not None:
        ambiguous = checks.check_counts(ambiguous, "ambiguous")
        if ambiguous.shape != counts.shape:
            raise ValueError(f"ambiguous {tuple(ambiguous.shape)} must be shaped like counts "
                             f"{tuple(counts.shape)}")
        ambiguous = ambiguous.to(counts.device)
    prediction, steps = certified_steps(counts, ambiguous)
    return prediction, steps.double() / q


@dataclass(frozen=True)
class Smoothing:
    """The checked parameters of a smoothed classifier and how it runs, shared by the
    entry points (certify, certify_at, predict, DSSN): L variants at quantization q with
    split seed ``seed``, the vote ``margin``, the forward ``batch_size``, the backend name
    (resolved for the images' device when they arrive) and K (None: whatever the model
    returns). Build it with ``Smoothing.checked``."""
    L: int
    q: int
    seed: int
    margin: float = 0.0
    batch_size: int = checks.DEFAULT_BATCH_SIZE
    backend: str = "auto"
    num_classes: int | None = None

    @classmethod
    def checked(cls, *, sigma=None, lam=None, L=None, q=255, seed=0, margin=0.0,
                batch_size=None, backend="auto", num_classes=None,
                require_num_classes=False) -> "Smoothing":
        """Checks every argument (checks.py; sigma, lam, L: spec.resolve_num_variants)."""
        margin = checks.check_margin(margin)
        q = checks.check_q(q)
        L = resolve_num_variants(sigma, lam, q, L)
        return cls(L=L, q=q, seed=checks.check_seed(seed), margin=margin,
                   batch_size=checks.check_batch_size(batch_size),
                   backend=checks.check_backend_name(backend),
                   num_classes=checks.check_num_classes(num_classes,
                                                        required=require_num_classes))


def prepare_images(x, q: int, L: int, seed: int, backend: str):
    """(levels [B, d] on x's device, the concrete backend, int32 split offsets [d] on that
    device): what every expansion of x's variants needs. Checks the images x (to_levels)
    and whether the backend runs on their device; q, L, seed and the backend name are
    checked already."""
    levels = to_levels(x, q)
    backend = resolve_backend(backend, levels.device)
    split = offsets(levels.shape[1], L, seed).to(device=levels.device, dtype=torch.int32)
    return levels, backend, split


def certify(model, x, *, sigma=None, lam=None, L=None, q=255, seed=0, batch_size=None,
            backend="auto", num_classes=None, progress=False, dtype=torch.float32,
            channels_last=False, autocast=None, cudnn_benchmark=None,
            margin=0.0, compile=False) -> Certificate:
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

    ``compile`` (False): True, a ``torch.compile`` mode string or a dict of its arguments
    (mode, backend, options, fullgraph; checks.check_compile) compiles the model once for
    the workspace's static shape [batch_size, ...] and runs every forward at that shape:
    the last partial batch is padded and the padded rows never vote. The compiled model is
    cached for the life of ``model``, so later calls at the same batch size, dtype and
    autocast compile nothing. True means "reduce-overhead" (CUDA graphs) on CUDA, the
    default mode elsewhere. The votes are those of the compiled model (dk.logit_drift
    measures how far its logits are from the eager ones).

    ``margin`` tau >= 0 (0: off): votes that survive floating-point differences. A
    variant whose top logit beats the runner-up by less than tau is ambiguous and counted
    adversarially (see Certificate); the certificate then holds for every evaluation of
    the model whose logits are within tau/2 of this one's (another batch size, GPU, TF32,
    autocast...). README, "What 'exact' means under floating point".
    """
    smoothing = Smoothing.checked(sigma=sigma, lam=lam, L=L, q=q, seed=seed, margin=margin,
                                  batch_size=batch_size, backend=backend,
                                  num_classes=num_classes)
    return run_certify(model, x, smoothing, progress=progress, dtype=dtype,
                       channels_last=channels_last, autocast=autocast,
                       cudnn_benchmark=cudnn_benchmark, compile=compile)


def run_certify(model, x, smoothing: Smoothing, *, progress=False, dtype=torch.float32,
                channels_last=False, autocast=None, cudnn_benchmark=None,
                compile=False) -> Certificate:
    """certify with checked smoothing parameters (certify, DSSN.certify); checks the
    images, the model-call options and the model's mode, then runs."""
    s = smoothing
    call = ModelCall.checked(dtype, channels_last, autocast, cudnn_benchmark, compile)
    check_value_dtype(s.q, call.dtype)
    levels, backend, split = prepare_images(x, s.q, s.L, s.seed, s.backend)
    checks.check_eval_mode(model)
    B, L, q = levels.shape[0], s.L, s.q

    def fill(out, b, t):
        expand_into(out, levels[b:b + out.shape[0]], split, L, q, t, backend)

    counts, ambiguous = run_votes(
        model, fill, num_images=B, per_image=L, shape=tuple(x.shape[1:]),
        batch_size=s.batch_size, backend=backend, device=levels.device,
        num_classes=s.num_classes, progress=progress, call=call, margin=s.margin,
        return_ambiguous=True)
    num_ambiguous = L - counts.sum(dim=1)        # every variant votes or is ambiguous
    prediction, steps = certified_steps(counts, ambiguous if s.margin > 0 else None)
    return Certificate(prediction=prediction, radius=steps.double() / q, steps=steps,
                       counts=counts, num_variants=L, q=q, backend=backend,
                       ambiguous=ambiguous, num_ambiguous=num_ambiguous, margin=s.margin)


def variants(x, *, sigma=None, lam=None, L=None, q=255, seed=0, start=0, stop=None,
             backend="auto", dtype=torch.float32) -> torch.Tensor:
    """Variants start..stop-1 of every image: [B, stop-start, *x.shape[1:]] of ``dtype``
    (float32 by default; float16/bfloat16 allowed). Every backend returns the same bits:
    the value of the dtype nearest to m/(4q)."""
    q = checks.check_q(q)
    L = resolve_num_variants(sigma, lam, q, L)
    check_value_dtype(q, dtype)
    start, stop = checks.check_variant_range(start, stop, L)
    seed, backend = checks.check_seed(seed), checks.check_backend_name(backend)
    levels, backend, split = prepare_images(x, q, L, seed, backend)
    B, d = levels.shape
    out = torch.empty((B, stop - start, d), dtype=dtype, device=levels.device)
    expand_into(out, levels, split, L, q, start, backend)
    return out.view(B, stop - start, *x.shape[1:])
