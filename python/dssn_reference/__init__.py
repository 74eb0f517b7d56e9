"""dssn_reference: Deterministic Smoothing with Splitting Noise, written literally from
Levine & Feizi (ICML 2021), slowly and in exact rational arithmetic.

This is the oracle every backend of dssn_kernels is compared against, bit for bit. It
shares no code with dssn_kernels. Equation numbers refer to the paper (Levine & Feizi,
"Improved, Deterministic Smoothing for L1 Certified Robustness", ICML 2021; restated in
docs/DESIGN.md, "The integer form of the noise"):

* Corollary 1, general case (eqs. 46-48): with split points s_i on the half-steps,
      x~_i = [ min(2λ ceil((x_i - s_i)/(2λ)) + s_i, 1)
             + max(2λ ceil((x_i - s_i)/(2λ) - 1) + s_i, 0) ] / 2
* Derandomization (eqs. 17-18): a fixed offset vector v in [0, 2λ - 1/q]_(q) and one
  scalar s_base in [0, 2λ - 1/q]_(q) + 1/(2q); s_i = (s_base + v_i) mod 2λ. The 2λq values
  of s_base give the 2λq variants; the smoothed classifier is their majority vote.
* Section 4.1: 2λ must be a multiple of 1/q; λ' = floor(2λq)/(2q) is used.
"""
from __future__ import annotations

import math
from fractions import Fraction
from functools import lru_cache

import numpy as np
import torch

__all__ = ["num_variants", "split_offsets", "variants", "certify", "Certificate",
           "noised_pixel", "nearest_in_format", "margin_vote"]


def num_variants(sigma=None, *, lam=None, q=255) -> int:
    """2λ'q = floor(2λq), where the released code maps sigma to λ = sigma * sqrt(3)
    (the standard deviation of U(-λ, λ) is λ/sqrt(3)), written lam = sigma / 3**-0.5."""
    if (sigma is None) == (lam is None):
        raise ValueError("give exactly one of sigma and lam")
    if lam is None:
        lam = sigma / 3 ** -0.5
    L = int(2 * lam * q)
    if L < 1:
        raise ValueError(f"lambda={lam} gives no variant at q={q}")
    return L


def split_offsets(dim, num_variants, seed=0) -> torch.Tensor:
    """v_i * q: the offsets chosen pseudorandomly when the classifier is trained (Sec. 4.1),
    drawn as the released code does."""
    return torch.from_numpy(np.random.RandomState(seed).randint(num_variants, size=dim))


def noised_pixel(x: Fraction, s: Fraction, two_lam: Fraction) -> Fraction:
    """Equations 47-48 (the interval of the split containing x, and its midpoint)."""
    upper = min(two_lam * math.ceil((x - s) / two_lam) + s, Fraction(1))
    lower = max(two_lam * math.ceil((x - s) / two_lam - 1) + s, Fraction(0))
    return (upper + lower) / 2


# significand bits (with the implicit one) of the formats a variant can be stored in
_SIGNIFICAND_BITS = {torch.float32: 24, torch.float16: 11, torch.bfloat16: 8}


def nearest_in_format(value: Fraction, significand_bits: int) -> Fraction:
    """The number with ``significand_bits`` significant bits nearest to value in [0, 1]
    (ties to even), computed exactly: the rounding of IEEE formats in their normal range
    (a variant is 0 or at least 1/(4q), well inside it)."""
    if value == 0:
        return Fraction(0)
    e = math.floor(math.log2(value))
    while Fraction(2) ** e > value:
        e -= 1
    while Fraction(2) ** (e + 1) <= value:
        e += 1
    ulp = Fraction(2) ** (e - significand_bits + 1)
    return round(value / ulp) * ulp      # Fraction.__round__ rounds half to even


@lru_cache(maxsize=None)
def _noised_pixel_in(k: int, v: int, t: int, L: int, q: int, dtype) -> float:
    two_lam = Fraction(L, q)                                  # 2λ', a multiple of 1/q
    s_base = Fraction(t, q) + Fraction(1, 2 * q)              # eq. 17, the t-th value
    s = (s_base + Fraction(v, q)) % two_lam                   # eq. 18
    exact = noised_pixel(Fraction(k, q), s, two_lam)
    return float(nearest_in_format(exact, _SIGNIFICAND_BITS[dtype]))  # exact in float64


def _levels(x: torch.Tensor, q: int) -> np.ndarray:
    """Quantized input as integers k with x = k/q, flattened per sample, C order."""
    a = x.detach().cpu().reshape(x.shape[0], -1)
    if a.is_floating_point():
        k = torch.round(a.double() * q)
        if bool(((a.double() * q - k).abs() > 1e-3).any()) or bool(((k < 0) | (k > q)).any()):
            raise ValueError("input is not on the k/q grid in [0, 1]")
        return k.long().numpy()
    k = a.long().numpy()
    if (k < 0).any() or (k > q).any():
        raise ValueError("levels outside 0..q")
    return k


def _resolve(sigma, lam, L, q):
    return L if L is not None else num_variants(sigma, lam=lam, q=q)


def variants(x, *, sigma=None, lam=None, L=None, q=255, seed=0, start=0, stop=None,
             backend="auto", dtype=torch.float32) -> torch.Tensor:
    """Variants t = start..stop-1 of every image: [B, stop-start, *x.shape[1:]] holding the
    value of ``dtype`` (float32, float16, bfloat16) nearest to each noised pixel.
    ``backend`` is accepted for signature compatibility and ignored."""
    L = _resolve(sigma, lam, L, q)
    stop = L if stop is None else stop
    k = _levels(x, q)
    B, d = k.shape
    v = split_offsets(d, L, seed).numpy()
    out = np.empty((B, stop - start, d), dtype=np.float64)
    for b in range(B):
        for t in range(start, stop):
            for i in range(d):
                out[b, t - start, i] = _noised_pixel_in(int(k[b, i]), int(v[i]), t, L, q, dtype)
    # each value is exactly representable in dtype, so this conversion is exact
    return torch.from_numpy(out).to(dtype).view(B, stop - start, *x.shape[1:])


def _gap_below(top: float, z: float, tau: Fraction) -> bool:
    """Whether gap(top, z) < tau, for top >= z: 0 when top == z (equal infinities too),
    otherwise the exact real top - z (infinite when top = +inf or z = -inf)."""
    if top == z:
        return 0 < tau
    if math.isinf(top) or math.isinf(z):
        return False
    return Fraction(top) - Fraction(z) < tau


def margin_vote(logits_row, margin=0.0):
    """The vote of one variant with margin tau (README, "What 'exact' means under floating
    point"), in exact arithmetic: the class it votes for (the first index of the top
    logit T), or, if T beats the runner-up by less than tau (a tie is a gap of 0), the
    frozenset of classes c with T - logit_c < tau: the classes that can become the
    argmax when every logit moves by less than tau/2. None for a row holding a NaN."""
    row = [float(v) for v in logits_row]
    if any(math.isnan(v) for v in row):
        return None
    tau = Fraction(float(margin))
    top = max(row)
    A = row.index(top)
    close = frozenset(c for c, z in enumerate(row) if _gap_below(top, z, tau))
    return A if close <= {A} else close


class Certificate:
    def __init__(self, prediction, radius, steps, counts, ambiguous=None, num_ambiguous=None):
        self.prediction, self.radius, self.steps, self.counts = prediction, radius, steps, counts
        self.ambiguous = torch.zeros_like(counts) if ambiguous is None else ambiguous
        self.num_ambiguous = (torch.zeros(counts.shape[0], dtype=torch.long)
                              if num_ambiguous is None else num_ambiguous)


def _certified_steps(counts_row, ambiguous_row=None):
    """Largest r such that, after any r of the L votes change (each quantization step of
    L1 change alters at most one variant, Corollary 1), the prediction stays: for every
    other class c, N_A - r > N_c + r, or N_A - r = N_c + r with A < c (index tie-break).
    Ambiguous variants count for every class they could go to except A (the worst case);
    r = -1 if the prediction fails even with no vote changed."""
    K = len(counts_row)
    amb = ambiguous_row or [0] * K
    A = max(range(K), key=lambda c: (counts_row[c], -c))

    def holds(r):
        return all(counts_row[A] - r > counts_row[c] + amb[c] + r
                   or (counts_row[A] - r == counts_row[c] + amb[c] + r and A < c)
                   for c in range(K) if c != A)

    r = -1
    while holds(r + 1):
        r += 1
    return A, r


def certify(model, x, *, sigma=None, lam=None, L=None, q=255, seed=0, batch_size=None,
            backend="auto", margin=0.0) -> Certificate:
    """Evaluates the base classifier on all L variants of each image (one image at a time)
    and certifies the vote (with ``margin`` tau: each variant votes by margin_vote).
    ``batch_size`` and ``backend`` are accepted and ignored."""
    L = _resolve(sigma, lam, L, q)
    B = x.shape[0]
    rows, ambs, num_ambs, preds, steps = [], [], [], [], []
    with torch.no_grad():
        for b in range(B):
            noisy = variants(x[b:b + 1], L=L, q=q, seed=seed)[0]
            logits = model(noisy).tolist()
            K = len(logits[0])
            row, amb, num_amb = [0] * K, [0] * K, 0
            for z in logits:
                vote = margin_vote(z, margin)
                if vote is None:
                    raise ValueError("the model returned NaN logits")
                if isinstance(vote, int):
                    row[vote] += 1
                else:
                    num_amb += 1
                    for c in vote:
                        amb[c] += 1
            A, r = _certified_steps(row, amb)
            rows.append(row)
            ambs.append(amb)
            num_ambs.append(num_amb)
            preds.append(A)
            steps.append(r)
    steps_t = torch.tensor(steps, dtype=torch.long)
    return Certificate(torch.tensor(preds, dtype=torch.long), steps_t.double() / q, steps_t,
                       torch.tensor(rows, dtype=torch.long), torch.tensor(ambs, dtype=torch.long),
                       torch.tensor(num_ambs, dtype=torch.long))
