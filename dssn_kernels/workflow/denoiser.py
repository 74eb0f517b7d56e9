"""``dssn train-denoiser``: certify a classifier you cannot retrain (denoised smoothing,
Salman et al. 2020; the DSSN paper's Appendix D).

A DnCNN denoiser D is trained under the smoothing noise in front of a classifier F read
from a checkpoint (``dssn train --noise none`` writes one; any checkpoint will do). F is
frozen: loaded in eval mode, ``requires_grad`` off, its weights written back bit for bit.
The objectives (``objective_loss``):

* ``mse``: mean over pixels of (D(x~) - x)^2, x~ the noised x (F is not used);
* ``stability``: CE(F(D(x~)), argmax F(x)), F's own clean prediction as the label
  (Salman et al.'s best objective);
* ``mse-retrain``: an ``mse`` denoiser (``epochs``), then a classifier of F's
  architecture trained from scratch on D(x~) against the true labels, D fine-tuned with it
  (``retrain_epochs``), the paper's third variant; F itself only gives the architecture.

The result is one checkpoint of arch ``denoised`` (``models.denoised(D, F)``: keys
``denoiser.*`` and ``classifier.*``) with the smoothing spec, used by ``dssn certify``,
``analyze`` and ``plot`` like any other, and by ``dk.certify`` once loaded with
``load_checkpoint``. The noise is DSSN's training noise (one random variant per sample, the
certification offsets) by default, or ``ssn`` / ``uniform`` (``training_noise(noise=)``).
Training resumes as ``dssn train`` does: the whole state is written atomically to
``OUT.train-state`` after every epoch (trainer's helpers), ``resume=True`` continues to
the very weights of an uninterrupted run (bit for bit on the CPU), and the run holds
``OUT.lock`` (results.OutputLock) throughout, so a second run on the same output fails at
once.

``init=`` (``--init DENOISER.pt``) starts the denoiser from the denoiser of an earlier
``denoised`` checkpoint instead of a random initialization: Salman et al. (and the DSSN
paper's Appendix D) start the ``stability`` denoiser from the ``mse`` one::

    dssn train-denoiser clean.pt --objective mse --out mse.pt
    dssn train-denoiser clean.pt --objective stability --init mse.pt --out stab.pt

The init must hold a DnCNN of this run's depth, width, clamp and channels, trained for
this run's smoothing (sigma / lambda, q, seed) and noise; anything else is refused. Its
file name and sha256 go into the checkpoint's ``training`` dict (``init``,
``init_sha256``) and the sha256 into the resume state, so a resume with another init is
refused.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..noises import NOISES
from ..training import training_noise
from .checkpoint import (CheckpointError, SmoothingSpec, SpecMismatchError, build_model,
                         model_from_checkpoint, plain, read_checkpoint)
from .data import DatasetError, load_dataset
from .models import DnCNN, denoised
from .options import WorkflowError, check_not_input, resolve_device
from .results import _diff
# _after_epoch: the trainer's hook, imported (tests patch ``denoiser._after_epoch``)
from .trainer import (STATE_FORMAT, TRAIN_DEFAULTS, _after_epoch, _batches, _check_not_diverged,
                      _finish, _open_out, _overflow_is_divergence, _resume, _rng_state,
                      _save_state, _weights)

OBJECTIVES = ("mse", "stability", "mse-retrain")

# Denoiser defaults per data set: Salman et al.'s DnCNN (17 layers, 64 channels, Adam lr
# 1e-3) for CIFAR-10 and ImageNet; a small one for the 8x8 digits.
DENOISER_DEFAULTS = {
    "digits": dict(depth=5, width=32, epochs=20, retrain_epochs=30, batch_size=64, lr=1e-3),
    "cifar10": dict(depth=17, width=64, epochs=90, retrain_epochs=90, batch_size=64, lr=1e-3),
    "imagenet": dict(depth=17, width=64, epochs=25, retrain_epochs=30, batch_size=64, lr=1e-3),
}


def noised(x: torch.Tensor, spec: SmoothingSpec, noise: str = "dssn",
           generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 levels (or k/q floats) -> float32 images under the training noise of
    ``spec``: DSSN's, or ``ssn`` / ``uniform`` at the spec's lambda (``training_noise``,
    as ``dssn train --noise``)."""
    if noise == "dssn":
        return training_noise(x, generator=generator, **spec.certify_kwargs())
    return training_noise(x, generator=generator, noise=noise, lam=spec.lam_value, q=spec.q)


def objective_loss(objective: str, denoiser: nn.Module, classifier: nn.Module,
                   clean: torch.Tensor, noisy: torch.Tensor,
                   labels: torch.Tensor | None = None) -> torch.Tensor:
    """The training loss of one batch: ``clean`` float images in [0, 1], ``noisy`` their
    noised copies. ``mse``: mean((D(noisy) - clean)^2) (torch's MSELoss, as Salman et al.);
    ``stability``: CE(F(D(noisy)), argmax F(clean)); ``classify`` (mse-retrain's second
    phase): CE(F(D(noisy)), labels)."""
    if objective == "mse":
        return F.mse_loss(denoiser(noisy), clean)
    if objective == "stability":
        with torch.no_grad():
            target = classifier(clean).argmax(1)
        return F.cross_entropy(classifier(denoiser(noisy)), target)
    if objective == "classify":
        return F.cross_entropy(classifier(denoiser(noisy)), labels)
    raise WorkflowError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")


def _init_weights(init, d_kwargs: dict, spec: SmoothingSpec, noise: str) -> tuple[dict, str]:
    """(the denoiser weights (``denoiser.*`` without the prefix) of the ``denoised``
    checkpoint ``init`` (written by an earlier ``train_denoiser``), refused unless its
    denoiser is this run's (DnCNN of the same ``d_kwargs``: channels, depth, width,
    clamp) and it was trained for this run's smoothing (sigma / lambda, q, seed: the
    spec's L) and training noise, the sha256 of the file read)."""
    try:
        ckpt = read_checkpoint(init)
    except CheckpointError as exc:
        raise CheckpointError(f"--init: {exc}") from None
    m = ckpt["model"]
    entry = m["kwargs"].get("denoiser") if m["arch"] == "denoised" else None
    if not isinstance(entry, dict) or not isinstance(entry.get("kwargs"), dict):
        raise CheckpointError(f"--init {init} is not a denoiser checkpoint (arch "
                              f"{m['arch']!r}); give one written by `dssn train-denoiser`")
    if entry.get("arch") != "dncnn" or entry["kwargs"] != d_kwargs:
        diffs = [d.replace(" (file) vs ", " (init) vs ") for d in
                 _diff({"arch": entry.get("arch"), **entry["kwargs"]},
                       {"arch": "dncnn", **d_kwargs})]
        raise CheckpointError(f"--init {init} holds another denoiser ({'; '.join(diffs)}); "
                              "nothing was changed: give the --depth, --width (and --no-clamp) "
                              "of its training, or another --init")
    ispec: SmoothingSpec = ckpt["spec_obj"]
    training = ckpt.get("training") if isinstance(ckpt.get("training"), dict) else {}
    inoise = training.get("noise", "dssn")
    diffs = []
    if (ispec.q, ispec.L, ispec.seed) != (spec.q, spec.L, spec.seed) or not math.isclose(
            ispec.sigma_value, spec.sigma_value, rel_tol=1e-9, abs_tol=0.0):
        diffs.append(f"{ispec.describe()} (init) vs {spec.describe()} (this run)")
    if inoise != noise:
        diffs.append(f"noise {inoise} (init) vs {noise} (this run)")
    if diffs:
        raise SpecMismatchError(f"--init {init} was trained for other smoothing "
                                f"({'; '.join(diffs)}); nothing was changed: give the "
                                "--sigma/--lam, --seed and --noise of its training, or "
                                "another --init")
    return ({k[len("denoiser."):]: v for k, v in ckpt["state_dict"].items()
             if k.startswith("denoiser.")}, ckpt["sha256"])


def train_denoiser(classifier, out, *, objective: str = "mse", noise: str = "dssn",
                   dataset: str | None = None, sigma=None, lam=None, q: int | None = None,
                   seed: int | None = None, depth: int | None = None, width: int | None = None,
                   clamp: bool = True, init=None, epochs: int | None = None,
                   retrain_epochs: int | None = None, batch_size: int | None = None,
                   lr: float | None = None, retrain_lr: float | None = None, train_seed: int = 0,
                   max_train: int | None = None, data_root=None, device: str | None = "cpu",
                   progress: bool = False, overwrite: bool = False, resume: bool = False) -> dict:
    """Trains a DnCNN in front of the frozen classifier of checkpoint ``classifier`` and
    writes the pair as one ``denoised`` checkpoint to ``out``.

    The smoothing spec is the classifier checkpoint's unless ``sigma``/``lam``/``seed``
    are given (q always the data set's; ``q``, when given, must be the checkpoint's);
    ``dataset`` defaults to the checkpoint's. A checkpoint whose q, input shape or classes
    disagree with the data set is refused, and so is an existing ``out`` without
    ``overwrite``.

    ``init``: a ``denoised`` checkpoint written by an earlier ``train_denoiser`` (e.g. an
    ``mse`` one, to start a ``stability`` denoiser from it, as Salman et al. do): the
    denoiser starts from its denoiser's weights instead of a random initialization. Its
    denoiser must be this run's (depth, width, clamp, channels) and its smoothing spec
    (sigma / lambda, q, seed) and noise this run's, else it is refused; its file name and
    sha256 are recorded in the checkpoint's ``training`` dict (``init``, ``init_sha256``)
    and the sha256 in the resume state, so a resume with another ``init`` is refused.

    The run holds an exclusive lock on ``out`` (``OUT.lock``, results.OutputLock) from
    before it looks at ``out`` or the state file to its end: a second run on the same
    ``out`` fails at once, naming the first. Returns a summary dict (path, spec, seconds,
    final_loss, model, ...).
    """
    if objective not in OBJECTIVES:
        raise WorkflowError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if noise not in NOISES:
        raise WorkflowError(f"unknown noise {noise!r}; choose one of {', '.join(NOISES)}")
    check_not_input(out, [("the classifier checkpoint", classifier),
                          ("the --init checkpoint", init)], "the denoiser's checkpoint")
    with _open_out(out, overwrite=overwrite, resume=resume,
                   what="dssn train-denoiser") as (out, state_file):
        return _train_denoiser(classifier, out, state_file, objective=objective, noise=noise,
                               dataset=dataset, sigma=sigma, lam=lam, q=q, seed=seed,
                               depth=depth, width=width, clamp=clamp, init=init, epochs=epochs,
                               retrain_epochs=retrain_epochs, batch_size=batch_size, lr=lr,
                               retrain_lr=retrain_lr, train_seed=train_seed,
                               max_train=max_train, data_root=data_root, device=device,
                               progress=progress, resume=resume)


def _train_denoiser(classifier, out, state_file, *, objective, noise, dataset, sigma, lam, q,
                    seed, depth, width, clamp, init, epochs, retrain_epochs, batch_size, lr,
                    retrain_lr, train_seed, max_train, data_root, device, progress,
                    resume) -> dict:
    """train_denoiser's run, under the lock on ``out``."""
    ckpt = read_checkpoint(classifier)
    cspec: SmoothingSpec = ckpt["spec_obj"]
    c_arch, c_kwargs = ckpt["model"]["arch"], ckpt["model"]["kwargs"]
    if q is not None and q != cspec.q:
        raise SpecMismatchError(f"--q {q} disagrees with the classifier checkpoint's q={cspec.q}")
    if c_arch == "denoised":
        raise CheckpointError(f"{classifier} holds a denoised model already; give the "
                              "classifier's own checkpoint")
    dataset = dataset or ckpt["dataset"].get("name")
    ds = load_dataset(dataset, "train", data_root)
    if cspec.q != ds.q:
        raise DatasetError(f"{dataset} pixels are k/{ds.q}, but the classifier checkpoint "
                           f"{classifier} is for q={cspec.q}")
    if tuple(cspec.input_shape) != tuple(ds.input_shape):
        raise DatasetError(f"{dataset} images are {list(ds.input_shape)}, the classifier "
                           f"checkpoint {classifier} takes {list(cspec.input_shape)}")
    if cspec.num_classes != ds.num_classes:
        raise DatasetError(f"{dataset} has {ds.num_classes} classes, the classifier checkpoint "
                           f"{classifier} {cspec.num_classes}")
    if sigma is None and lam is None:
        sigma, lam = cspec.sigma, cspec.lam
    try:
        spec = SmoothingSpec.create(sigma=sigma, lam=lam, q=ds.q,
                                    seed=cspec.seed if seed is None else seed,
                                    input_shape=ds.input_shape, num_classes=ds.num_classes)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"bad smoothing parameters: {exc}") from None
    d = DENOISER_DEFAULTS.get(dataset, DENOISER_DEFAULTS["cifar10"])
    depth = d["depth"] if depth is None else depth
    width = d["width"] if width is None else width
    epochs = d["epochs"] if epochs is None else epochs
    retrain = objective == "mse-retrain"
    retrain_epochs = (d["retrain_epochs"] if retrain_epochs is None else retrain_epochs) if retrain else 0
    batch_size = d["batch_size"] if batch_size is None else batch_size
    lr = d["lr"] if lr is None else lr
    if retrain_lr is None:
        retrain_lr = TRAIN_DEFAULTS.get(dataset, {}).get("lr", 1e-3) if \
            TRAIN_DEFAULTS.get(dataset, {}).get("optimizer") == "adam" else 1e-3
    if epochs < 1 or batch_size < 1 or not 0 < lr < math.inf or depth < 2 or width < 1 \
            or not 0 < retrain_lr < math.inf or (retrain and retrain_epochs < 1):
        raise WorkflowError(f"need epochs >= 1, batch size >= 1, finite lr and retrain lr > 0, "
                            f"depth >= 2, width >= 1 (got {epochs}, {batch_size}, {lr}, "
                            f"{retrain_lr}, {depth}, {width})")
    device = resolve_device(device)
    n = len(ds) if max_train is None else min(len(ds), max_train)
    if n < 1:
        raise DatasetError("no training images (check --max-train)")
    d_kwargs = {"in_channels": int(ds.input_shape[0]), "depth": int(depth), "width": int(width),
                "clamp": bool(clamp)}
    init_weights, init_record = None, {}
    if init is not None:
        init_weights, init_sha = _init_weights(init, d_kwargs, spec, noise)
        init_record = {"init": str(init), "init_sha256": init_sha}

    frozen = model_from_checkpoint(ckpt, device)   # eval mode
    frozen.requires_grad_(False)
    torch.manual_seed(train_seed)
    den = DnCNN(**d_kwargs).to(device)
    if init_weights is not None:   # the start of the training: the init's weights, all of them
        try:
            den.load_state_dict(init_weights)
        except RuntimeError as exc:
            raise CheckpointError(f"--init {init}: its denoiser weights do not fit a DnCNN of "
                                  f"{d_kwargs}: {str(exc).splitlines()[0]}") from None
    new_clf = build_model(c_arch, c_kwargs).to(device) if retrain else None
    opt1 = torch.optim.Adam(den.parameters(), lr=lr)
    sched1 = torch.optim.lr_scheduler.CosineAnnealingLR(opt1, epochs)
    opt2 = sched2 = None
    if retrain:
        opt2 = torch.optim.Adam([{"params": new_clf.parameters(), "lr": retrain_lr},
                                 {"params": den.parameters(), "lr": lr}])
        sched2 = torch.optim.lr_scheduler.CosineAnnealingLR(opt2, retrain_epochs)
    g = torch.Generator().manual_seed(train_seed)
    classifier_sha = ckpt["sha256"]
    settings = plain({"kind": "denoiser", "classifier_sha256": classifier_sha,
                      "objective": objective, "noise": noise, "dataset": ds.identity,
                      "denoiser_kwargs": d_kwargs, "spec": spec.to_dict(), "epochs": epochs,
                      "retrain_epochs": retrain_epochs, "batch_size": batch_size, "lr": lr,
                      "retrain_lr": retrain_lr if retrain else None, "train_seed": train_seed,
                      "num_train": n,
                      # the init's content (a training without --init records none, as before)
                      **({} if init is None else {"init_sha256": init_record["init_sha256"]})})
    total = epochs + retrain_epochs

    def restore(state):
        den.load_state_dict(state["denoiser"])
        opt1.load_state_dict(state["optimizer"])
        sched1.load_state_dict(state["scheduler"])
        if retrain:
            new_clf.load_state_dict(state["classifier"])
            opt2.load_state_dict(state["retrain_optimizer"])
            sched2.load_state_dict(state["retrain_scheduler"])

    start, seconds_before, last_loss, last_acc = _resume(state_file, settings, g, restore,
                                                         resume=resume, command="train-denoiser")

    steps_per_epoch = math.ceil(n / batch_size)
    on_cuda = torch.device(device).type == "cuda"
    t0 = time.perf_counter()
    bar = tqdm(total=total * steps_per_epoch, initial=start * steps_per_epoch,
               desc=f"train-denoiser ({objective})", unit="step", disable=not progress)
    for epoch in range(start, total):
        second = epoch >= epochs
        phase = "classify" if second else ("stability" if objective == "stability" else "mse")
        den.train()
        if second:
            new_clf.train()
        clf = new_clf if second else frozen
        opt, sched = (opt2, sched2) if second else (opt1, sched1)
        order = torch.randperm(len(ds), generator=g)[:n]
        seen = loss_sum = 0
        for x, y in _batches(ds, order, batch_size, 0):
            noisy = noised(x, spec, noise, g).to(device)
            clean = (x.float() / ds.q).to(device)
            y = y.to(device)
            loss = objective_loss(phase, den, clf, clean, noisy, y)
            opt.zero_grad()
            with _overflow_is_divergence(epoch + 1):
                loss.backward()
                opt.step()
            seen += len(y)
            loss_sum += loss.item() * len(y)
            bar.update(1)
        sched.step()
        last_loss = loss_sum / seen
        bar.set_postfix(phase=phase, loss=f"{last_loss:.4f}")
        _check_not_diverged(epoch + 1, denoiser=den, classifier=new_clf)
        _save_state(state_file, {
            "format": STATE_FORMAT, "settings": settings, "epoch": epoch + 1,
            "seconds": seconds_before + time.perf_counter() - t0,
            "last_loss": last_loss, "last_acc": last_acc,
            "denoiser": _weights(den), "optimizer": opt1.state_dict(),
            "scheduler": sched1.state_dict(),
            "classifier": _weights(new_clf) if retrain else None,
            "retrain_optimizer": opt2.state_dict() if retrain else None,
            "retrain_scheduler": sched2.state_dict() if retrain else None,
            "rng": _rng_state(g, on_cuda)})
        _after_epoch(epoch + 1)
    bar.close()
    seconds = seconds_before + time.perf_counter() - t0
    den.eval()
    model = denoised(den, (new_clf if retrain else frozen).eval())
    import dssn_kernels

    training = {"kind": "denoiser", "objective": objective, "noise": noise,
                "classifier": str(classifier), "classifier_sha256": classifier_sha,
                "classifier_training": ckpt.get("training", {}), **init_record,
                "epochs": epochs, "retrain_epochs": retrain_epochs, "batch_size": batch_size,
                "lr": lr, "retrain_lr": retrain_lr if retrain else None,
                "train_seed": train_seed, "num_train": n, "final_loss": last_loss,
                "seconds": seconds, "device": str(device), "torch": str(torch.__version__),
                "dssn_kernels": dssn_kernels.__version__}
    kwargs = {"denoiser": {"arch": "dncnn", "kwargs": d_kwargs},
              "classifier": {"arch": c_arch, "kwargs": c_kwargs}}
    path = _finish(out, state_file, model, arch="denoised", model_kwargs=kwargs, spec=spec,
                   dataset=ds.identity, training=training)
    return {"path": str(path), "spec": spec, "objective": objective, "noise": noise,
            "seconds": seconds, "final_loss": last_loss, "num_train": n, "model": model,
            "dataset": dataset}


__all__ = ["DENOISER_DEFAULTS", "NOISES", "OBJECTIVES", "noised", "objective_loss",
           "train_denoiser"]
