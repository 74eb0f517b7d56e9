"""The researcher's workflow as a Python API (the ``dssn`` command calls exactly these):

    from dssn_kernels import workflow
    workflow.train("model.pt", dataset="digits", sigma=0.5, epochs=60)
    workflow.certify_dataset("model.pt", "results.tsv")           # resumable
    from dssn_kernels import analysis
    print(analysis.best_table([analysis.load_result("results.tsv")]))

``certify_dataset`` shards the work over torch.distributed ranks when launched by
torchrun (see ``distributed.py``) and writes the same file a single process would.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .backends import resolve_backend
from .certify import certify
from .ops import check_margin
from .checkpoint import (CheckpointError, SmoothingSpec, default_model_kwargs, build_model,
                         file_sha256, model_from_checkpoint, read_checkpoint, save_checkpoint)
from .data import INFO, DatasetError, cohen_indices, load_dataset
from .distributed import Context
from .results import (ResultsError, ResultsWriter, consolidate, format_row, merge_rows,
                      meta_margin, part_path, read_for_resume, read_results, write_atomic)
from .training import training_noise

# Training defaults per data set: the paper's (Table 2, from Yang et al.: SGD with
# momentum 0.9, nesterov, weight decay 1e-4, lr 0.1, cosine annealing, batch 64) for
# CIFAR-10 and ImageNet; Adam with a one-cycle schedule for the small digits CNN.
TRAIN_DEFAULTS = {
    "digits": dict(epochs=60, batch_size=64, optimizer="adam", lr=2e-3, augment=False),
    "cifar10": dict(epochs=120, batch_size=64, optimizer="sgd", lr=0.1, augment=True),
    "imagenet": dict(epochs=30, batch_size=64, optimizer="sgd", lr=0.1, augment=True),
}


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


def _augment(x: torch.Tensor, generator: torch.Generator, pad: int) -> torch.Tensor:
    """Random horizontal flip, and a random crop after zero padding by ``pad`` (levels
    stay on the grid: 0 is a level)."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if pad:
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        x = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    return x


def _batches(dataset, order, batch_size, workers):
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if workers and dataset.images is None:
        # LevelDataset is map-style (len, [i] -> (uint8 image, label))
        yield from torch.utils.data.DataLoader(dataset, batch_sampler=chunks,
                                               num_workers=workers)
    else:
        for idx in chunks:
            yield dataset.get(idx)


def train(out, *, dataset: str = "digits", arch: str | None = None, sigma=None, lam=None,
          q: int | None = None, seed: int = 0, epochs: int | None = None,
          batch_size: int | None = None, lr: float | None = None, optimizer: str | None = None,
          augment: bool | None = None, train_seed: int = 0, max_train: int | None = None,
          data_root=None, device: str | None = "cpu", workers: int = 0,
          progress: bool = False) -> dict:
    """Trains a base classifier on one random DSSN variant per sample and step (the
    offsets of ``seed``, as at certification) and saves a checkpoint to ``out``.

    ``seed`` is the smoothing seed (split offsets); ``train_seed`` seeds the weights, the
    shuffling and the noise draws. Returns a summary dict (path, spec, seconds, ...).
    """
    ds = load_dataset(dataset, "train", data_root)
    info = INFO[dataset]
    if q is not None and q != ds.q:
        raise DatasetError(f"--q {q} does not fit {dataset}, whose pixels are k/{ds.q} (q={ds.q})")
    if sigma is None and lam is None:
        raise DatasetError("give the noise level: --sigma or --lam")
    try:
        spec = SmoothingSpec.create(sigma=sigma, lam=lam, q=ds.q, seed=seed,
                                    input_shape=ds.input_shape, num_classes=ds.num_classes)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"bad smoothing parameters: {exc}") from None
    defaults = TRAIN_DEFAULTS[dataset]
    arch = arch or info["arch"]
    epochs = defaults["epochs"] if epochs is None else epochs
    batch_size = defaults["batch_size"] if batch_size is None else batch_size
    optimizer = optimizer or defaults["optimizer"]
    lr = defaults["lr"] if lr is None else lr
    augment = defaults["augment"] if augment is None else augment
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise WorkflowError(f"need epochs >= 1, batch size >= 1, lr > 0 (got {epochs}, "
                           f"{batch_size}, {lr})")
    if optimizer not in ("adam", "sgd"):
        raise WorkflowError(f"unknown optimizer {optimizer!r}; choose adam or sgd")
    device = resolve_device(device)
    kwargs = default_model_kwargs(arch, ds.input_shape, ds.num_classes, info["mean"], info["std"])

    n = len(ds) if max_train is None else min(len(ds), max_train)
    if n < 1:
        raise DatasetError("no training images (check --max-train)")
    torch.manual_seed(train_seed)
    model = build_model(arch, kwargs).to(device)
    steps_per_epoch = math.ceil(n / batch_size)
    if optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr,
                                                    total_steps=epochs * steps_per_epoch)
        per_step = True
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4,
                              nesterov=True)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
        per_step = False
    g = torch.Generator().manual_seed(train_seed)
    loss_fn = nn.CrossEntropyLoss()
    pad = 4 if dataset == "cifar10" else 0
    t0 = time.perf_counter()
    model.train()
    bar = tqdm(total=epochs * steps_per_epoch, desc="train", unit="step", disable=not progress)
    last_loss = last_acc = float("nan")
    for _ in range(epochs):
        order = torch.randperm(len(ds), generator=g)[:n]
        seen = loss_sum = correct = 0
        for x, y in _batches(ds, order, batch_size, workers):
            if augment:
                x = _augment(x, g, pad)
            noisy = training_noise(x, generator=g, **spec.certify_kwargs()).to(device)
            y = y.to(device)
            logits = model(noisy)
            loss = loss_fn(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if per_step:
                sched.step()
            seen += len(y)
            loss_sum += loss.item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
            bar.update(1)
        if not per_step:
            sched.step()
        last_loss, last_acc = loss_sum / seen, correct / seen
        bar.set_postfix(loss=f"{last_loss:.3f}", acc=f"{last_acc:.3f}")
    bar.close()
    seconds = time.perf_counter() - t0
    model.eval()
    import dssn_kernels

    training = {"epochs": epochs, "batch_size": batch_size, "optimizer": optimizer, "lr": lr,
                "augment": bool(augment), "train_seed": train_seed, "num_train": n,
                "final_loss": last_loss, "final_noisy_accuracy": last_acc, "seconds": seconds,
                "device": str(device), "torch": str(torch.__version__),
                "dssn_kernels": dssn_kernels.__version__}
    path = save_checkpoint(out, model, arch=arch, model_kwargs=kwargs, spec=spec,
                           dataset=ds.identity, training=training)
    return {"path": str(path), "spec": spec, "arch": arch, "seconds": seconds,
            "final_loss": last_loss, "final_noisy_accuracy": last_acc, "num_train": n,
            "model": model}


def results_meta(checkpoint_sha256: str, spec: SmoothingSpec, dataset_identity: dict,
                 margin: float = 0.0) -> dict:
    """The header that ties a result file to its checkpoint, spec, data split and margin
    (recorded only when > 0, so files without a margin keep their format)."""
    meta = {"checkpoint_sha256": checkpoint_sha256, "spec": spec.to_dict(),
            "dataset": dict(dataset_identity)}
    if margin > 0:
        meta["margin"] = float(margin)
    return meta


def certify_dataset(checkpoint, out, *, dataset: str | None = None, split: str = "test",
                    data_root=None, skip: int = 1, max_index: int | None = None,
                    sigma=None, lam=None, q=None, seed=None, batch_size: int | None = None,
                    images_per_batch: int | None = None, backend: str = "auto",
                    device: str | None = "cpu", overwrite: bool = False, progress: bool = False,
                    dist_backend: str | None = None, context: Context | None = None,
                    margin: float = 0.0) -> dict:
    """Certifies the images of a data split (Cohen et al.'s ``skip``/``max``) with the
    checkpoint's smoothed classifier and writes the result TSV ``out`` (results.py),
    resuming an earlier run of the same checkpoint, spec, split and margin.

    ``margin`` tau >= 0: certify with ``certify(..., margin=tau)`` (votes that survive
    floating-point differences of the logits up to tau/2); the file then records tau
    and the ambiguous counts, and rows not certified even at radius 0 have radius -1/q.

    ``sigma``/``lam``/``q``/``seed``, when given, must agree with the checkpoint (else
    SpecMismatchError). Under torchrun the images are split over the ranks and rank 0
    merges their rows into ``out``. Returns a summary dict (on every rank).
    """
    ckpt = read_checkpoint(checkpoint)
    spec: SmoothingSpec = ckpt["spec_obj"]
    spec.check_agrees(sigma=sigma, lam=lam, q=q, seed=seed)
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
    meta = results_meta(file_sha256(checkpoint), spec, ds.identity, margin)
    indices = cohen_indices(len(ds), skip, max_index)
    out = Path(out)

    ctx = context or Context.from_env(device, dist_backend)
    try:
        return _certify_ranks(ctx, ckpt, spec, ds, meta, indices, out, device=device,
                              batch_size=batch_size, images_per_batch=images_per_batch,
                              backend=backend_name, overwrite=overwrite, progress=progress,
                              margin=margin)
    finally:
        if context is None:
            ctx.close()


def _certify_ranks(ctx: Context, ckpt, spec, ds, meta, indices, out: Path, *, device,
                   batch_size, images_per_batch, backend, overwrite, progress,
                   margin: float = 0.0) -> dict:
    # Every rank runs this with the same arguments (torchrun starts the same command on
    # each), so each rank certifies its shard with the same margin; the margin is in
    # `meta`, so a part file or `out` of another margin is refused on every path.
    dev = ctx.device_for(device)
    my_part = part_path(out, ctx.rank)

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

    done = set(ctx.agree(decide, USER_ERRORS, local=read_local_part))
    if my_part.exists() and ctx.distributed and not ctx.is_main:
        my_part.unlink()  # merged into `out` by rank 0 above

    todo = [i for i in indices if i not in done]
    mine = ctx.shard(todo)
    model = model_from_checkpoint(ckpt, dev)
    L = spec.L
    bs = 256 if batch_size is None else batch_size
    per_batch = images_per_batch or max(1, min(64, bs // L))
    target = my_part if ctx.distributed else out
    kw = spec.certify_kwargs()
    seconds = 0.0
    writer = ResultsWriter(target, meta)
    bar = tqdm(total=len(mine), desc=f"certify {out.name}" + (f" [rank {ctx.rank}/{ctx.world_size}]"
               if ctx.distributed else ""), unit="img", disable=not (progress and ctx.is_main))
    try:
        for b in range(0, len(mine), per_batch):
            idx = mine[b:b + per_batch]
            x, y = ds.get(idx)
            t0 = time.perf_counter()
            cert = certify(model, x.to(dev), batch_size=batch_size, backend=backend,
                           num_classes=spec.num_classes, margin=margin, **kw)
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
    return summarize(out, meta, len(mine), seconds, ctx)


def summarize(out: Path, meta: dict, certified_here: int, seconds: float, ctx: Context) -> dict:
    summary = {"out": str(out), "certified_here": certified_here, "seconds": seconds,
               "rank": ctx.rank, "world_size": ctx.world_size}
    if ctx.is_main:
        rf = read_results(out, expect_meta=meta)
        n = len(rf.rows)
        summary.update(rows=n, clean_accuracy=(sum(r.correct for r in rf.rows) / n) if n else float("nan"),
                       margin=meta_margin(meta),
                       not_certified=sum(1 for r in rf.rows if r.radius < 0))
    return summary
