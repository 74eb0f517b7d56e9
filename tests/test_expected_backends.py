"""Every backend this machine is expected to have (tests/conftest.py: CPU_BACKENDS,
CUDA_BACKENDS, set by DSSN_EXPECT_BACKENDS / DSSN_EXPECT_CUDA_BACKENDS) is available.

The kernel tests parametrize over the expected lists, so a backend that failed to build
fails there too; this test names the missing backend and says why it is missing."""
import pytest

import dssn_kernels as dk
from conftest import CPU_BACKENDS, CUDA_BACKENDS, gpu_param
from dssn_kernels.backends import BackendUnavailableError, resolve_backend

VARIABLE = {"cpu": "DSSN_EXPECT_BACKENDS", "cuda": "DSSN_EXPECT_CUDA_BACKENDS"}


@pytest.mark.parametrize("device,expected", [
    pytest.param("cpu", CPU_BACKENDS, id="cpu"),
    gpu_param("cuda", CUDA_BACKENDS, id="cuda")])
def test_expected_backends_are_available(device, expected):
    available = dk.available_backends(device)
    missing = {}
    for backend in expected:
        if backend in available:
            continue
        try:
            resolve_backend(backend, device)
            why = "resolve_backend accepts it, yet available_backends() does not list it"
        except BackendUnavailableError as exc:
            why = str(exc)
        missing[backend] = why
    assert not missing, (
        f"backend(s) expected on {device} tensors are not available: "
        + "; ".join(f"{b!r}: {why}" for b, why in missing.items())
        + f". dk.available_backends({device!r}) = {available}. If this machine deliberately "
        f"lacks one, name the expected backends in {VARIABLE[device]} "
        f"(e.g. {VARIABLE[device]}={','.join(b for b in expected if b not in missing)}).")
    # the backends expected here are the ones the kernel tests run: each really resolves
    for backend in expected:
        assert resolve_backend(backend, device) == backend


def test_expected_lists_are_well_formed():
    assert CPU_BACKENDS and set(CPU_BACKENDS) <= {"torch", "cpp", "triton"}
    assert CUDA_BACKENDS and set(CUDA_BACKENDS) <= {"torch", "cuda", "triton"}
    assert len(set(CPU_BACKENDS)) == len(CPU_BACKENDS)


@pytest.mark.parametrize("triton_runs,interpreting,cuda_kernels,want", [
    (True, False, True, "triton"), (True, False, False, "triton"), (False, False, True, "cuda"),
    (False, False, False, "torch"), (True, True, True, "cuda"), (True, True, False, "torch")])
def test_auto_rule_on_cuda_tensors(monkeypatch, triton_runs, interpreting, cuda_kernels, want):
    """auto on CUDA tensors: compiled triton where it runs (sm_80+), else the extension's
    CUDA kernels (Turing), else torch; Triton's interpreter (which says it runs on any
    device) is never auto's choice. Checked without a GPU by stating what the machine has."""
    import torch

    from dssn_kernels import backends

    monkeypatch.setattr(backends, "_triton_status", lambda device: (triton_runs, "stated"))
    monkeypatch.setattr(backends, "_triton_interpreting", lambda: interpreting)
    monkeypatch.setattr(backends, "native_has_cuda_kernels", lambda: cuda_kernels)
    monkeypatch.setattr(backends, "native_extension_error", lambda: None)
    assert backends._auto_backend(torch.device("cuda")) == want
