"""``dssn train``: trains a base classifier under DSSN noise and writes a checkpoint.

After every epoch the whole training state (weights, optimizer, scheduler, epoch, random
generators) is written atomically beside the output, ``OUT.train-state``; ``resume=True``
(``dssn train --resume``) continues from it, ending with the very weights an
uninterrupted run gives (bit for bit on the CPU). The file is removed once the
checkpoint is written. A training holds ``OUT.lock`` (results.OutputLock, as ``dssn
certify`` does) for its whole run: a second training into the same ``out`` fails at once.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..noises import NOISES
from ..training import stability_loss, training_noise
from .checkpoint import (CheckpointError, SmoothingSpec, build_model, default_model_kwargs, plain,
                         save_checkpoint)
from .data import INFO, DatasetError, load_dataset
from .options import (WorkflowError, check_output_path, make_folders, remove_empty_folders,
                      resolve_device)
from .results import OutputLock, _diff, replaced_atomically

STATE_FORMAT = "dssn-train-state/1"

# Training defaults per data set: the paper's (Table 2, from Yang et al.: SGD with
# momentum 0.9, nesterov, weight decay 1e-4, lr 0.1, cosine annealing, batch 64) for
# CIFAR-10 and ImageNet; Adam with a one-cycle schedule for the small digits CNN.
TRAIN_DEFAULTS = {
    "digits": dict(epochs=60, batch_size=64, optimizer="adam", lr=2e-3, augment=False),
    "cifar10": dict(epochs=120, batch_size=64, optimizer="sgd", lr=0.1, augment=True),
    "imagenet": dict(epochs=30, batch_size=64, optimizer="sgd", lr=0.1, augment=True),
}


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
        try:
            yield from torch.utils.data.DataLoader(dataset, batch_sampler=chunks,
                                                   num_workers=workers)
        except DatasetError as exc:
            # a worker's error comes back with the worker's traceback in its message, the
            # error's own line last ("...DatasetError: cannot read image ..."): keep that
            last = (str(exc).strip().splitlines() or [""])[-1]
            raise DatasetError(last.split("DatasetError: ", 1)[-1]) from None
    else:
        for idx in chunks:
            yield dataset.get(idx)


def _noise_settings(noise: str, stability: bool, weight: float) -> dict:
    """The training noise and stability training as the checkpoint's ``training`` dict
    and the resume check record them (the weight only with stability training)."""
    d = {"noise": noise, "stability": stability}
    if stability:
        d["stability_weight"] = weight
    return d


AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _precision_settings(compile, autocast) -> dict:
    """``--compile`` / ``--autocast`` as the checkpoint's ``training`` dict and the resume
    check record them: nothing when neither is given (a plain training's records are as
    before), else ``compile`` (True, or the torch.compile arguments given as a dict) and
    ``autocast`` ("bf16", "fp16" or None)."""
    if compile is None and autocast is None:
        return {}
    if compile is not None and compile != {}:
        compile = {k: (v if isinstance(v, (str, int, float, bool, dict, type(None)))
                       else repr(v)) for k, v in compile.items()}
    return {"compile": compile == {} or (compile or False), "autocast": autocast}


def _check_precision(compile, autocast, device) -> tuple:
    """(torch.compile arguments or None, autocast name or None) of a training, checked
    against the device: fp16 autocast trains with a GradScaler on CUDA only."""
    from ..checks import check_compile

    try:
        compile = check_compile(compile)
    except (TypeError, ValueError) as exc:
        raise WorkflowError(f"--compile: {exc}") from None
    if autocast is not None and autocast not in AUTOCAST:
        raise WorkflowError(f"--autocast must be bf16 or fp16, got {autocast!r}")
    if autocast == "fp16" and torch.device(device).type != "cuda":
        raise WorkflowError(f"--autocast fp16 trains on a CUDA device only (with a gradient "
                            f"scaler), not on {device}; use --autocast bf16 there")
    return compile, autocast


def state_path(out) -> Path:
    """Where the resumable training state of a training into ``out`` is kept."""
    out = Path(out)
    return out.with_name(out.name + ".train-state")


def _after_epoch(epoch: int) -> None:
    """Called after each epoch, once its state is saved (a hook: tests interrupt here).
    The denoiser's training imports this one: a test patches the name in the module it
    runs (``trainer._after_epoch`` or ``denoiser._after_epoch``)."""


def _check_writable(out: Path) -> None:
    """Fails before training rather than after it: a file can be created beside ``out``
    (when its folder exists; check_output_path checked the ancestors of a missing one)."""
    if not out.parent.is_dir():
        return
    try:
        fd, probe = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise WorkflowError(f"--out {out}: cannot write in {out.parent} "
                            f"({exc.strerror or exc})") from None


def _save_state(path: Path, state: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with replaced_atomically(path, "wb") as f:
            torch.save(state, f)
    except OSError as exc:   # name the user's file, not the temporary one
        raise WorkflowError(f"cannot write the training state {path}: "
                            f"{exc.strerror or exc}") from None


def _read_state(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001  (a damaged file: say so, never torch's advice)
        state = None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise WorkflowError(f"{path} is not a readable dssn training state (damaged?); "
                            "nothing was changed: pass --overwrite without --resume to start "
                            "again")
    return state


def _rng_state(generator: torch.Generator, on_cuda: bool) -> dict:
    """The random state a training state keeps, for ``_resume`` to restore."""
    return {"generator": generator.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if on_cuda else None}


def _resume(state_file: Path, settings: dict, generator: torch.Generator, restore, *,
            resume: bool, command: str) -> tuple:
    """Where a training starts: ``(epoch, seconds, last_loss, last_acc)``, read from
    ``state_file`` when resuming (``restore(state)`` loads the weights and optimizers) and
    the settings match, else from epoch 1."""
    start, seconds_before = 0, 0.0
    last_loss = last_acc = float("nan")
    if resume and state_file.exists():
        state = _read_state(state_file)
        diffs = [d.replace(" (file) vs ", " (saved) vs ")
                 for d in _diff(state.get("settings"), settings)]
        if diffs:
            raise WorkflowError(
                f"{state_file} holds a different training ({'; '.join(diffs)}); nothing was "
                "changed: rerun with its options to resume it, or pass --overwrite without "
                "--resume to start again")
        try:
            restore(state)
            rng = state["rng"]
            generator.set_state(rng["generator"])
            torch.set_rng_state(rng["torch"])
            if rng.get("cuda") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
            start, seconds_before = int(state["epoch"]), float(state["seconds"])
            last_loss, last_acc = float(state["last_loss"]), float(state["last_acc"])
        except (KeyError, RuntimeError, TypeError, ValueError) as exc:
            raise WorkflowError(f"{state_file} does not fit this training ({exc}); nothing was "
                                "changed: pass --overwrite without --resume to start again") from None
    elif resume:
        print(f"dssn {command}: no training state {state_file} to resume: starting from epoch 1",
              file=sys.stderr, flush=True)
    return start, seconds_before, last_loss, last_acc


def _check_out(out: Path, *, overwrite: bool, resume: bool) -> Path:
    """The state file of a training into ``out``, refused where ``out`` exists without
    ``overwrite``, or an interrupted training waits there without ``resume`` or
    ``overwrite`` (called under the lock: another run may be writing them)."""
    state_file = state_path(out)
    if out.exists() and not overwrite:
        raise WorkflowError(f"{out} exists; nothing was changed: choose another --out, or pass "
                            "--overwrite to replace it")
    if state_file.exists() and not (resume or overwrite):
        raise WorkflowError(f"{state_file} holds an interrupted training of {out.name}; nothing "
                            "was changed: pass --resume to continue it, or --overwrite to start "
                            "again")
    return state_file


@contextlib.contextmanager
def _open_out(out, *, overwrite: bool, resume: bool, what: str):
    """``with _open_out(...) as (out, state file)``: a training's output, held under an
    exclusive lock for the whole ``with`` (results.OutputLock, ``OUT.lock``, as ``dssn
    certify`` holds; ``what`` names the command to a second run, which fails at once).
    Refused first where nothing can be written beside ``out``; the lock is then taken
    before ``out`` or its state file is looked at, so two runs can never both write them;
    then the training is refused where ``out`` exists without ``overwrite``, or an
    interrupted training waits there without ``resume`` or ``overwrite``. On leaving, the
    lock is released (its file removed) and the missing folders of ``out`` created for it
    are removed again where the run left nothing in them."""
    out = check_output_path(out)
    _check_writable(out)
    created = make_folders(out)
    lock = OutputLock(out, what=what)
    try:
        lock.acquire()
        yield out, _check_out(out, overwrite=overwrite, resume=resume)
    finally:
        lock.release()
        remove_empty_folders(created)   # a run that wrote nothing leaves no folder


def _finish(out: Path, state_file: Path, model: nn.Module, **checkpoint) -> Path:
    """Saves the trained ``model`` to ``out`` (save_checkpoint's ``checkpoint`` fields) and
    then drops ``state_file``: the checkpoint holds the result now."""
    try:
        path = save_checkpoint(out, model, **checkpoint)
    except OSError as exc:
        raise WorkflowError(f"cannot write {out}: {exc.strerror or exc}; the trained model is "
                            f"kept in {state_file}: rerun with --resume to write it") from None
    state_file.unlink(missing_ok=True)
    return path


def _check_not_diverged(epoch: int, **modules) -> None:
    """WorkflowError when a weight or buffer of ``modules`` (name=module; None skipped) is
    NaN or infinite after ``epoch``: the training diverged. Called before the epoch's state
    is saved, so the state file keeps the last good epoch and nothing is written to the
    output (a checkpoint of NaN weights would only be refused by certify later)."""
    for what, module in modules.items():
        if module is None:
            continue
        for name, t in module.state_dict().items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise WorkflowError(
                    f"the training diverged in epoch {epoch}: the {what}'s {name} holds NaN or "
                    "infinite values; nothing was written to the output: start again with a "
                    "lower --lr (and --overwrite)")


@contextlib.contextmanager
def _overflow_is_divergence(epoch: int):
    """An optimizer step that overflows float32 (Adam's step lr / (1 - beta1**t) with a
    huge --lr) raises a RuntimeError in torch: the training diverged, said in one line."""
    try:
        yield
    except RuntimeError as exc:
        if "overflow" not in str(exc):
            raise
        raise WorkflowError(f"the training diverged in epoch {epoch}: the optimizer step "
                            f"overflowed ({str(exc).splitlines()[0]}); nothing was written to "
                            "the output: start again with a lower --lr (and --overwrite)") from None


def _weights(module: nn.Module) -> dict:
    """A CPU copy of ``module``'s weights, for a training state."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def train(out, *, dataset: str = "digits", arch: str | None = None, sigma=None, lam=None,
          q: int | None = None, seed: int = 0, epochs: int | None = None,
          batch_size: int | None = None, lr: float | None = None, optimizer: str | None = None,
          augment: bool | None = None, train_seed: int = 0, max_train: int | None = None,
          data_root=None, device: str | None = "cpu", workers: int = 0,
          progress: bool = False, overwrite: bool = False, resume: bool = False,
          noise: str = "dssn", stability: bool = False, stability_weight: float = 6.0,
          compile=None, autocast: str | None = None) -> dict:
    """Trains a base classifier on one random DSSN variant per sample and step (the
    offsets of ``seed``, as at certification) and saves a checkpoint to ``out``.

    ``noise``: "dssn" (that), "ssn" (independent SSN) or "uniform" (Yang et al.), the
    noises of dssn_kernels/noises.py that the Monte Carlo certifiers sample.
    "none": the clean images (the "pre-trained" classifier of ``dssn train-denoiser``; the
    spec is still stored: it is what certify smooths with).
    ``stability``: stability training (Li et al. 2019): two independent noise draws of
    every image, loss = CE(f(x1), y) + ``stability_weight`` * KL(f(x1) || f(x2)).

    ``compile``: run the model's forward through ``torch.compile`` (True; a mode string or
    a dict of torch.compile arguments as ``dk.certify``'s ``compile=``, e.g.
    ``{"backend": "eager"}``); ``autocast``: "bf16" or "fp16" (CUDA only, with a
    GradScaler): the forward and loss under ``torch.autocast``. Both are recorded in the
    checkpoint's ``training`` dict and must match on resume; without them the training is
    exactly as before.

    ``seed`` is the smoothing seed (split offsets); ``train_seed`` seeds the weights, the
    shuffling and the noise draws. An existing ``out`` is refused unless ``overwrite``.
    The training state is saved after every epoch to ``state_path(out)``; ``resume``
    continues from it (the options must be the same; without the file training starts
    from epoch 1), and a state file is never started over without ``resume`` or
    ``overwrite``. The run holds an exclusive lock on ``out`` (``OUT.lock``,
    results.OutputLock) from before it looks at ``out`` or the state file to its end: a
    second run on the same ``out`` fails at once, naming the first. Returns a summary dict
    (path, spec, seconds, ...).
    """
    with _open_out(out, overwrite=overwrite, resume=resume,
                   what="dssn train") as (out, state_file):
        ds = load_dataset(dataset, "train", data_root)
        info = INFO[dataset]
        if q is not None and q != ds.q:
            raise DatasetError(f"--q {q} does not fit {dataset}, whose pixels are k/{ds.q} "
                               f"(q={ds.q})")
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
        if epochs < 1 or batch_size < 1 or not 0 < lr < math.inf:
            raise WorkflowError(f"need epochs >= 1, batch size >= 1, a finite lr > 0 (got {epochs}, "
                               f"{batch_size}, {lr})")
        if optimizer not in ("adam", "sgd"):
            raise WorkflowError(f"unknown optimizer {optimizer!r}; choose adam or sgd")
        if noise not in NOISES and noise != "none":   # none: clean images (denoised smoothing)
            raise WorkflowError(f"unknown noise {noise!r}; choose one of "
                                f"{', '.join(NOISES)}, none")
        stability = bool(stability)
        if stability and noise == "none":   # two draws of the clean image are one
            raise WorkflowError("--stability compares two noise draws of each image: it needs "
                                "a training noise, not --noise none")
        if isinstance(stability_weight, bool) or not isinstance(stability_weight, (int, float)) \
                or not math.isfinite(stability_weight) or stability_weight < 0:
            raise WorkflowError(f"--stability-weight must be a number >= 0, got "
                                f"{stability_weight!r}")
        stability_weight = float(stability_weight)
        device = resolve_device(device)
        compile, autocast = _check_precision(compile, autocast, device)
        kwargs = default_model_kwargs(arch, ds.input_shape, ds.num_classes, info["mean"],
                                      info["std"])

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
        # what a resumed run must share with the interrupted one (the device may differ)
        settings = plain({"dataset": ds.identity, "arch": arch, "model_kwargs": kwargs,
                          "spec": spec.to_dict(), "epochs": epochs, "batch_size": batch_size,
                          "optimizer": optimizer, "lr": lr, "augment": bool(augment),
                          "train_seed": train_seed, "num_train": n, **_noise_settings(
                              noise, stability, stability_weight),
                          **_precision_settings(compile, autocast)})
        on_cuda = torch.device(device).type == "cuda"
        # fp16 autocast: gradients scaled against underflow (bf16 has fp32's range: no scaler)
        scaler = torch.amp.GradScaler("cuda") if autocast == "fp16" else None
        # the model as trained: compiled (the weights stay ``model``'s: state_dict, optimizer)
        forward = model if compile is None else torch.compile(model, dynamic=False, **compile)

        def precision():
            return (torch.autocast(torch.device(device).type, dtype=AUTOCAST[autocast])
                    if autocast is not None else contextlib.nullcontext())

        def restore(state):
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            if scaler is not None:
                scaler.load_state_dict(state["scaler"])

        start, seconds_before, last_loss, last_acc = _resume(state_file, settings, g, restore,
                                                             resume=resume, command="train")
        loss_fn = nn.CrossEntropyLoss()
        noise_kwargs = (spec.certify_kwargs() if noise == "dssn"
                        else {"lam": spec.lam_value, "q": spec.q})

        def draw(x, gen):
            if noise == "none":   # clean training: the pixels k/q (train-denoiser's classifier)
                return (x.float() / spec.q).to(device)
            return training_noise(x, generator=gen, noise=noise, **noise_kwargs).to(device)

        pad = 4 if dataset == "cifar10" else 0
        t0 = time.perf_counter()
        model.train()
        bar = tqdm(total=epochs * steps_per_epoch, initial=start * steps_per_epoch, desc="train",
                   unit="step", disable=not progress)
        for epoch in range(start, epochs):
            order = torch.randperm(len(ds), generator=g)[:n]
            seen = loss_sum = correct = 0
            for x, y in _batches(ds, order, batch_size, workers):
                if augment:
                    x = _augment(x, g, pad)
                y = y.to(device)
                with precision():
                    logits = forward(draw(x, g))
                    if stability:
                        loss = stability_loss(logits, forward(draw(x, g)), y,
                                              weight=stability_weight)
                    else:
                        loss = loss_fn(logits, y)
                opt.zero_grad()
                with _overflow_is_divergence(epoch + 1):
                    if scaler is None:
                        loss.backward()
                        opt.step()
                    else:
                        scaler.scale(loss).backward()
                        scaler.step(opt)
                        scaler.update()
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
            _check_not_diverged(epoch + 1, model=model)
            _save_state(state_file, {
                "format": STATE_FORMAT, "settings": settings, "epoch": epoch + 1,
                "seconds": seconds_before + time.perf_counter() - t0,
                "last_loss": last_loss, "last_acc": last_acc,
                "model": _weights(model),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                **({} if scaler is None else {"scaler": scaler.state_dict()}),
                "rng": _rng_state(g, on_cuda)})
            _after_epoch(epoch + 1)
        bar.close()
        seconds = seconds_before + time.perf_counter() - t0
        model.eval()
        import dssn_kernels

        training = {"epochs": epochs, "batch_size": batch_size, "optimizer": optimizer, "lr": lr,
                    "augment": bool(augment), "train_seed": train_seed, "num_train": n,
                    **_noise_settings(noise, stability, stability_weight),
                    **_precision_settings(compile, autocast),
                    "final_loss": last_loss, "final_noisy_accuracy": last_acc, "seconds": seconds,
                    "device": str(device), "torch": str(torch.__version__),
                    "dssn_kernels": dssn_kernels.__version__}
        path = _finish(out, state_file, model, arch=arch, model_kwargs=kwargs, spec=spec,
                       dataset=ds.identity, training=training)
        return {"path": str(path), "spec": spec, "arch": arch, "seconds": seconds,
                "final_loss": last_loss, "final_noisy_accuracy": last_acc, "num_train": n,
                "model": model}
