"""Input validation: images on the k/q grid -> integer levels k, before any work."""
from __future__ import annotations

import torch

# A float pixel x is read as level k = round(x*q) and accepted when |x*q - k| is at most
# GRID_TOLERANCE_STEPS quantization steps, or, for dtypes too coarse to hold k/q that
# closely, 4 eps |x| (2 to 4 units in the last place of x's dtype at x: a correctly
# rounded k/q is within half of one, and the slack admits x * (1/q) and the like), never
# more than 0.25 of a step. A pixel where x's dtype spaces its values more than one step
# apart is refused whatever its offset (value_spacing): two levels can round to the same
# value there, so the level read could be a neighbour of the one the pixel came from.
GRID_TOLERANCE_STEPS = 1e-3


def grid_tolerance(values: torch.Tensor, dtype: torch.dtype, q: int) -> torch.Tensor:
    """Per pixel, the accepted |x*q - round(x*q)| in steps; ``values``: the pixels as
    float64, ``dtype``: the dtype they came in."""
    ulp_steps = 4 * torch.finfo(dtype).eps * q * values.abs()
    return ulp_steps.clamp(min=GRID_TOLERANCE_STEPS, max=0.25)


def value_spacing(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per pixel, the spacing of ``dtype``'s values at each pixel (``values``: the pixels
    as float64, in [0, 1]): the gap to the next value above, except at 1, the top pixel,
    where the levels lie below it and the gap below counts."""
    info = torch.finfo(dtype)
    mantissa, exponent = torch.frexp(values)        # values = mantissa * 2**exponent
    exponent = torch.where(values >= 1, exponent - 1, exponent)
    spacing = info.eps * torch.pow(2.0, (exponent - 1).to(torch.float64))
    spacing = torch.where(values == 0, 0.0, spacing)  # frexp(0) = (0, 0): not [1/2, 1)
    return spacing.clamp(min=info.eps * info.tiny)   # subnormals (and 0)


def level_dtype(q: int) -> torch.dtype:
    """The integer dtype the kernels read levels in: uint8 when it holds 0..q."""
    return torch.uint8 if q <= 255 else torch.int32


def to_levels(x, q: int) -> torch.Tensor:
    """Validates a batch ``x`` of shape [B, ...] and returns its levels as a contiguous
    [B, d] integer tensor (uint8 when q <= 255, else int32) on x's device.

    ``x`` is either an integer tensor holding the levels k in 0..q (uint8 needs q <= 255),
    or a float tensor holding k/q. Raises TypeError/ValueError naming the problem.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape [B, ...], got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"x must have shape [B, ...] with at least one pixel per image, "
                         f"got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x[0].numel() == 0:
        raise ValueError(f"x must hold at least one image of at least one pixel, "
                         f"got shape {tuple(x.shape)}")
    flat = x.reshape(x.shape[0], -1)
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"x must be uint8 levels or float pixels, got dtype {x.dtype}")
    if not x.is_floating_point():
        if x.dtype == torch.uint8 and q > 255:
            raise ValueError(f"uint8 input holds levels 0..255, so q must be <= 255 (got q={q}); "
                             "pass a wider integer dtype or float pixels")
        if x.dtype in (torch.uint16, torch.uint32, torch.uint64):
            # torch's reductions skip these unsigned types: read them as int64 (a uint64
            # level of 2**63 or more turns negative there, still outside 0..q)
            flat = flat.view(torch.int64) if x.dtype == torch.uint64 else flat.long()
        lo, hi = flat.min().item(), flat.max().item()
        if lo < 0 or hi > q:
            bad = ((flat < 0) | (flat > q)).sum().item()
            seen = ("max >= 2**63" if x.dtype == torch.uint64 and lo < 0
                    else f"min {lo}, max {hi}")
            raise ValueError(f"integer input holds levels k in 0..q={q}, but {bad} pixel(s) "
                             f"are outside ({seen})")
        return flat.to(level_dtype(q)).contiguous()
    xd = flat.double()
    finite = torch.isfinite(xd)
    if not bool(finite.all()):
        nan = torch.isnan(xd).sum().item()
        inf = (~finite).sum().item() - nan
        raise ValueError(f"x holds {nan} NaN and {inf} infinite pixel(s)")
    lo, hi = xd.min().item(), xd.max().item()
    if lo < 0 or hi > 1:
        bad = ((xd < 0) | (xd > 1)).sum().item()
        raise ValueError(f"float pixels must lie in [0, 1], but {bad} are outside "
                         f"(min {lo:.6g}, max {hi:.6g})")
    # Where the dtype spaces its values more than one step 1/q apart, two levels can round
    # to the same pixel value and the tolerance below would read some pixels as a
    # neighbouring level, silently (bfloat16 at q = 511, float16 at q = 4095): refuse them.
    # The widest spacing on [0, 1] is eps/2 (on [1/2, 1]): only a dtype and q where that
    # exceeds a step can hold such pixels (never float32 or float64 at a valid q).
    if torch.finfo(x.dtype).eps / 2 * q > 1:
        steps = value_spacing(xd, x.dtype) * q
        coarse = steps > 1
        if bool(coarse.any()):
            bad = coarse.sum().item()
            worst = (xd * coarse).argmax().item()
            raise ValueError(
                f"{bad} {x.dtype} pixel(s) cannot hold their level for q={q}: at "
                f"{xd.view(-1)[worst].item():.9g} {x.dtype} spaces its values "
                f"{steps.view(-1)[worst].item():.3g} steps apart, so neighbouring levels k/q "
                "round to the same value; pass uint8/integer levels or float32 pixels")
    scaled = xd * q
    k = torch.round(scaled)
    off = (scaled - k).abs()
    tol = grid_tolerance(xd, x.dtype, q)
    if bool((off > tol).any()):
        bad = (off > tol).sum().item()
        worst = off.argmax().item()
        raise ValueError(
            f"{bad} float pixel(s) are off the k/q grid for q={q} (e.g. {xd.view(-1)[worst].item():.9g}"
            f" = {scaled.view(-1)[worst].item():.6g}/q); quantize the input or pass the right q"
            + (f" ({x.dtype} cannot hold every k/{q} that closely: pass uint8 levels or "
               "float32 pixels)" if x.dtype in (torch.float16, torch.bfloat16) else ""))
    return k.to(level_dtype(q)).contiguous()
