"""Which backend runs where.

``auto``: CPU tensors -> ``cpp`` when the native extension is built, else ``torch``;
CUDA tensors -> ``triton`` on sm_80+ where triton imports and compiles (not under
TRITON_INTERPRET=1; Triton dropped Turing after 3.2), else ``cuda`` when the extension was built with its CUDA kernels (the default on
Turing, sm_75), else ``torch``. ``triton`` with
CPU tensors runs through Triton's interpreter when TRITON_INTERPRET=1 is set.

When the native extension does not import, ``auto`` says so once per process
(NativeExtensionWarning: why, and how to build it) and goes on with the fallback, whose
results are the same bits, only slower.
"""
from __future__ import annotations

import functools
import importlib
import os
import sys
import warnings

import torch

from .checks import BACKENDS, check_backend_name  # noqa: F401  (BACKENDS: re-exported)

BUILD_HINT = ("build it from the repository root with `pip install --no-build-isolation -e .` "
              "(needs a C++ compiler; a CUDA toolkit for the CUDA kernels)")


class BackendUnavailableError(RuntimeError):
    """The named backend is not built or cannot run on the given device."""


class NativeExtensionWarning(UserWarning):
    """``backend="auto"`` fell back because the native extension does not import."""


def _load_native() -> ImportError | None:
    """Imports dssn_kernels._C (which registers torch.ops.dssn.*): None, or the error."""
    try:
        importlib.import_module(f"{__package__}._C")
    except ImportError as exc:
        return exc
    return None


@functools.lru_cache(maxsize=None)
def native_extension_error() -> str | None:
    """None if the native extension dssn_kernels._C (the torch.ops.dssn kernels) imports,
    else a sentence saying why not (without the build hint, BUILD_HINT)."""
    exc = _load_native()
    if exc is None:
        return None
    name = f"{__package__}._C"
    if isinstance(exc, ModuleNotFoundError) and exc.name == name:
        return f"the native C++ extension {name} is not built (no compiled {name} module found)"
    return (f"the native C++ extension {name} is built but does not load "
            f"({type(exc).__name__}: {exc})")


_fallback_warned = False


def _warn_native_fallback(fallback: str, device) -> None:
    """The one NativeExtensionWarning of the process (auto fell back to ``fallback``)."""
    global _fallback_warned
    if _fallback_warned:
        return
    _fallback_warned = True
    # point the warning at the caller's line, the first frame outside this package
    package, frame, level = os.path.dirname(os.path.abspath(__file__)), sys._getframe(), 1
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(
            package + os.sep):
        frame, level = frame.f_back, level + 1
    warnings.warn(f"{native_extension_error()}, so backend='auto' uses the {fallback!r} backend "
                  f"on {torch.device(device).type} tensors (the same results, slower); "
                  f"{BUILD_HINT}", NativeExtensionWarning, stacklevel=level)


def native_has_cuda_kernels() -> bool:
    """Whether the extension registered CUDA kernels for the dssn ops (a CUDA build)."""
    if native_extension_error() is not None:
        return False
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"dssn::{op}", "CUDA")
               for op in ("expand_", "vote_", "vote_margin_"))


def _triton_interpreting() -> bool:
    from .triton import interpreting
    return interpreting()


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


def _auto_backend(device: torch.device) -> str:
    if device.type == "cpu":
        if native_extension_error() is None:
            return "cpp"
        _warn_native_fallback("torch", device)
        return "torch"
    if device.type == "cuda":
        # compiled Triton on sm_80+: the GPU default (its interpreter never is: under
        # TRITON_INTERPRET=1 triton_available says yes for any device, Turing included)
        if not _triton_interpreting() and _triton_status(device)[0]:
            return "triton"
        if native_has_cuda_kernels():   # Turing (sm_75), or no triton
            return "cuda"
        if native_extension_error() is not None:
            _warn_native_fallback("torch", device)
        return "torch"
    return "torch"


def resolve_backend(backend: str, device) -> str:
    """The concrete backend for tensors on ``device`` (raises if it cannot run there);
    ``backend``: a name checks.check_backend_name accepts."""
    device = torch.device(device)
    if backend == "auto":
        return _auto_backend(device)
    if backend == "torch":
        return backend
    if backend == "cpp":
        if device.type != "cpu":
            raise BackendUnavailableError(f"backend 'cpp' runs on CPU tensors, got a {device.type} "
                                          "tensor (use 'cuda', 'triton' or 'auto')")
        err = native_extension_error()
        if err is not None:
            raise BackendUnavailableError(f"backend 'cpp' is not available: {err}; {BUILD_HINT}")
        return backend
    if backend == "cuda":
        if device.type != "cuda":
            raise BackendUnavailableError(f"backend 'cuda' runs on CUDA tensors, got a {device.type} tensor")
        if not native_has_cuda_kernels():
            raise BackendUnavailableError(
                "backend 'cuda' is not available: the extension was built without its CUDA "
                "kernels (needs a CUDA build of torch and a CUDA toolkit at build time)")
        return backend
    if backend != "triton":
        check_backend_name(backend)   # raises: not a backend name (the callers check first)
    ok, why = _triton_status(device)
    if not ok:
        raise BackendUnavailableError(f"backend 'triton' is not available on {device}: {why}")
    return backend
