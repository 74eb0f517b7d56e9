"""``dssn certify``: certifies a data split with a checkpoint's smoothed classifier and
writes a resumable result file; under torchrun the images are sharded over the ranks
(distributed.py) and rank 0 writes the file one process would."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..backends import resolve_backend
from ..certify import certify
from ..checks import check_autocast, check_compile, check_margin
from ..spec import lam_from_sigma
from .checkpoint import SmoothingSpec, model_from_checkpoint, read_checkpoint
from .data import DatasetError, cohen_indices, load_dataset
from .distributed import Context
from .options import (USER_ERRORS, WorkflowError, check_not_input, check_output_path,
                      make_folders, remove_empty_folders, resolve_device)
from .results import (OutputLock, ResultsWriter, consolidate, format_row, mc_certificate,
                      merge_rows, meta_margin, part_path, read_for_resume, read_results, selection,
                      write_atomic)

METHODS = ("dssn", "ssn", "uniform")
MC_DEFAULTS = {"n0": 64, "n": 100_000, "alpha": 0.001}


def image_generator(noise_seed: int, idx: int, device) -> torch.Generator:
    """The Monte Carlo noise generator of image ``idx``: seeded by (noise seed, index)
    alone, so a resumed or sharded run draws every image's noise as one uninterrupted
    process does."""
    state = np.random.SeedSequence([int(noise_seed), int(idx)]).generate_state(2, np.uint32)
    seed = (int(state[0]) << 31) ^ int(state[1])   # < 2**63
    return torch.Generator(device=device).manual_seed(seed)


def _monte_carlo(method, n0, n, alpha, noise_seed, margin, *,
                 from_checkpoint: bool = False) -> dict | None:
    """The header's Monte Carlo parameters for ``method`` (None for dssn), checked;
    ``from_checkpoint``: the method is the checkpoint's training noise, not --method."""
    if method not in METHODS:
        raise WorkflowError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")
    given = {k: v for k, v in (("n0", n0), ("n", n), ("alpha", alpha)) if v is not None}
    if method == "dssn":
        flags = list(given) + ([] if noise_seed is None else ["noise-seed"])
        if flags:
            verb = "applies" if len(flags) == 1 else "apply"
            raise WorkflowError(f"--{' --'.join(flags)} {verb} to the Monte Carlo methods (--method "
                                "ssn or uniform); DSSN certificates are exact")
        return None
    noise_seed = 0 if noise_seed is None else noise_seed
    if margin:
        raise WorkflowError(
            "--margin applies to DSSN certificates only, not to "
            + (f"the Monte Carlo method {method} (the checkpoint was trained under {method} "
               "noise, so that is its default; --method dssn certifies it exactly)"
               if from_checkpoint else f"--method {method}"))
    mc = {**MC_DEFAULTS, **given}
    for k in ("n0", "n"):
        if isinstance(mc[k], bool) or not isinstance(mc[k], int) or mc[k] < 1:
            raise WorkflowError(f"--{k} must be a positive integer, got {mc[k]!r}")
    if not isinstance(mc["alpha"], float) or not 0 < mc["alpha"] < 0.5:
        raise WorkflowError(f"--alpha must lie in (0, 0.5), got {mc['alpha']!r}")
    if isinstance(noise_seed, bool) or not isinstance(noise_seed, int) or noise_seed < 0:
        raise WorkflowError(f"--noise-seed must be an integer >= 0, got {noise_seed!r}")
    return {"n0": int(mc["n0"]), "n": int(mc["n"]), "alpha": float(mc["alpha"]),
            "noise_seed": int(noise_seed)}


AUTOCAST_NAMES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
                  "fp16": torch.float16, "float16": torch.float16}


def evaluation_settings(compile=False, autocast=None) -> tuple[dict, dict]:
    """(the header's record, the certify keyword arguments) of how the model is evaluated:
    ``compile`` (False, True, a torch.compile mode or a dict of its arguments, as in
    dk.certify) and ``autocast`` (None, "bf16"/"fp16" or a torch dtype). The record is
    empty for the eager float32 model (headers of such runs are unchanged)."""
    if isinstance(autocast, str):
        if autocast not in AUTOCAST_NAMES:
            raise WorkflowError(f"bad --autocast {autocast!r}: choose bf16 or fp16")
        autocast = AUTOCAST_NAMES[autocast]
    try:
        autocast = check_autocast(autocast)
        compile = check_compile(compile)
    except (TypeError, ValueError) as exc:
        raise WorkflowError(f"bad evaluation setting: {exc}") from None
    record = {}
    if compile is not None:
        if any(not isinstance(v, (str, bool, int, float, dict, type(None)))
               for v in compile.values()):
            raise WorkflowError("compile: a result header records the torch.compile "
                                "arguments, so give them as names (a backend name, not a "
                                "callable)")
        record["compile"] = dict(compile)
    if autocast is not None:
        record["autocast"] = str(autocast).replace("torch.", "")
    return record, {"compile": compile or False, "autocast": autocast}


def results_meta(checkpoint_sha256: str, spec: SmoothingSpec, dataset_identity: dict,
                 margin: float = 0.0, selection: dict | None = None, method: str = "dssn",
                 monte_carlo: dict | None = None, evaluation: dict | None = None) -> dict:
    """The header that ties a result file to its checkpoint, spec, data split, margin
    (recorded only when > 0, so files without a margin keep their format) and selection
    of images (results.selection: --skip and --max); for a Monte Carlo method, the
    method and its n0, n, alpha and noise seed (DSSN headers are unchanged)."""
    meta = {"checkpoint_sha256": checkpoint_sha256, "spec": spec.to_dict(),
            "dataset": dict(dataset_identity)}
    if method != "dssn":
        meta["method"] = method
        meta["monte_carlo"] = dict(monte_carlo)
    if margin > 0:
        meta["margin"] = float(margin)
    if selection is not None:
        meta["selection"] = dict(selection)
    if evaluation:   # compiled or autocast: the votes are the model's as evaluated so
        meta["evaluation"] = dict(evaluation)
    return meta


def certify_dataset(checkpoint, out, *, dataset: str | None = None, split: str = "test",
                    data_root=None, skip: int = 1, max_index: int | None = None,
                    sigma=None, lam=None, q=None, seed=None, batch_size: int | None = None,
                    images_per_batch: int | None = None, backend: str = "auto",
                    device: str | None = "cpu", overwrite: bool = False, progress: bool = False,
                    dist_backend: str | None = None, context: Context | None = None,
                    margin: float = 0.0, method: str | None = None, n0: int | None = None,
                    n: int | None = None, alpha: float | None = None,
                    noise_seed: int | None = None, compile=False, autocast=None) -> dict:
    """Certifies the images of a data split (Cohen et al.'s ``skip``/``max``) with the
    checkpoint's smoothed classifier and writes the result TSV ``out`` (results.py),
    resuming an earlier run of the same checkpoint, spec, split and margin, and of the
    same or a smaller selection of images (``skip``/``max_index``; -1 or None: all). The
    run holds an exclusive lock on ``out`` (results.OutputLock): a second run on it fails
    at once, naming the first.

    ``margin`` tau >= 0: certify with ``certify(..., margin=tau)`` (votes that survive
    floating-point differences of the logits up to tau/2); the file then records tau
    and the ambiguous counts, and rows not certified even at radius 0 have radius -1/q.

    ``sigma``/``lam``/``q``/``seed``, when given, must agree with the checkpoint (else
    SpecMismatchError). Under torchrun the images are split over the ranks and rank 0
    merges their rows into ``out``. Returns a summary dict (on every rank).

    ``method``: "dssn" (exact), or "ssn" / "uniform", the Monte Carlo certificates of
    baselines.py with ``n0`` (64), ``n`` (100,000) and ``alpha`` (0.001), each image's
    noise drawn from image_generator(noise_seed, index) (``noise_seed`` 0 by default); default:
    the checkpoint's training noise. These options are refused with "dssn".

    ``compile`` / ``autocast`` ("bf16", "fp16"): how the model runs (dk.certify's
    ``compile=`` and ``autocast=``); the header records them under "evaluation", so a
    resume with other evaluation settings is refused (the votes are those of the model as
    evaluated).
    """
    out = check_output_path(out)
    check_not_input(out, [("the checkpoint", checkpoint)], "the result file")
    evaluation, evaluation_kw = evaluation_settings(compile, autocast)
    if max_index is not None and (isinstance(max_index, bool) or not isinstance(max_index, int)
                                  or max_index < -1):
        raise WorkflowError(f"--max must be an index >= 0, or -1 for all images; got {max_index}")
    ckpt = read_checkpoint(checkpoint)
    spec: SmoothingSpec = ckpt["spec_obj"]
    spec.check_agrees(sigma=sigma, lam=lam, q=q, seed=seed)
    training = ckpt.get("training") if isinstance(ckpt.get("training"), dict) else {}
    from_checkpoint = method is None
    method = method or training.get("noise", "dssn")
    if method == "none":   # a classifier trained on clean images: certified by DSSN
        method = "dssn"
    monte_carlo = _monte_carlo(method, n0, n, alpha, noise_seed, margin,
                               from_checkpoint=from_checkpoint)
    ds_name = dataset or ckpt["dataset"].get("name")
    ds = load_dataset(ds_name, split, data_root)
    if ds.q != spec.q:
        raise DatasetError(f"{ds_name} pixels are k/{ds.q}, but the checkpoint smooths at q={spec.q}")
    if tuple(ds.input_shape) != tuple(spec.input_shape):
        raise DatasetError(f"{ds_name} images are {list(ds.input_shape)}, the checkpoint's model "
                           f"takes {list(spec.input_shape)}")
    if len(ds) and int(ds.labels.max()) >= spec.num_classes:
        raise DatasetError(f"{ds_name} has labels up to {int(ds.labels.max())}, the checkpoint's "
                           f"model has {spec.num_classes} classes")
    device = resolve_device(device)
    try:
        backend_name = resolve_backend(backend, device) if backend != "auto" else backend
    except (ValueError, RuntimeError) as exc:
        raise WorkflowError(str(exc)) from None
    try:
        margin = check_margin(margin)
    except (TypeError, ValueError) as exc:
        raise WorkflowError(f"bad --margin: {exc}") from None
    indices = cohen_indices(len(ds), skip, max_index)
    if not indices:
        raise WorkflowError(f"no images selected: --max {max_index} selects none of the "
                            f"{len(ds)} images (-1 selects all)" if len(ds) else
                            f"{ds_name} {split} has no images")
    stop = len(ds) if max_index is None or max_index < 0 else min(len(ds), max_index)
    meta = results_meta(ckpt["sha256"], spec, ds.identity, margin,
                        selection(skip, stop), method, monte_carlo, evaluation)
    if training.get("stability") or training.get("noise", "dssn") != "dssn":
        # the model's training, for analyze's rows (DSSN-trained headers are unchanged)
        meta["training"] = {"noise": training.get("noise", "dssn"),
                            "stability": bool(training.get("stability"))}

    ctx = context or Context.from_env(device, dist_backend)
    try:
        return _certify_ranks(ctx, ckpt, spec, ds, meta, indices, out, device=device,
                              batch_size=batch_size, images_per_batch=images_per_batch,
                              backend=backend_name, overwrite=overwrite, progress=progress,
                              margin=margin, method=method, monte_carlo=monte_carlo,
                              evaluation_kw=evaluation_kw)
    finally:
        if context is None:
            ctx.close()


def _certify_ranks(ctx: Context, ckpt, spec, ds, meta, indices, out: Path, **kw) -> dict:
    # Rank 0 locks `out` for the whole run, from before the consolidation (creating the
    # folder) to the merge: it alone writes `out`; the other ranks write part files named
    # after their rank, and stop with rank 0's refusal before reading or writing any.
    lock = OutputLock(out)
    created = []   # the missing folders of `out` made for it (rank 0)
    try:
        return _certify_shards(ctx, lock, created, ckpt, spec, ds, meta, indices, out, **kw)
    finally:
        lock.release()
        remove_empty_folders(created)   # a run that wrote nothing leaves no folder


def _certify_shards(ctx: Context, lock: OutputLock, created: list, ckpt, spec, ds, meta, indices,
                    out: Path, *,
                    device, batch_size, images_per_batch, backend, overwrite, progress,
                    margin: float = 0.0, method: str = "dssn",
                    monte_carlo: dict | None = None, evaluation_kw: dict | None = None) -> dict:
    # Every rank runs this with the same arguments (torchrun starts the same command on
    # each), so each rank certifies its shard with the same margin; the margin is in
    # `meta`, so a part file or `out` of another margin is refused on every path.
    dev = ctx.device_for(device)
    my_part = part_path(out, ctx.rank)
    # the model first: weights that do not fit, or a model that does not take the spec's
    # images (model_from_checkpoint), are refused before any file is created or changed
    model = model_from_checkpoint(ckpt, dev)

    # 1. Consolidate: rank 0 checks `out` and merges leftovers of an interrupted run
    #    (its own visible part files and the part each rank finds locally).
    def read_local_part():
        if overwrite or not ctx.distributed or ctx.is_main:
            return None  # rank 0's parts are found by consolidate()
        rf = read_for_resume(my_part, meta)
        return None if rf is None else rf.source()

    def decide(gathered):
        extra = [g for g in gathered if g is not None]
        done = consolidate(out, meta, extra, overwrite=overwrite)
        return sorted(done)

    started = [False]   # True when this run creates `out` (rank 0)

    def take_lock(_):
        created.extend(make_folders(out))
        lock.acquire()
        started[0] = not out.exists()

    # 0. Rank 0 locks `out` before any rank reads (or trims) a part file another run may
    #    still be writing; a refusal stops every rank here.
    ctx.agree(take_lock, USER_ERRORS)
    done = set(ctx.agree(decide, USER_ERRORS, local=read_local_part))
    if my_part.exists() and ctx.distributed and not ctx.is_main:
        my_part.unlink()  # merged into `out` by rank 0 above

    todo = [i for i in indices if i not in done]
    mine = ctx.shard(todo)
    L = spec.L
    bs = 256 if batch_size is None else batch_size
    per_batch = images_per_batch or max(1, min(64, bs // L))
    if monte_carlo is not None:
        per_batch = 1   # one image per call: its own noise generator
    target = my_part if ctx.distributed else out
    kw = {**spec.certify_kwargs(), **(evaluation_kw or {})}
    seconds = 0.0
    writer = ResultsWriter(target, meta)
    bar = tqdm(total=len(mine), desc=f"certify {out.name}" + (f" [rank {ctx.rank}/{ctx.world_size}]"
               if ctx.distributed else ""), unit="img", disable=not (progress and ctx.is_main))
    try:
        for b in range(0, len(mine), per_batch):
            idx = mine[b:b + per_batch]
            x, y = ds.get(idx)
            try:
                if monte_carlo is not None:
                    lines = _mc_rows(model, x, y, idx, spec, dev, method, monte_carlo,
                                     batch_size, evaluation_kw or {})
                else:
                    t0 = time.perf_counter()
                    cert = certify(model, x.to(dev), batch_size=batch_size, backend=backend,
                                   num_classes=spec.num_classes, margin=margin, **kw)
            except ValueError as exc:   # the model's output refused (NaN logits, ...)
                kept = f"the rows before them are kept in {target}"
                if b == 0 and not done and not ctx.distributed:   # the file holds no row
                    kept = f"{target} holds no rows"
                    if started[0]:   # and is this run's new file (nothing was merged in)
                        writer.close()
                        target.unlink()
                        kept = f"nothing was written to {target}"
                raise WorkflowError(f"certifying images {idx[0]}..{idx[-1]}: {exc}; "
                                    f"{kept}") from None
            if monte_carlo is not None:
                seconds += sum(float(line.split("\t")[5]) for line in lines)
                writer.write(lines)
                bar.update(len(idx))
                continue
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            dt = time.perf_counter() - t0
            seconds += dt
            counts = cert.counts.cpu().tolist()
            pred = cert.prediction.cpu().tolist()
            radius = cert.radius.cpu().tolist()
            # the two margin columns (results.py), or None for a file without a margin
            num_amb, amb = ((cert.num_ambiguous.cpu().tolist(), cert.ambiguous.cpu().tolist())
                            if margin > 0 else ([None] * len(idx),) * 2)
            lines = [format_row(i, int(lbl), p, r, dt / len(idx), c, num_ambiguous=n, ambiguous=a)
                     for i, lbl, p, r, c, n, a in zip(idx, y.tolist(), pred, radius, counts,
                                                      num_amb, amb)]
            writer.write(lines)
            bar.update(len(idx))
    finally:
        bar.close()
        writer.close()

    # 2. Merge: rank 0 folds every rank's rows into `out`, sorted by index.
    if ctx.distributed:
        def my_rows():
            rf = read_for_resume(my_part, meta)
            return None if rf is None else rf.source(f"rank {ctx.rank}")

        def merge(gathered):
            existing = read_for_resume(out, meta)
            sources = [] if existing is None else [existing.source()]
            sources += [g for g in gathered if g is not None]
            write_atomic(out, meta, merge_rows(sources))
            return None

        ctx.agree(merge, USER_ERRORS, local=my_rows)
        if my_part.exists():
            my_part.unlink()  # its rows are in `out` now
    return summarize(out, meta, len(mine), seconds, ctx, certified=len(todo))


def _mc_rows(model, x, y, idx, spec, dev, method, mc, batch_size,
             evaluation_kw=None) -> list[str]:
    """Rows of Monte Carlo certificates (baselines.certify_ssn / certify_uniform), one
    image at a time, each with its own generator; prediction and radius by
    results.mc_certificate, the rule read_results checks."""
    from .baselines import certify_ssn, certify_uniform

    fn = certify_ssn if method == "ssn" else certify_uniform
    pixels = x.to(dev).float() / spec.q
    lam = lam_from_sigma(spec.sigma_value)
    lines = []
    for j, i in enumerate(idx):
        t0 = time.perf_counter()
        cert = fn(model, pixels[j:j + 1], sigma=spec.sigma_value, n0=mc["n0"], n=mc["n"],
                  alpha=mc["alpha"], batch_size=batch_size,
                  generator=image_generator(mc["noise_seed"], i, dev), **(evaluation_kw or {}))
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        dt = time.perf_counter() - t0
        counts, sel = cert.counts[0].tolist(), cert.selection_counts[0].tolist()
        pred, radius, _ = mc_certificate(counts, sel, lam, mc["alpha"])
        lines.append(format_row(i, int(y[j]), pred, radius, dt, counts, selection=sel))
    return lines


def summarize(out: Path, meta: dict, certified_here: int, seconds: float, ctx: Context,
              certified: int | None = None) -> dict:
    """``certified``: the images certified by every rank together (default: this rank's)."""
    summary = {"out": str(out), "certified_here": certified_here, "seconds": seconds,
               "certified": certified_here if certified is None else certified,
               "rank": ctx.rank, "world_size": ctx.world_size}
    if ctx.is_main:
        rf = read_results(out, expect_meta=meta)
        n = len(rf.rows)
        summary.update(rows=n, clean_accuracy=(sum(r.correct for r in rf.rows) / n) if n else float("nan"),
                       margin=meta_margin(meta),
                       not_certified=sum(1 for r in rf.rows if r.radius < 0))
    return summary
