"""Which backend runs where.

``auto``: CPU tensors -> ``cpp`` when the native extension is built, else ``torch``;
CUDA tensors -> ``cuda`` when the extension was built with its CUDA kernels, else
``triton`` on sm_80+ (Triton dropped Turing after 3.2), else ``torch``. ``triton`` with
CPU tensors runs through Triton's interpreter when TRITON_INTERPRET=1 is set.
"""
from __future__ import annotations

import functools

import torch

BACKENDS = ("auto", "torch", "cpp", "triton", "cuda")


class BackendUnavailableError(RuntimeError):
    """The named backend is not built or cannot run on the given device."""


@functools.lru_cache(maxsize=None)
def native_extension_error() -> str | None:
    """None if dssn_kernels._C (the torch.ops.dssn kernels) imports, else why not."""
    try:
        from . import _C  # noqa: F401  (registers torch.ops.dssn.*)
    except ImportError as exc:  # not built
        return f"the native extension dssn_kernels._C is not built ({exc})"
    return None


def native_has_cuda_kernels() -> bool:
    """Whether the extension registered CUDA kernels for the dssn ops (a CUDA build)."""
    if native_extension_error() is not None:
        return False
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"dssn::{op}", "CUDA")
               for op in ("expand_", "vote_", "vote_margin_"))


def _triton_status(device) -> tuple[bool, str]:
    from .triton import triton_available
    return triton_available(device)


def available_backends(device="cpu") -> list[str]:
    """Backends that can run on tensors of ``device``, in order of preference last."""
    device = torch.device(device)
    out = ["torch"]
    if device.type == "cpu" and native_extension_error() is None:
        out.append("cpp")
    if device.type == "cuda" and native_has_cuda_kernels():
        out.append("cuda")
    if _triton_status(device)[0]:
        out.append("triton")
    return out


def check_backend_name(backend) -> str:
    """``backend`` if it is one of BACKENDS, else ValueError (whether it runs is
    resolve_backend's question)."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return backend


def resolve_backend(backend: str, device) -> str:
    """The concrete backend for tensors on ``device`` (raises if it cannot run there)."""
    check_backend_name(backend)
    device = torch.device(device)
    if backend == "auto":
        if device.type == "cpu":
            return "cpp" if native_extension_error() is None else "torch"
        if device.type == "cuda":
            if native_has_cuda_kernels():
                return "cuda"
            if _triton_status(device)[0]:
                return "triton"
        return "torch"
    if backend == "torch":
        return backend
    if backend == "cpp":
        if device.type != "cpu":
            raise BackendUnavailableError(f"backend 'cpp' runs on CPU tensors, got a {device.type} "
                                          "tensor (use 'cuda', 'triton' or 'auto')")
        err = native_extension_error()
        if err is not None:
            raise BackendUnavailableError(f"backend 'cpp' is not available: {err}; "
                                          "reinstall with `pip install --no-build-isolation -e .`")
        return backend
    if backend == "cuda":
        if device.type != "cuda":
            raise BackendUnavailableError(f"backend 'cuda' runs on CUDA tensors, got a {device.type} tensor")
        if not native_has_cuda_kernels():
            raise BackendUnavailableError(
                "backend 'cuda' is not available: the extension was built without its CUDA "
                "kernels (needs a CUDA build of torch and a CUDA toolkit at build time)")
        return backend
    ok, why = _triton_status(device)
    if not ok:
        raise BackendUnavailableError(f"backend 'triton' is not available on {device}: {why}")
    return backend
