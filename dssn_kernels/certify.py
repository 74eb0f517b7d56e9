"""The certification pipeline: expand variants chunk by chunk into one reused
workspace, run the model, fold its argmax votes into int64 counts, derive the exact
certificate (DESIGN.md, "Certificate")."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .backends import resolve_backend
from .inputs import to_levels
from .ops import expand_into
from .pipeline import ModelCall, check_batch_size, run_votes, warn_if_training
from .spec import _check_q, check_value_dtype, resolve_num_variants, split_offsets


@dataclass
class Certificate:
    """Exact DSSN certificate of a batch.

    prediction: LongTensor[B], the smoothed classifier's class (top vote count, lowest
        index on ties). radius: float64 Tensor[B], certified L1 radius on the [0, 1]
        scale (= steps / q): every quantized x' with ||x' - x||_1 <= radius gets the same
        prediction. steps: LongTensor[B], the radius in quantization steps. counts:
        LongTensor[B, K], votes of the L variants (each row sums to L). num_variants: L;
        q: the quantization; backend: the backend that ran.
    """
    prediction: torch.Tensor
    radius: torch.Tensor
    steps: torch.Tensor
    counts: torch.Tensor
    num_variants: int
    q: int
    backend: str | None = None


def certified_steps(counts: torch.Tensor):
    """(prediction A, steps r): A = argmax N (lowest index on ties), B = runner-up among
    c != A (lowest index on ties), r = floor((N_A - N_B - [B < A]) / 2)."""
    rows = torch.arange(counts.shape[0], device=counts.device)
    top = counts.argmax(dim=1)
    others = counts.clone()
    others[rows, top] = -1
    runner = others.argmax(dim=1)
    margin = counts[rows, top] - counts[rows, runner] - (runner < top).long()
    return top, torch.div(margin, 2, rounding_mode="floor")


def _check_counts(counts) -> torch.Tensor:
    if not isinstance(counts, torch.Tensor):
        raise TypeError(f"counts must be a torch.Tensor [B, K], got {type(counts).__name__}")
    if counts.dim() != 2 or counts.dtype.is_floating_point or counts.dtype == torch.bool:
        raise ValueError(f"counts must be an integer [B, K] tensor, got {counts.dtype} "
                         f"of shape {tuple(counts.shape)}")
    if counts.shape[1] < 2:
        raise ValueError(f"counts need at least 2 classes, got K={counts.shape[1]}")
    counts = counts.long()
    if counts.numel() and bool((counts < 0).any()):
        raise ValueError("counts must be non-negative")
    return counts


def certificate_from_counts(counts, q):
    """(prediction LongTensor[B], radius float64 Tensor[B]) from vote counts [B, K]."""
    counts = _check_counts(counts)
    q = _check_q(q)
    prediction, steps = certified_steps(counts)
    return prediction, steps.double() / q


def certify(model, x, *, sigma=None, lam=None, L=None, q=255, seed=0, batch_size=None,
            backend="auto", num_classes=None, progress=False, dtype=torch.float32,
            channels_last=False, autocast=None, cudnn_benchmark=None) -> Certificate:
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
    """
    call = ModelCall(dtype, channels_last, autocast, cudnn_benchmark)
    L = resolve_num_variants(sigma, lam, q, L)
    check_value_dtype(q, dtype)
    batch_size = check_batch_size(batch_size)
    levels = to_levels(x, q)
    backend = resolve_backend(backend, levels.device)
    warn_if_training(model)
    B, d = levels.shape
    offsets = split_offsets(d, L, seed).to(device=levels.device, dtype=torch.int32)

    def fill(out, b, t):
        expand_into(out, levels[b:b + out.shape[0]], offsets, L, q, t, backend)

    counts = run_votes(model, fill, num_images=B, per_image=L, shape=tuple(x.shape[1:]),
                       batch_size=batch_size, backend=backend, device=levels.device,
                       num_classes=num_classes, progress=progress, call=call)
    prediction, steps = certified_steps(counts)
    return Certificate(prediction=prediction, radius=steps.double() / q, steps=steps,
                       counts=counts, num_variants=L, q=q, backend=backend)


def variants(x, *, sigma=None, lam=None, L=None, q=255, seed=0, start=0, stop=None,
             backend="auto", dtype=torch.float32) -> torch.Tensor:
    """Variants start..stop-1 of every image: [B, stop-start, *x.shape[1:]] of ``dtype``
    (float32 by default; float16/bfloat16 allowed). Every backend returns the same bits:
    the value of the dtype nearest to m/(4q)."""
    L = resolve_num_variants(sigma, lam, q, L)
    check_value_dtype(q, dtype)
    stop = L if stop is None else stop
    for name, value in (("start", start), ("stop", stop)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= start <= stop <= L:
        raise ValueError(f"need 0 <= start <= stop <= L = {L}, got start={start}, stop={stop}")
    levels = to_levels(x, q)
    backend = resolve_backend(backend, levels.device)
    B, d = levels.shape
    offsets = split_offsets(d, L, seed).to(device=levels.device, dtype=torch.int32)
    out = torch.empty((B, stop - start, d), dtype=dtype, device=levels.device)
    expand_into(out, levels, offsets, L, q, start, backend)
    return out.view(B, stop - start, *x.shape[1:])
