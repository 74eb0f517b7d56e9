"""Test configuration: which backends this machine must have, the ``gpu`` marker, and
the Triton interpreter.

Expected backends. The kernel tests parametrize over the backends *expected*
here, never over ``dk.available_backends()`` (the code under test): if the C++ extension
fails to build, the ``cpp`` cases fail instead of silently dropping out, and
tests/test_expected_backends.py says which backend is missing and why.

* CPU tensors: ``torch``, ``cpp``, and ``triton`` whenever Triton runs in its interpreter
  (TRITON_INTERPRET=1, the default below on machines without an sm_80+ GPU). Override
  with DSSN_EXPECT_BACKENDS=torch,cpp (comma-separated) on a machine that deliberately
  lacks one.
* CUDA tensors: ``torch``, ``cuda`` (the extension's CUDA kernels) and ``triton`` (not
  on GPUs below sm_80, which Triton no longer supports). Override with
  DSSN_EXPECT_CUDA_BACKENDS. These cases carry the ``gpu`` marker: ``pytest -m gpu``
  selects them; without a CUDA device they are skipped, with the reason printed
  (``-rs``), and still listed by ``pytest -m gpu --collect-only``.

Triton: on a machine without an sm_80+ CUDA device, TRITON_INTERPRET=1 runs the Triton
kernels on CPU tensors through the interpreter; on an sm_80+ GPU it stays unset so the
``triton`` cases run the compiled kernels on CUDA tensors. An explicit TRITON_INTERPRET
always wins. It must be decided before any @triton.jit function is defined (before
dssn_kernels imports triton); importing torch does not import triton.
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, settings


def _truthy(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "on", "yes")


HAS_CUDA = torch.cuda.is_available()
# (major, minor) of each CUDA device; computed only where there is one
CUDA_CAPABILITIES = ([torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
                     if HAS_CUDA else [])
TRITON_GPU = any(cap >= (8, 0) for cap in CUDA_CAPABILITIES)

if not TRITON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
TRITON_INTERPRETED = _truthy(os.environ.get("TRITON_INTERPRET", "0"))

KNOWN_CPU = ("torch", "cpp", "triton")
KNOWN_CUDA = ("torch", "cuda", "triton")


def _expected(variable: str, default: list, known: tuple) -> tuple:
    value = os.environ.get(variable)
    if value is None:
        return tuple(default)
    names = tuple(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))
    unknown = [n for n in names if n not in known]
    if unknown:
        raise pytest.UsageError(f"{variable}={value!r}: unknown backend(s) {', '.join(unknown)}; "
                                f"choose among {', '.join(known)}")
    if not names:
        raise pytest.UsageError(f"{variable} is empty: name at least one of {', '.join(known)}")
    return names


# The backends expected on this machine, for CPU tensors and for CUDA tensors. Not derived
# from dssn_kernels: a backend that should be here and is not makes tests fail.
CPU_BACKENDS = _expected("DSSN_EXPECT_BACKENDS",
                         ["torch", "cpp"] + (["triton"] if TRITON_INTERPRETED else []),
                         KNOWN_CPU)
CUDA_BACKENDS = _expected("DSSN_EXPECT_CUDA_BACKENDS",
                          ["torch", "cuda"] + (["triton"] if TRITON_GPU or not HAS_CUDA else []),
                          KNOWN_CUDA)

NO_CUDA_REASON = "no CUDA device (torch.cuda.is_available() is False): GPU test skipped"
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)


def gpu_param(*values, id=None):
    """A pytest.param for a case on CUDA tensors: marked ``gpu``, skipped without CUDA."""
    return pytest.param(*values, id=id, marks=(pytest.mark.gpu, requires_cuda))


def device_backends(cpu=True, cuda=True, exclude=()):
    """(device, backend) parameters: every expected CPU backend (unmarked) and every
    expected CUDA backend (marked gpu, skipped without a CUDA device)."""
    out = []
    if cpu:
        out += [pytest.param("cpu", b, id=f"cpu-{b}") for b in CPU_BACKENDS if b not in exclude]
    if cuda:
        out += [gpu_param("cuda", b, id=f"cuda-{b}") for b in CUDA_BACKENDS if b not in exclude]
    return out


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "gpu: runs kernels on CUDA tensors (each expected CUDA backend) and checks "
                   "them against the CPU reference, or the dssn workflow on a CUDA device "
                   "(tests/test_workflow_devices.py); skipped without a CUDA device")


def pytest_report_header(config):
    cuda = (", ".join(CUDA_BACKENDS) + f" on {torch.cuda.device_count()} device(s)" if HAS_CUDA
            else "none (no CUDA device: the gpu-marked tests are skipped)")
    return [f"dssn expected backends: CPU tensors: {', '.join(CPU_BACKENDS)}; CUDA tensors: {cuda}",
            f"dssn TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!s}"]


settings.register_profile(
    "ci", deadline=None, max_examples=40, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", deadline=None, max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def single_process(monkeypatch):
    """No torch.distributed launcher variables: the code under test runs as one process."""
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
