"""The chunked vote pipeline shared by DSSN certification and the Monte Carlo baselines:
fill one reused workspace of ``batch_size`` model inputs, run the model, fold the argmax
votes into int64 counts, repeat. Memory is bounded by the workspace, whatever the number
of inputs per image; images share a forward batch when they have few inputs each."""
from __future__ import annotations

import warnings

import torch
from tqdm.auto import tqdm

from .ops import vote_into

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


def run_votes(model, fill, *, num_images: int, per_image: int, shape, batch_size: int,
              backend: str, device, num_classes=None, progress=False,
              desc="certify") -> torch.Tensor:
    """Votes of ``model`` over num_images * per_image inputs -> int64 counts [B, K].

    ``fill(out, b, t)`` writes inputs t .. t+out.shape[1]-1 of images b .. b+out.shape[0]-1
    into ``out`` (float32 [n, count, d], a view of the workspace).
    """
    d = 1
    for s in shape:
        d *= s
    total = num_images * per_image
    rows_max = min(batch_size, total)
    counts = None
    with torch.inference_mode():
        workspace = torch.empty((rows_max, d), dtype=torch.float32, device=device)
        nan_rows = torch.zeros(1, dtype=torch.int64, device=device)
        for pos in tqdm(range(0, total, rows_max), desc=desc, unit="batch", disable=not progress):
            end = min(pos + rows_max, total)
            row = 0
            for b, n, t, count in windows(pos, end, per_image):
                fill(workspace[row:row + n * count].view(n, count, d), b, t)
                row += n * count
            logits = model(workspace[:end - pos].view(end - pos, *shape))
            check_logits(logits, end - pos, num_classes)
            if counts is None:
                num_classes = logits.shape[1]
                counts = torch.zeros((num_images, num_classes), dtype=torch.int64, device=device)
            first = pos // per_image
            vote_into(counts[first:], nan_rows, logits, pos - first * per_image, per_image, backend)
            if torch.device(device).type == "cpu" and nan_rows.item():
                raise ValueError(f"model returned NaN logits for {nan_rows.item()} input(s) "
                                 f"of image(s) {first}..{(end - 1) // per_image}")
    if nan_rows.item():  # devices: one sync at the end, not one per chunk
        raise ValueError(f"model returned NaN logits for {nan_rows.item()} input(s)")
    return counts
