"""The Triton expand kernel against the oracle (dssn_reference), bit for bit.

On GPU-less machines the kernel runs in Triton's interpreter on CPU tensors (conftest
sets TRITON_INTERPRET=1); with TRITON_INTERPRET=0 on an sm_80+ GPU the same tests run on
CUDA tensors. Grids are kept small: the interpreter costs milliseconds per program.
"""
import inspect
import re
from fractions import Fraction

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton backend cannot run")

import dssn_reference as ref  # noqa: E402
from dssn_kernels.inputs import to_levels  # noqa: E402
from dssn_kernels.ops.expand import expand_torch  # noqa: E402
from dssn_kernels.spec import MAX_Q_FOR_DTYPE, split_offsets, value_table  # noqa: E402
from dssn_kernels.triton import interpreting, triton_available  # noqa: E402
from dssn_kernels.triton import expand as triton_expand  # noqa: E402
from dssn_kernels.triton.expand import expand_triton  # noqa: E402
from triton_ptx import run_compile_process  # noqa: E402

OK, REASON = triton_available()
DEVICE = "cpu" if interpreting() else "cuda"
pytestmark = pytest.mark.skipif(not OK, reason=REASON)


def run_expand(x, L, q, seed=0, start=0, stop=None, dtype=torch.float32):
    """Variants start..stop-1 of x through the Triton kernel: [B, stop-start, *shape]."""
    stop = L if stop is None else stop
    levels = to_levels(x, q).to(DEVICE)
    B, d = levels.shape
    offsets = split_offsets(d, L, seed).to(torch.int32).to(DEVICE)
    out = torch.full((B, stop - start, d), float("nan"), dtype=dtype, device=DEVICE)
    expand_triton(out, levels, offsets, L, q, start)
    return out.cpu().view(B, stop - start, *x.shape[1:])


def grid_input(shape, q, seed, noncontiguous=True):
    """Float pixels k/q of the given shape; a non-contiguous view when asked."""
    g = torch.Generator().manual_seed(seed)
    if noncontiguous:   # a transposed view of the last two dims
        full = torch.randint(0, q + 1, (*shape[:-2], shape[-1], shape[-2]), generator=g)
        x = (full.double() / q).float().transpose(-1, -2)
        assert not x.is_contiguous()
        return x
    return (torch.randint(0, q + 1, shape, generator=g).double() / q).float()


def bits(t):
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


# (q, L, start, stop, shape): both lambda regimes (L < q is lambda < 1/2), L = q, L = 1,
# large L with a narrow window, windows, q > 255 (int32 levels).
CASES = [
    (4, 3, 0, None, (2, 3, 2, 2)),       # L < q
    (4, 4, 0, None, (2, 3, 2, 2)),       # L = q
    (4, 11, 0, None, (2, 3, 2, 2)),      # L > q
    (7, 20, 5, 13, (2, 2, 3, 3)),        # window
    (255, 1, 0, None, (3, 3, 4, 4)),     # L = 1
    (255, 90, 0, None, (1, 3, 4, 3)),    # L < q, full
    (255, 3091, 1500, 1510, (2, 3, 4, 4)),   # large L, narrow window
    (255, 3091, 3085, 3091, (1, 5, 7)),  # the last variants
    (300, 50, 10, 30, (2, 2, 3, 5)),     # int32 levels
]


@pytest.mark.parametrize("q,L,start,stop,shape", CASES)
def test_float32_bit_identical_to_reference(q, L, start, stop, shape):
    x = grid_input(shape, q, seed=q + L)
    got = run_expand(x, L, q, seed=3, start=start, stop=stop)
    want = ref.variants(x, L=L, q=q, seed=3, start=start, stop=stop)
    assert got.shape == want.shape
    assert torch.equal(bits(got), bits(want))


@pytest.mark.parametrize("q,L", [(4, 3), (4, 4), (4, 9), (16, 5), (16, 40), (255, 97)])
def test_every_level_and_split_index(q, L):
    """A ramp of all levels 0..q over all L variants covers every (k, j) pair."""
    x = torch.arange(q + 1, dtype=torch.float64).div(q).float()[None]
    got = run_expand(x, L, q, seed=1)
    want = ref.variants(x, L=L, q=q, seed=1)
    assert torch.equal(bits(got), bits(want))


def test_uint8_and_int32_levels_agree():
    q, L = 255, 40
    k = torch.randint(0, q + 1, (2, 3, 5, 5), generator=torch.Generator().manual_seed(5))
    a = run_expand(k.to(torch.uint8), L, q)                 # uint8 levels
    levels = to_levels(k.to(torch.int64), q).to(torch.int32).to(DEVICE)
    offsets = split_offsets(75, L, 0).to(torch.int32).to(DEVICE)
    out = torch.empty(2, L, 75, device=DEVICE)
    expand_triton(out, levels, offsets, L, q, 0)            # int32 levels
    assert torch.equal(bits(a), bits(out.cpu().view_as(a)))


def test_matches_torch_backend_on_a_larger_batch():
    """One bigger problem (several pixel and variant blocks) against the torch backend."""
    q, L, d = 255, 200, 3 * 24 * 24
    g = torch.Generator().manual_seed(7)
    levels = torch.randint(0, q + 1, (3, d), generator=g, dtype=torch.uint8)
    offsets = torch.randint(0, L, (d,), generator=g, dtype=torch.int32)
    start, count = 37, 48
    out = torch.empty(3, count, d, device=DEVICE)
    expand_triton(out, levels.to(DEVICE), offsets.to(DEVICE), L, q, start)
    want = torch.empty(3, count, d)
    expand_torch(want, levels, offsets, L, q, start)
    assert torch.equal(bits(out.cpu()), bits(want))


# ---- float16 / bfloat16 outputs: the nearest value of the dtype to m/(4q) ----

def nearest(m: int, q: int, dtype) -> int:
    """Bits of the value of ``dtype`` nearest to m/(4q), ties to even, found exactly with
    Fractions among the neighbours of a float64-based first guess."""
    exact = Fraction(m, 4 * q)
    guess = int(torch.tensor(float(exact), dtype=torch.float64).to(dtype).view(torch.int16))
    best = None
    for b in (guess - 1, guess, guess + 1):
        if b < 0:
            continue
        value = torch.tensor(b, dtype=torch.int16).view(dtype)
        if not torch.isfinite(value):
            continue
        key = (abs(Fraction(float(value)) - exact), b & 1)   # distance, then even first
        if best is None or key < best[0]:
            best = (key, b)
    return best[1]


LOW_PRECISION = [
    (4, 3, 0, None, (2, 3, 2, 2)),
    (4, 11, 0, None, (2, 3, 2, 2)),
    (255, 97, 0, None, (1, 256)),        # ramp: every (k, j)
    (255, 3091, 2000, 2008, (2, 3, 4, 4)),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("q,L,start,stop,shape", LOW_PRECISION + [
    ("max", 64, 10, 20, (2, 3, 5, 5))])  # the largest q the dtype allows
def test_low_precision_is_the_nearest_value(dtype, q, L, start, stop, shape):
    q = MAX_Q_FOR_DTYPE[dtype] if q == "max" else q
    if shape == (1, 256):
        x = torch.arange(256, dtype=torch.float64).div(q).float()[None]
    else:
        x = grid_input(shape, q, seed=11 + L)
    got = run_expand(x, L, q, seed=2, start=start, stop=stop, dtype=dtype)
    assert got.dtype == dtype
    want32 = ref.variants(x, L=L, q=q, seed=2, start=start, stop=stop)
    m = torch.round(want32.double() * (4 * q)).long()       # exact: want32 ~ m/(4q)
    uniq = torch.unique(m).tolist()
    lut = torch.zeros(4 * q + 1, dtype=torch.int16)
    for mm in uniq:
        lut[mm] = nearest(mm, q, dtype)
    assert torch.equal(bits(got), lut[m])
    # ...and it is the package's value table for that dtype
    assert torch.equal(bits(got), bits(value_table(q, dtype)[m]))


def test_bfloat16_exact_ties_round_to_even():
    """m/(4q) lands exactly halfway between two bfloat16 values only when 4q has a large
    power of two: at q = 1024, m = 2j + 1 in 257..511 (pixels k <= j, n = 0) are such
    ties. (float16 has none for q <= 1023: a tie needs a 12-bit odd m/(4q) = m/2^e.)"""
    q, L, dtype = 1024, 300, torch.bfloat16
    x = torch.tensor([[0, 1, 50, 100, 128, 700]], dtype=torch.float64).div(q).float()
    got = run_expand(x, L, q, seed=0, dtype=dtype)
    want32 = ref.variants(x, L=L, q=q, seed=0)
    m = torch.round(want32.double() * (4 * q)).long()
    ties = [mm for mm in torch.unique(m).tolist()
            if (Fraction(mm, 4 * q) * 2 ** 20).denominator == 1 and 257 <= mm <= 511 and mm % 2]
    assert len(ties) > 100                          # the ties really occur
    lut = torch.zeros(4 * q + 1, dtype=torch.int16)
    for mm in torch.unique(m).tolist():
        lut[mm] = nearest(mm, q, dtype)
    assert torch.equal(bits(got), lut[m])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_rejects_q_beyond_exact_rounding(dtype):
    q = MAX_Q_FOR_DTYPE[dtype] + 1
    levels = torch.zeros(1, 4, dtype=torch.int32, device=DEVICE)
    offsets = torch.zeros(4, dtype=torch.int32, device=DEVICE)
    out = torch.empty(1, 2, 4, dtype=dtype, device=DEVICE)
    with pytest.raises(ValueError):
        expand_triton(out, levels, offsets, 8, q, 0)


@pytest.mark.parametrize("bad", ["window", "start", "out_dtype", "noncontiguous_out",
                                 "levels_dtype", "offsets_dtype", "shape", "L"])
def test_rejects_bad_arguments(bad):
    B, d, L, q = 2, 6, 10, 255
    out = torch.empty(B, 4, d, device=DEVICE)
    levels = torch.zeros(B, d, dtype=torch.uint8, device=DEVICE)
    offsets = torch.zeros(d, dtype=torch.int32, device=DEVICE)
    start = 0
    if bad == "window":
        start = 7
    elif bad == "start":
        start = -1
    elif bad == "out_dtype":
        out = out.double()
    elif bad == "noncontiguous_out":
        out = torch.empty(B, d, 4, device=DEVICE).transpose(1, 2)
    elif bad == "levels_dtype":
        levels = levels.long()
    elif bad == "offsets_dtype":
        offsets = offsets.long()
    elif bad == "shape":
        offsets = torch.zeros(d + 1, dtype=torch.int32, device=DEVICE)
    elif bad == "L":
        L = 0
    with pytest.raises(ValueError):
        expand_triton(out, levels, offsets, L, q, start)


def test_empty_window_is_a_no_op():
    out = torch.empty(2, 0, 5, device=DEVICE)
    expand_triton(out, torch.zeros(2, 5, dtype=torch.uint8, device=DEVICE),
                  torch.zeros(5, dtype=torch.int32, device=DEVICE), 4, 255, 4)


def test_kernel_divides_with_div_rn_only():
    """The interpreter divides exactly whatever the source says (numpy), so it cannot
    catch an approximate ``/`` (div.full.f32 on the GPU): check the source instead."""
    src = inspect.getsource(triton_expand._expand_kernel.fn)
    code = "\n".join(line.split("#")[0] for line in src.splitlines())
    assert "tl.div_rn(" in code
    assert not re.search(r"[^/]/[^/]", code), "plain float division in the expand kernel"
    assert "tl.fma" not in code


# Compiles the kernel for sm_<argv[1]> (no GPU needed: triton ships ptxas) in a process
# without TRITON_INTERPRET, and reports what the PTX divides, fuses and converts with.
_PTX_PROBE = r"""
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dssn_kernels.triton import expand as E
target = GPUTarget("cuda", int(sys.argv[1]), 32)
report = {}
for kind, out_ty in [(0, "*fp32"), (1, "*fp16"), (2, "*i16")]:
    for lev in ("*u8", "*i32"):
        sig = {"out_ptr": out_ty, "levels_ptr": lev, "offsets_ptr": "*i32", "count": "i32",
               "d": "i32", "L": "i32", "q": "i32", "start": "i32", "four_q": "fp32",
               "BLOCK_T": "constexpr", "BLOCK_D": "constexpr", "OUT_KIND": "constexpr"}
        src = ASTSource(fn=E._expand_kernel, signature=sig,
                        constexprs={"BLOCK_T": 4, "BLOCK_D": 1024, "OUT_KIND": kind})
        # default options, fp fusion included: the kernel must not need it disabled
        ptx = triton.compile(src, target=target,
                             options={"num_warps": 8}).asm["ptx"]
        report[f"{kind}{lev}"] = sorted(set(re.findall(r"\b(?:div|rcp|fma|mad|cvt)\.[\w.]+", ptx)))
# every int argument equal to 1 (Triton specializes those into constexprs)
sig = {"out_ptr": "*fp32", "levels_ptr": "*u8", "offsets_ptr": "*i32", "four_q": "fp32"}
ones = {"count": 1, "d": 1, "L": 1, "q": 1, "start": 1}
sig.update({k: "constexpr" for k in ones} | {"BLOCK_T": "constexpr", "BLOCK_D": "constexpr",
                                             "OUT_KIND": "constexpr"})
triton.compile(ASTSource(fn=E._expand_kernel, signature=sig,
                         constexprs=ones | {"BLOCK_T": 1, "BLOCK_D": 1, "OUT_KIND": 0}),
               target=target, options={"num_warps": 1})
print(json.dumps(report))
"""


@pytest.mark.parametrize("capability", [80, 90], ids=["sm80", "sm90"])
def test_ptx_uses_ieee_division_and_no_float_fma(capability):
    """What the interpreter cannot show: the GPU code (sm_80, and sm_90 for the
    H100/H200) divides with div.rn.f32 (not div.full/approx or a reciprocal), has no float
    fma/mad, and converts to float16 with cvt.rn; and the kernel compiles when Triton
    specializes int arguments equal to 1."""
    report = run_compile_process(_PTX_PROBE, str(capability))
    assert len(report) == 6
    for key, ops in report.items():
        assert "div.rn.f32" in ops, (key, ops)
        bad = [op for op in ops if op.startswith(("div.full", "div.approx", "rcp."))
               or re.match(r"(fma|mad)\.(rn\.)?(f32|f16|bf16|ftz)", op)]
        assert not bad, (key, bad)
    assert "cvt.rn.f16.f32" in report["1*u8"]
    assert not any("bf16" in op for op in report["2*u8"])   # bfloat16 rounded on the bits
