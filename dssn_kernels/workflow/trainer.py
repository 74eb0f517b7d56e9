"""``dssn train``: trains a base classifier under DSSN noise and writes a checkpoint."""
from __future__ import annotations

import math
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from ..training import training_noise
from .checkpoint import CheckpointError, SmoothingSpec, build_model, default_model_kwargs, save_checkpoint
from .data import INFO, DatasetError, load_dataset
from .options import WorkflowError, resolve_device

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
