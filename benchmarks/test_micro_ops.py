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

Q = 255
SIGMA = 1.0
ROWS = 256
SHAPE = (3, 32, 32)
NUM_CLASSES = 10
BACKENDS = ("torch", "cpp", "triton", "cuda")


def _device_for(backend: str) -> str:
    return "cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) \
        else "cpu"


def _skip_reason(backend: str):
    device = _device_for(backend)
    if backend not in available_backends(device):
        return f"backend {backend!r} is not available on {device} here"
    if backend == "triton" and device == "cpu":
        return ("triton runs in its CPU interpreter here (TRITON_INTERPRET=1), about 1 ms per "
                "program: not a measurement of the kernels")
    return None


@pytest.fixture(params=BACKENDS)
def backend(request):
    reason = _skip_reason(request.param)
    if reason:
        pytest.skip(reason)
    return request.param


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def test_expand(benchmark, backend):
    device = _device_for(backend)
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


def test_vote(benchmark, backend):
    device = _device_for(backend)
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
    rounds = int(counts.sum().item()) // ROWS
    expected = torch.bincount(logits.argmax(1).cpu(), minlength=NUM_CLASSES) * rounds
    assert torch.equal(counts.cpu()[0], expected)
