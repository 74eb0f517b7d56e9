"""Options shared by the workflow's commands: the device, output paths, which errors
are the user's, and how a demo's ``python -m`` entry reports them."""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from pathlib import Path

import torch

from .checkpoint import CheckpointError
from .data import DatasetError
from .results import ResultsError


class WorkflowError(ValueError):
    """A bad option (device, backend, optimizer, ...): a user error."""


USER_ERRORS = (CheckpointError, DatasetError, ResultsError, WorkflowError)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch scheduler's preemption, ``kill``), raised like Ctrl-C so that every
    cleanup runs: locks released, temporary files removed, rows and states kept whole."""


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within: SIGTERM raises Terminated in the main thread (elsewhere nothing changes);
    the previous handler is restored on leaving."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_demo(main, prog: str) -> int:
    """Runs a demo's ``main()`` for ``python -m prog``: user errors (scikit-learn missing,
    a bad --out, a file that cannot be written, ...) are one line on stderr and exit status
    2, an interruption exit status 130 (SIGTERM: 143), as with the ``dssn`` command; 0 when
    it ran."""
    try:
        with sigterm_as_interrupt():
            main()
    except USER_ERRORS as exc:
        sys.stderr.write(f"python -m {prog}: error: {exc}\n")
        return 2
    except OSError as exc:
        if exc.filename is None:
            raise
        sys.stderr.write(f"python -m {prog}: error: "
                         f"{exc.strerror or type(exc).__name__}: {exc.filename}\n")
        return 2
    except Terminated:
        sys.stderr.write(f"python -m {prog}: error: terminated (SIGTERM)\n")
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        sys.stderr.write(f"python -m {prog}: error: interrupted\n")
        return 130
    return 0


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


def check_output_path(out, flag: str = "--out"):
    """``out`` as a Path after checking that a file can be written there, creating
    nothing: not empty, not a folder or another non-regular file (a device such as
    /dev/null, a pipe: a rename would replace it, a resume would block reading it), every
    existing ancestor a folder, the nearest existing one writable (missing folders are
    created when the file is written). Raises WorkflowError naming the user's path."""
    if out is None or not str(out).strip():
        raise WorkflowError(f"{flag} is empty: give a file name")
    path = Path(out)
    try:
        if path.is_dir():
            raise WorkflowError(f"{flag} {out} is a folder: give a file name")
        if path.exists() and not path.is_file():   # replaced or read, it would hang or be lost
            raise WorkflowError(f"{flag} {out} is not a regular file (a device, pipe or "
                                "socket): give a file name")
        folder = path.parent
        while not folder.exists() and not folder.is_symlink() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir():
            what = "a file" if folder.exists() else "a broken link"
            raise WorkflowError(f"{flag} {out}: {folder} is {what}, not a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise WorkflowError(f"{flag} {out}: the folder {folder} is not writable")
        if path.exists() and not os.access(path, os.W_OK):
            raise WorkflowError(f"{flag} {out} is not writable")
    except OSError as exc:  # e.g. a parent that cannot be searched
        raise WorkflowError(f"{flag} {out}: {exc.strerror or exc}") from None
    return path


def check_not_input(out, inputs, output: str, flag: str = "--out") -> None:
    """Refuses (WorkflowError) an ``out`` that is one of the input files ``inputs``
    ((what, path) pairs; None paths skipped): an output never replaces what the run
    reads, --overwrite or not. ``output`` names what --out is for the hint."""
    path_out = Path(out)
    for what, path in inputs:
        if path is None:
            continue
        try:
            same = path_out.samefile(path)
        except OSError:   # either one missing (or unreadable): not the same file
            same = False
        if same:
            raise WorkflowError(f"{flag} {out} is {what}: give another name for {output}")


def make_folders(out: Path) -> list[Path]:
    """Creates the missing folders of ``out`` (the lock file lives beside it) and returns
    those it created, outermost first (check_output_path checked the nearest existing
    one is a writable folder)."""
    missing, folder = [], out.parent
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    created = []
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:   # made by another run meanwhile: not ours to remove
            continue
        except OSError as exc:
            raise WorkflowError(f"--out {out}: cannot create its folder {folder} "
                                f"({exc.strerror or exc})") from None
        created.append(folder)
    return created


def remove_empty_folders(created) -> None:
    """Removes the folders make_folders ``created`` (innermost first) that the run left
    empty: a run that wrote nothing leaves no folder."""
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:
            break
