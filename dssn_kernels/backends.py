"""Which backend runs where. ``auto`` picks ``cpp`` for CPU tensors when the native
extension is built, else ``torch``."""
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


def available_backends(device="cpu") -> list[str]:
    device = torch.device(device)
    out = ["torch"]
    if device.type == "cpu" and native_extension_error() is None:
        out.append("cpp")
    return out


def resolve_backend(backend: str, device) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    device = torch.device(device)
    if backend == "auto":
        return "cpp" if "cpp" in available_backends(device) else "torch"
    if backend == "torch":
        return backend
    if backend == "cpp":
        if device.type != "cpu":
            raise BackendUnavailableError(f"backend 'cpp' runs on CPU tensors, got a {device.type} tensor")
        err = native_extension_error()
        if err is not None:
            raise BackendUnavailableError(f"backend 'cpp' is not available: {err}; "
                                          "reinstall with `pip install --no-build-isolation -e .`")
        return backend
    raise BackendUnavailableError(
        f"backend {backend!r} is not available in this build (available on {device}: "
        f"{', '.join(available_backends(device))})")
