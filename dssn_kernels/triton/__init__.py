"""Triton kernels of the dssn ops, one op per file (kernel and launcher together).

    expand_triton(out, levels, offsets, L, q, start)      # = torch.ops.dssn.expand_
    vote_triton(counts, nan_rows, logits, row0, rows_per_image)   # = torch.ops.dssn.vote_
    vote_margin_triton(counts, ambiguous, nan_rows, logits, row0, rows_per_image, margin)
                                                          # = torch.ops.dssn.vote_margin_

They run on NVIDIA GPUs of compute capability >= 8.0 (Triton dropped Turing after 3.2),
or, with ``TRITON_INTERPRET=1`` set before this package's kernels are first imported, on
CPU tensors through Triton's interpreter (how the tests run them on GPU-less machines).

Importing this package does not import Triton: ``triton_available()`` says whether the
kernels can run, and the launchers are loaded on first access.
"""
from __future__ import annotations

import os
import sys

__all__ = ["expand_triton", "vote_triton", "vote_margin_triton", "triton_available",
           "interpreting"]

_KERNEL_MODULES = ("dssn_kernels.triton.expand", "dssn_kernels.triton.vote",
                   "dssn_kernels.triton.vote_margin")


def interpreting() -> bool:
    """True when Triton runs kernels in its interpreter (TRITON_INTERPRET set)."""
    try:
        import triton
        return bool(triton.knobs.runtime.interpret)
    except (ImportError, AttributeError):
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_available(device=None) -> tuple[bool, str]:
    """(ok, reason): whether the Triton kernels can run here, and why (not).

    They can when triton imports and either TRITON_INTERPRET=1 (the interpreter; then the
    tensors may be on the CPU) or a CUDA device of compute capability >= 8.0 is present.
    With ``device`` given, answers for tensors on that device.
    """
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return False, f"triton is not importable ({type(exc).__name__}: {exc})"
    import torch

    if interpreting():
        # A kernel decorated before TRITON_INTERPRET was set stays a compiled kernel.
        for name in _KERNEL_MODULES:
            mod = sys.modules.get(name)
            if mod is not None and not getattr(mod, "KERNEL_INTERPRETED", True):
                return False, (f"TRITON_INTERPRET=1 was set after {name} defined its kernels; "
                               "set it before importing dssn_kernels.triton's kernels")
        return True, "Triton interpreter (TRITON_INTERPRET=1): kernels run on the CPU, slowly"
    if device is not None and torch.device(device).type != "cuda":
        return False, (f"Triton kernels need CUDA tensors (got {torch.device(device).type}) "
                       "unless TRITON_INTERPRET=1")
    if not torch.cuda.is_available():
        return False, "no CUDA device is available (and TRITON_INTERPRET is not set)"
    index = torch.device(device).index if device is not None else None
    major, minor = torch.cuda.get_device_capability(index)
    name = torch.cuda.get_device_name(index)
    if (major, minor) < (8, 0):
        return False, (f"{name} is sm_{major}{minor}; the Triton backend needs sm_80 or newer "
                       "(Triton dropped Turing after 3.2): use the 'cuda' backend")
    for mod_name in _KERNEL_MODULES:
        mod = sys.modules.get(mod_name)
        if mod is not None and getattr(mod, "KERNEL_INTERPRETED", False):
            return False, (f"{mod_name} defined its kernels under TRITON_INTERPRET=1, which is "
                           "no longer set; restart the process")
    return True, f"{name} (sm_{major}{minor})"


def __getattr__(name):
    if name == "expand_triton":
        from .expand import expand_triton
        return expand_triton
    if name == "vote_triton":
        from .vote import vote_triton
        return vote_triton
    if name == "vote_margin_triton":
        from .vote_margin import vote_margin_triton
        return vote_margin_triton
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
