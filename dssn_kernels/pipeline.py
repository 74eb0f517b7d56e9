"""The chunked vote pipeline shared by DSSN certification, early exit and the Monte
Carlo baselines: fill one reused workspace of ``batch_size`` model inputs, run the model,
fold the argmax votes into int64 counts, repeat. Memory is bounded by the workspace,
whatever the number of inputs per image; images share a forward batch when they have
few inputs each. ``VoteRounds`` is the body of every such loop (one round: fill,
forward, check the logits, vote, count NaN rows); ``run_votes`` is the loop over every
input of every image (certify, the baselines), early exit has its own plan of rounds, and
``logit_drift`` (drift.py) runs the same rounds without the vote (``VoteRounds.logits``)."""
from __future__ import annotations

import contextlib
import math

import torch
from tqdm.auto import tqdm

from .checks import check_autocast, check_compile, check_model_dtype
from .ops import vote_into, vote_margin_into


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


def fill_range(fill, pos: int, end: int, per_image: int):
    """The round fill (``VoteRounds.round`` / ``logits``) that writes the flat
    (image, input) range [pos, end) into a block of end - pos rows, window by window
    (``windows``): ``fill(out, b, t)`` writes inputs t .. t+out.shape[1]-1 of images
    b .. b+out.shape[0]-1 into ``out`` ([n, count, d], a view of the block)."""
    def fill_block(block):
        row, d = 0, block.shape[1]
        for b, n, t, count in windows(pos, end, per_image):
            fill(block[row:row + n * count].view(n, count, d), b, t)
            row += n * count
    return fill_block


# Compiled base models live in the model object itself, in its __dict__ under this name
# (not an nn.Module attribute: no submodule, no state_dict entry): {key: compiled}, the key
# holding the torch.compile arguments, the input shape (rows included), dtype, device,
# autocast dtype and memory format. The compiled module refers back to the model, a cycle
# the garbage collector frees with the model (a WeakKeyDictionary would keep the model
# alive through its value). Callables without a __dict__ are compiled at every run.
COMPILED_ATTR = "_dssn_compiled"


class CompiledCache(dict):
    """The compiled forms of one model; copied or pickled with the model as empty (they
    are recompiled when needed)."""

    def __reduce__(self):
        return (CompiledCache, ())

    def __deepcopy__(self, memo):
        return CompiledCache()


def compiled_cache(model) -> dict:
    """The model's CompiledCache (created at the first call), or a fresh dict when the
    model has no __dict__ to hold it."""
    try:
        attrs = vars(model)
    except TypeError:
        return {}
    cache = attrs.get(COMPILED_ATTR)
    if not isinstance(cache, CompiledCache):
        try:
            cache = attrs[COMPILED_ATTR] = CompiledCache()
        except TypeError:  # a read-only mapping
            return {}
    return cache


def compiled_model(model, compile: dict, *, rows: int, shape, dtype, device, autocast=None,
                   channels_last=False):
    """``torch.compile(model, dynamic=False, **compile)``, cached for the life of ``model``
    per (arguments, [rows, *shape], dtype, device, autocast, channels_last): a run, and
    every later run at the same shape, compiles the model once. ``compile`` is checked
    (checks.check_compile); ``{}`` picks "reduce-overhead" (CUDA graphs) on CUDA and the
    default mode elsewhere. Returns (the compiled model, whether it runs CUDA graphs)."""
    kwargs = dict(compile)
    cuda_inductor = torch.device(device).type == "cuda" \
        and kwargs.get("backend", "inductor") == "inductor"
    if cuda_inductor and "mode" not in kwargs and "options" not in kwargs:
        kwargs["mode"] = "reduce-overhead"
    key = (tuple(sorted((k, v if isinstance(v, (str, bool, type(None))) else repr(v))
                        for k, v in kwargs.items())),
           (rows, *tuple(shape)), dtype, str(torch.device(device)), autocast,
           bool(channels_last))
    cache = compiled_cache(model)
    if key not in cache:
        cache[key] = torch.compile(model, dynamic=False, **kwargs)
    return cache[key], cuda_inductor and kwargs.get("mode") == "reduce-overhead"


class ModelCall:
    """How the model is called on a workspace batch: the input dtype (float32, or
    float16/bfloat16 for models converted to that type: the variants are then the nearest
    values of that type), ``channels_last`` memory format for 4-D input, ``autocast`` to
    run the model in reduced precision under torch.autocast, cudnn.benchmark, and
    ``compile`` (None, or torch.compile's arguments: checks.check_compile): the model is
    compiled once for the workspace's static shape and every forward, the last partial
    one included, runs on the whole workspace (the rows past the batch are padding and
    never vote)."""

    def __init__(self, dtype=torch.float32, channels_last=False, autocast=None,
                 cudnn_benchmark=None, compile=None):
        """Takes checked options: the entry points build it with ``checked``."""
        self.dtype, self.channels_last = dtype, bool(channels_last)
        self.autocast, self.cudnn_benchmark = autocast, cudnn_benchmark
        self.compile = compile
        self._cudagraphs = False   # set by prepare

    @classmethod
    def checked(cls, dtype=torch.float32, channels_last=False, autocast=None,
                cudnn_benchmark=None, compile=False) -> "ModelCall":
        """The options as the user passed them, checked (checks.py)."""
        return cls(check_model_dtype(dtype), channels_last, check_autocast(autocast),
                   cudnn_benchmark, check_compile(compile))

    @property
    def padded(self) -> bool:
        """Whether every forward runs at the workspace's full shape (compiled models)."""
        return self.compile is not None

    def workspace_rows(self, batch_size: int, total: int) -> int:
        """Rows of the workspace for ``total`` inputs at forward batch ``batch_size``: the
        batch size itself when compiled (one shape for every run at that batch size), else
        no more than the inputs."""
        return batch_size if self.padded else min(batch_size, total)

    def prepare(self, model, *, rows: int, shape, device):
        """The callable the forwards of a run use: ``model`` itself, or its compiled form
        for inputs [rows, *shape] (compiled_model)."""
        if self.compile is None:
            return model
        compiled, self._cudagraphs = compiled_model(
            model, self.compile, rows=rows, shape=shape, dtype=self.dtype, device=device,
            autocast=self.autocast, channels_last=self.channels_last)
        return compiled

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
        if self._cudagraphs:
            # CUDA graphs reuse their output buffers: the last logits were voted already
            torch.compiler.cudagraph_mark_step_begin()
        if self.autocast is None:
            return model(inputs)
        with torch.autocast(inputs.device.type, dtype=self.autocast):
            return model(inputs)


class VoteRounds:
    """The body of every vote loop, one forward batch ("round") at a time: one workspace
    of ``rows_max`` model inputs, allocated once and reused; per round, fill its first
    rows, run the model on them, check the logits, vote into int64 counts
    [num_images, K] (allocated at the first round, when K is known) and count the rows
    with a NaN logit. Used as a context manager: the model runs inside
    ``call.session()``.

    ``margin`` tau > 0 (already checked, see checks.check_margin) votes with a margin
    (ops/vote.py, vote_margin_into) into ``counts`` and ``ambiguous``; ``ambiguous`` is
    kept (all zero when tau = 0) with ``keep_ambiguous`` or a margin, else None.
    """

    def __init__(self, model, *, shape, rows_max: int, num_images: int, backend: str,
                 device, num_classes=None, call: ModelCall | None = None,
                 margin: float = 0.0, keep_ambiguous: bool = False):
        self.model, self.call = model, call or ModelCall()
        self.shape, self.d = tuple(shape), math.prod(shape)
        self.rows_max, self.num_images = rows_max, num_images
        self.backend, self.device = backend, device
        self.num_classes, self.margin = num_classes, margin
        self.keep_ambiguous = keep_ambiguous or margin > 0
        self.counts = self.ambiguous = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "VoteRounds":
        self._stack.enter_context(self.call.session())
        # padded rows hold zeros until a round writes them (never uninitialized memory)
        alloc = torch.zeros if self.call.padded else torch.empty
        self.workspace = alloc((self.rows_max, self.d), dtype=self.call.dtype,
                               device=self.device)
        self.forward = self.call.prepare(self.model, rows=self.rows_max, shape=self.shape,
                                         device=self.device)
        self.nan_rows = torch.zeros(1, dtype=torch.int64, device=self.device)
        return self

    def __exit__(self, *exc):
        return self._stack.__exit__(*exc)

    def logits(self, rows: int, fill) -> torch.Tensor:
        """The forward of one round, without the vote: ``fill(block)`` writes ``rows``
        inputs into ``block``, the first ``rows`` rows of the workspace ([rows, d] of the
        call's dtype); the model runs on them (on the whole workspace when compiled) and
        its checked logits of those rows are returned ([rows, K], as the model returned
        them). ``round`` votes them; ``logit_drift`` keeps them."""
        block = self.workspace[:rows]
        fill(block)
        if self.call.padded:  # the whole workspace, one static shape; padding never votes
            logits = self.call(self.forward, self.workspace.view(self.rows_max, *self.shape))
            check_logits(logits, self.rows_max, self.num_classes)
            return logits[:rows]
        logits = self.call(self.forward, block.view(rows, *self.shape))
        check_logits(logits, rows, self.num_classes)
        return logits

    def round(self, rows: int, fill, *, first: int = 0, row0: int = 0, per_image: int = 1,
              image_of_row: torch.Tensor | None = None) -> None:
        """One round of ``rows`` inputs: ``logits(rows, fill)``, then the vote. Row r votes
        for image first + (row0 + r) // per_image, or, when ``image_of_row`` (LongTensor
        [rows] on the device) is given, for image image_of_row[r]. Counts stay on the
        device: no host sync."""
        logits = self.logits(rows, fill)
        if self.counts is None:
            self._allocate(logits.shape[1])
        if image_of_row is None:
            amb = None if self.ambiguous is None else self.ambiguous[first:]
            self._vote(self.counts[first:], amb, logits, row0, per_image)
            return
        # one vote row per input, then added into its image's counts
        K = logits.shape[1]
        votes = torch.zeros((rows, K), dtype=torch.int64, device=self.device)
        amb = torch.zeros_like(votes) if self.margin > 0 else None
        self._vote(votes, amb, logits, 0, 1)
        if amb is not None:
            self.ambiguous.index_add_(0, image_of_row, amb)
        self.counts.index_add_(0, image_of_row, votes)

    def _vote(self, counts, ambiguous, logits, row0: int, per_image: int) -> None:
        if self.margin > 0:
            vote_margin_into(counts, ambiguous, self.nan_rows, logits, row0, per_image,
                             self.margin, self.backend)
        else:
            vote_into(counts, self.nan_rows, logits, row0, per_image, self.backend)

    def _allocate(self, K: int) -> None:
        self.counts = torch.zeros((self.num_images, K), dtype=torch.int64, device=self.device)
        self.ambiguous = torch.zeros_like(self.counts) if self.keep_ambiguous else None

    def raise_if_nan(self, images: tuple[int, int] | None = None) -> None:
        """ValueError if a row so far held a NaN logit (reading the counter is a host sync
        on a GPU); ``images`` (first, last) names the images of the round."""
        n = self.nan_rows.item()
        if n:
            where = f" of image(s) {images[0]}..{images[1]}" if images is not None else ""
            raise ValueError(f"model returned NaN logits for {n} input(s){where}")

    def result(self):
        """(counts, ambiguous): int64 [num_images, K], ambiguous None unless kept. If the
        model never ran, zeros with K = num_classes (0 when that is None too)."""
        if self.counts is None:
            self._allocate(self.num_classes or 0)
        return self.counts, self.ambiguous


def run_votes(model, fill, *, num_images: int, per_image: int, shape, batch_size: int,
              backend: str, device, num_classes=None, progress=False, desc="certify",
              call: ModelCall | None = None, margin: float = 0.0,
              return_ambiguous: bool = False):
    """Votes of ``model`` over num_images * per_image inputs -> int64 counts [B, K].

    ``fill(out, b, t)`` writes inputs t .. t+out.shape[1]-1 of images b .. b+out.shape[0]-1
    into ``out`` ([n, count, d] of the call's dtype, a view of the workspace). Counts stay
    on the device until the end: on a GPU there is no host sync per chunk.

    ``margin`` tau > 0 (already checked, see checks.check_margin) votes with a margin
    (VoteRounds): an input whose top logit beats the runner-up by less than tau votes for
    no class and is recorded in ``ambiguous`` [B, K] for every class it could go to. With
    ``return_ambiguous`` the result is ``(counts, ambiguous)`` (ambiguous all zero when
    tau = 0, which runs the plain vote kernels).
    """
    if margin > 0 and not return_ambiguous:
        raise ValueError("run_votes: a margin needs return_ambiguous=True (ambiguous inputs "
                         "vote for no class)")
    call = call or ModelCall()
    total = num_images * per_image
    rows_max = call.workspace_rows(batch_size, total)
    on_cpu = torch.device(device).type == "cpu"
    rounds = VoteRounds(model, shape=shape, rows_max=rows_max, num_images=num_images,
                        backend=backend, device=device, num_classes=num_classes, call=call,
                        margin=margin, keep_ambiguous=return_ambiguous)
    with rounds:
        for pos in tqdm(range(0, total, rows_max), desc=desc, unit="batch",
                        disable=not progress):
            end = min(pos + rows_max, total)
            first = pos // per_image
            rounds.round(end - pos, fill_range(fill, pos, end, per_image), first=first,
                         row0=pos - first * per_image, per_image=per_image)
            if on_cpu:
                rounds.raise_if_nan((first, (end - 1) // per_image))
    rounds.raise_if_nan()  # devices: one sync at the end, not one per chunk
    counts, ambiguous = rounds.result()
    return (counts, ambiguous) if return_ambiguous else counts
