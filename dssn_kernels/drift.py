"""How far two evaluations of the same base classifier are apart: ``logit_drift``.

A certificate is exact for the model *as evaluated*. Another evaluation of the same
weights (compiled, bfloat16 autocast, another batch size, another device) moves the
logits a little, and a variant whose two top logits are nearly tied can then vote
differently. ``logit_drift`` runs both evaluations over the very variants a certificate
uses and returns the largest absolute logit difference; ``certify(..., margin=tau)``
with tau > 2 * drift then gives a certificate that holds for both evaluations on these
images (README, "What 'exact' means under floating point"). The drift is measured, not
bounded: it covers the images and variants measured, nothing more.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import checks
from .certify import prepare_images
from .ops import expand_into
from .pipeline import ModelCall, VoteRounds, fill_range
from .spec import check_value_dtype, resolve_num_variants

__all__ = ["LogitDrift", "logit_drift"]

# The evaluation settings ``reference`` and ``other`` may hold.
SETTINGS = ("dtype", "autocast", "channels_last", "compile", "batch_size", "cudnn_benchmark")


@dataclass
class LogitDrift:
    """Result of :func:`logit_drift` over variants start..stop-1 of B images.

    max: the largest absolute difference between a logit of the reference evaluation and
        the same logit of the other one (float, in logit units; computed in float64 from
        the logits as the model returned them, each exactly representable in float64:
        float64 logits are not rounded to float32 first. Equal logits differ by 0, equal
        infinities too, as in the margin rule).
    per_image: float64 [B], the same maximum per image.
    votes_differ: LongTensor [B], variants whose argmax (lowest index on ties) differs
        between the two evaluations.
    variants: variants measured per image (stop - start); num_variants: L.
    margin: the smallest float tau > 2 * max: ``certify(..., margin=tau)`` then gives a
        certificate of these images that holds for both evaluations (for the variants
        measured; with start=0, stop=L that is all of them).
    """
    max: float
    per_image: torch.Tensor
    votes_differ: torch.Tensor
    variants: int
    num_variants: int
    margin: float


def _check_setting(name: str, setting) -> dict:
    if setting is None:
        return {}
    if not isinstance(setting, dict):
        raise TypeError(f"{name} must be a dict of evaluation settings "
                        f"({', '.join(SETTINGS)}), got {type(setting).__name__}")
    checks.check_known_keys(name, setting, SETTINGS, "setting",
                            f"choose from {', '.join(SETTINGS)}")
    return dict(setting)


def _checked_call(setting: dict, q: int) -> tuple[ModelCall, int]:
    """(how the model is called, the forward batch size) of one checked setting dict."""
    call = ModelCall.checked(setting.get("dtype", torch.float32),
                             setting.get("channels_last", False), setting.get("autocast"),
                             setting.get("cudnn_benchmark"), setting.get("compile", False))
    check_value_dtype(q, call.dtype)
    return call, checks.check_batch_size(setting.get("batch_size"))


def _evaluate(model, levels, split, *, L, q, start, n, shape, backend, call: ModelCall,
              batch_size: int) -> torch.Tensor:
    """The logits, as float64 [B * n, K] on the images' device (exact: the vote kernels
    read float64 logits unrounded, so a drift below float32's resolution must not vanish
    here), of variants start..start+n-1
    of every image under one evaluation (call, batch_size): the rounds of certify
    (pipeline.VoteRounds, the same workspace, fill, forward and logit checks), the logits
    kept instead of voted."""
    B = levels.shape[0]
    total, device = B * n, levels.device

    def fill(out, b, t):
        expand_into(out, levels[b:b + out.shape[0]], split, L, q, start + t, backend)

    rounds = VoteRounds(model, shape=shape, rows_max=call.workspace_rows(batch_size, total),
                        num_images=B, backend=backend, device=device, call=call)
    out = None
    with rounds:
        for pos in range(0, total, rounds.rows_max):
            end = min(pos + rounds.rows_max, total)
            logits = rounds.logits(end - pos, fill_range(fill, pos, end, n))
            if out is None:
                out = torch.empty((total, logits.shape[1]), dtype=torch.float64, device=device)
            elif logits.shape[1] != out.shape[1]:
                raise ValueError(f"model returned K={logits.shape[1]} logits, earlier "
                                 f"{out.shape[1]}")
            out[pos:end] = logits.double()
    if bool(torch.isnan(out).any()):
        raise ValueError("model returned NaN logits: no drift can be measured")
    return out


def logit_drift(model, x, *, other: dict, reference: dict | None = None, sigma=None,
                lam=None, L=None, q=255, seed=0, start=0, stop=None,
                backend="auto") -> LogitDrift:
    """The largest absolute logit difference between two evaluations of the base
    classifier ``model`` over variants start..stop-1 (default: all L) of every image in x.

    ``reference`` and ``other`` are evaluation settings, dicts with any of ``dtype``,
    ``autocast``, ``channels_last``, ``compile``, ``batch_size`` (default 256) and
    ``cudnn_benchmark``, meaning what they mean in :func:`certify`; ``reference`` defaults
    to ``{}``, the eager float32 forward. Example: how far compiled bfloat16 autocast is
    from eager float32, and a margin that covers both::

        drift = dk.logit_drift(model, x, sigma=0.5,
                               other=dict(compile=True, autocast=torch.bfloat16))
        cert = dk.certify(model, x, sigma=0.5, margin=drift.margin,
                          compile=True, autocast=torch.bfloat16)

    Every logit of both evaluations is kept ([B * (stop - start), K] float64 each), so
    measure some images at a time. The drift is what these images and variants showed;
    other images, or other variants, may drift more.
    """
    reference = _check_setting("reference", reference)
    other = _check_setting("other", other)
    q = checks.check_q(q)
    # both settings are checked before either evaluation runs
    evaluations = [_checked_call(reference, q), _checked_call(other, q)]
    L = resolve_num_variants(sigma, lam, q, L)
    start, stop = checks.check_variant_range(start, stop, L)
    seed, backend = checks.check_seed(seed), checks.check_backend_name(backend)
    levels, backend, split = prepare_images(x, q, L, seed, backend)
    checks.check_eval_mode(model)
    B, n = levels.shape[0], stop - start
    if B == 0 or n == 0:
        raise ValueError("logit_drift needs at least one image and one variant")
    kw = dict(L=L, q=q, start=start, n=n, shape=tuple(x.shape[1:]), backend=backend)
    a, b = (_evaluate(model, levels, split, call=call, batch_size=batch_size, **kw)
            for call, batch_size in evaluations)
    if a.shape != b.shape:
        raise ValueError(f"the two evaluations return logits of shapes {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    # equal logits (equal infinities too) differ by 0, not inf - inf = NaN; otherwise
    # |a - b| rounded to nearest, which the nextafter below more than covers
    diff = torch.where(a == b, torch.zeros_like(a), (a - b).abs()).view(B, n, -1)
    per_image = diff.amax(dim=(1, 2)).cpu()
    votes_differ = (a.argmax(1) != b.argmax(1)).view(B, n).sum(1).cpu()
    worst = float(per_image.max())
    margin = math.nextafter(2 * worst, math.inf)
    if math.isinf(margin):
        raise ValueError("the two evaluations differ by an infinite logit (or one near the "
                         "float64 limit): no finite margin covers it")
    return LogitDrift(max=worst, per_image=per_image, votes_differ=votes_differ, variants=n,
                      num_variants=L, margin=margin)
