"""Micro-benchmarks of the two pipeline ops, expand (levels -> split-noise variants in a
workspace) and vote (logits -> argmax vote counts), for every backend, with pytest-benchmark:

    pytest benchmarks/ --benchmark-only            # from the repository root

One certify chunk: a forward batch of 256 variants of 3x32x32 images (one image, variants
0..255 at sigma 1, L = 883) and 256 x 10 logits. Backends not available here are skipped
with the reason; Triton under TRITON_INTERPRET=1 (the CPU interpreter, ~1 ms per program)
is skipped too: its timings say nothing about the kernels. ``--quick`` in run_all.py runs
these with few rounds. The main test suite (testpaths = ["tests"]) does not collect this.
"""
import pytest
import torch

import dssn_kernels as dk
from dssn_kernels.backends import available_backends
from dssn_kernels.ops import expand_into, vote_into
from dssn_kernels.triton import triton_available

Q = 255
SIGMA = 1.0
ROWS = 256
SHAPE = (3, 32, 32)
NUM_CLASSES = 10
# (backend, device): every backend where it can run; torch on the GPU too when there is one
CASES = (("torch", "cpu"), ("cpp", "cpu"), ("triton", "cpu"), ("torch", "cuda"),
         ("cuda", "cuda"), ("triton", "cuda"))


def _skip_reason(backend: str, device: str):
    if device == "cuda" and not torch.cuda.is_available():
        return f"no CUDA GPU here, so no {backend!r} on cuda"
    if backend not in available_backends(device):
        why = triton_available(device)[1] if backend == "triton" else "not built here"
        return f"backend {backend!r} is not available on {device}: {why}"
    if backend == "triton" and device == "cpu":
        return ("triton on CPU tensors runs in its interpreter (TRITON_INTERPRET=1), about "
                "1 ms per program: not a measurement of the kernels")
    return None


def skip_reasons() -> dict:
    """{"backend-device": why it is skipped} for the cases that do not run here."""
    return {f"{b}-{d}": r for b, d in CASES if (r := _skip_reason(b, d))}


@pytest.fixture(params=CASES, ids=[f"{b}-{d}" for b, d in CASES])
def case(request):
    reason = _skip_reason(*request.param)
    if reason:
        pytest.skip(reason)
    return request.param


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def test_expand(benchmark, case):
    backend, device = case
    L = dk.num_variants(SIGMA, q=Q)
    d = SHAPE[0] * SHAPE[1] * SHAPE[2]
    g = torch.Generator().manual_seed(0)
    levels = torch.randint(0, Q + 1, (1, d), generator=g, dtype=torch.uint8).to(device)
    offsets = dk.split_offsets(d, L, 0).to(device=device, dtype=torch.int32)
    out = torch.empty((1, ROWS, d), dtype=torch.float32, device=device)

    def run():
        expand_into(out, levels, offsets, L, Q, 0, backend)
        _sync(device)

    benchmark.extra_info.update(backend=backend, device=device, rows=ROWS, d=d, L=L,
                                bytes_written=out.numel() * out.element_size())
    benchmark(run)
    ref = dk.variants(levels.cpu(), sigma=SIGMA, q=Q, stop=ROWS, backend="torch")
    assert torch.equal(out.cpu().view(1, ROWS, -1), ref.view(1, ROWS, -1))


def test_vote(benchmark, case):
    backend, device = case
    L = dk.num_variants(SIGMA, q=Q)
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(ROWS, NUM_CLASSES, generator=g).to(device)
    counts = torch.zeros((1, NUM_CLASSES), dtype=torch.int64, device=device)
    nan_rows = torch.zeros(1, dtype=torch.int64, device=device)

    def run():
        vote_into(counts, nan_rows, logits, 0, L, backend)
        _sync(device)

    benchmark.extra_info.update(backend=backend, device=device, rows=ROWS,
                                num_classes=NUM_CLASSES)
    benchmark(run)
    # then one call from zero counts: exactly one vote per row, for its argmax
    counts.zero_()
    run()
    expected = torch.bincount(logits.argmax(1).cpu(), minlength=NUM_CLASSES)
    assert int(expected.sum()) == ROWS and torch.equal(counts.cpu()[0], expected)
