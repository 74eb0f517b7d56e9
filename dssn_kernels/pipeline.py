"""The chunked vote pipeline shared by DSSN certification and the Monte Carlo baselines:
fill one reused workspace of ``batch_size`` model inputs, run the model, fold the argmax
votes into int64 counts, repeat. Memory is bounded by the workspace, whatever the number
of inputs per image; images share a forward batch when they have few inputs each."""
from __future__ import annotations

import contextlib
import math
import warnings

import torch
from tqdm.auto import tqdm

from .ops import vote_into, vote_margin_into

DEFAULT_BATCH_SIZE = 256


def check_batch_size(batch_size) -> int:
    if batch_size is None:
        return DEFAULT_BATCH_SIZE
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return batch_size


def check_logits(logits, rows: int, num_classes) -> None:
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"model must return a logits tensor [N, K], got {type(logits).__name__}")
    if logits.dim() != 2 or logits.shape[0] != rows:
        raise ValueError(f"model must return logits of shape [N, K] = [{rows}, K] for a batch "
                         f"of {rows} inputs, got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"model must return floating-point logits, got {logits.dtype}")
    if logits.shape[1] < 2:
        raise ValueError(f"model must return at least 2 class logits, got K={logits.shape[1]}")
    if num_classes is not None and logits.shape[1] != num_classes:
        raise ValueError(f"model returned K={logits.shape[1]} logits per input, "
                         f"expected {num_classes}")


_BATCH_DEPENDENT = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.modules.dropout._DropoutNd)


def warn_if_training(model) -> None:
    modules = model.modules() if isinstance(model, torch.nn.Module) else ()
    if any(isinstance(m, _BATCH_DEPENDENT) and m.training for m in modules):
        warnings.warn("the model is in training mode (dropout/batch-norm make votes depend on "
                      "the batch); call model.eval() first", stacklevel=3)


def windows(pos: int, end: int, per_image: int):
    """Splits the flat (image, input) range [pos, end) into runs of consecutive inputs:
    (first image, number of images, first input, inputs per image)."""
    while pos < end:
        b, t = divmod(pos, per_image)
        if t == 0 and end - pos >= per_image:
            n = (end - pos) // per_image
            yield b, n, 0, per_image
            pos += n * per_image
        else:
            count = min(per_image - t, end - pos)
            yield b, 1, t, count
            pos += count


class ModelCall:
    """How the model is called on a workspace batch: the input dtype (float32, or
    float16/bfloat16 for models converted to that type: the variants are then the nearest
    values of that type), ``channels_last`` memory format for 4-D input, ``autocast`` to
    run the model in reduced precision under torch.autocast, and cudnn.benchmark."""

    def __init__(self, dtype=torch.float32, channels_last=False, autocast=None,
                 cudnn_benchmark=None):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be torch.float32, float16 or bfloat16, got {dtype!r}")
        if autocast not in (None, torch.float16, torch.bfloat16):
            raise ValueError(f"autocast must be None, torch.float16 or torch.bfloat16, got {autocast!r}")
        self.dtype, self.channels_last = dtype, bool(channels_last)
        self.autocast, self.cudnn_benchmark = autocast, cudnn_benchmark

    @contextlib.contextmanager
    def session(self):
        """The context the model runs in: inference mode, and cudnn.benchmark set as asked
        (restored afterwards)."""
        previous = torch.backends.cudnn.benchmark
        if self.cudnn_benchmark is not None:
            torch.backends.cudnn.benchmark = bool(self.cudnn_benchmark)
        try:
            with torch.inference_mode():
                yield
        finally:
            torch.backends.cudnn.benchmark = previous

    def __call__(self, model, inputs):
        if self.channels_last and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        if self.autocast is None:
            return model(inputs)
        with torch.autocast(inputs.device.type, dtype=self.autocast):
            return model(inputs)


def run_votes(model, fill, *, num_images: int, per_image: int, shape, batch_size: int,
              backend: str, device, num_classes=None, progress=False, desc="certify",
              call: ModelCall | None = None, margin: float = 0.0,
              return_ambiguous: bool = False):
    """Votes of ``model`` over num_images * per_image inputs -> int64 counts [B, K].

    ``fill(out, b, t)`` writes inputs t .. t+out.shape[1]-1 of images b .. b+out.shape[0]-1
    into ``out`` ([n, count, d] of the call's dtype, a view of the workspace). Counts stay
    on the device until the end: on a GPU there is no host sync per chunk.

    ``margin`` tau > 0 (already checked, see ops.check_margin) votes with a margin
    (ops/vote.py, vote_margin_into): an input whose top logit beats the runner-up by less
    than tau votes for no class and is recorded in ``ambiguous`` [B, K] for every class it
    could go to. With ``return_ambiguous`` the result is ``(counts, ambiguous)``
    (ambiguous all zero when tau = 0, which runs the plain vote kernels).
    """
    call = call or ModelCall()
    d = math.prod(shape)
    total = num_images * per_image
    rows_max = min(batch_size, total)
    on_cpu = torch.device(device).type == "cpu"
    counts = ambiguous = None
    if margin > 0 and not return_ambiguous:
        raise ValueError("run_votes: a margin needs return_ambiguous=True (ambiguous inputs "
                         "vote for no class)")
    with call.session():
        workspace = torch.empty((rows_max, d), dtype=call.dtype, device=device)
        nan_rows = torch.zeros(1, dtype=torch.int64, device=device)
        for pos in tqdm(range(0, total, rows_max), desc=desc, unit="batch",
                        disable=not progress):
            end = min(pos + rows_max, total)
            row = 0
            for b, n, t, count in windows(pos, end, per_image):
                fill(workspace[row:row + n * count].view(n, count, d), b, t)
                row += n * count
            logits = call(model, workspace[:end - pos].view(end - pos, *shape))
            check_logits(logits, end - pos, num_classes)
            if counts is None:
                num_classes = logits.shape[1]
                counts = torch.zeros((num_images, num_classes), dtype=torch.int64,
                                     device=device)
                ambiguous = torch.zeros_like(counts) if return_ambiguous else None
            first = pos // per_image
            row0 = pos - first * per_image
            if margin > 0:
                vote_margin_into(counts[first:], ambiguous[first:], nan_rows, logits, row0,
                                 per_image, margin, backend)
            else:
                vote_into(counts[first:], nan_rows, logits, row0, per_image, backend)
            if on_cpu and nan_rows.item():
                raise ValueError(f"model returned NaN logits for {nan_rows.item()} input(s) "
                                 f"of image(s) {first}..{(end - 1) // per_image}")
    if nan_rows.item():  # devices: one sync at the end, not one per chunk
        raise ValueError(f"model returned NaN logits for {nan_rows.item()} input(s)")
    return (counts, ambiguous) if return_ambiguous else counts
