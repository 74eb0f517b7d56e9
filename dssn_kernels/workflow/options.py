"""Options shared by the workflow's commands: the device, and which errors are the user's."""
from __future__ import annotations

import torch

from .checkpoint import CheckpointError
from .data import DatasetError
from .results import ResultsError


class WorkflowError(ValueError):
    """A bad option (device, backend, optimizer, ...): a user error."""


USER_ERRORS = (CheckpointError, DatasetError, ResultsError, WorkflowError)


def resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise WorkflowError(f"bad --device {device!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise WorkflowError(f"--device {device}: no CUDA device is available")
    return device
