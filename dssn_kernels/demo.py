"""End-to-end demo on scikit-learn's bundled 8x8 digits (no download): train a small
CNN under DSSN training noise for a few sigmas, certify every held-out image exactly,
and print clean and certified accuracy of the smoothed classifier.

    python -m dssn_kernels.demo            # full run, about 20 seconds on 2 CPU cores
    python -m dssn_kernels.demo --quick    # smoke test, a few seconds

Digits pixels are integers 0..16, so q = 16 and L = int(2 * sigma * sqrt(3) * 16).
Radii are L1 on the [0, 1] scale (= steps / q); an image counts as certified at radius
R when the smoothed prediction is correct and its certified radius is >= R.
"""
from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
from torch import nn

import dssn_kernels as dk
from dssn_kernels.models import SmallCNN

Q = 16
NUM_CLASSES = 10
DEFAULT_SIGMAS = (0.25, 0.5, 1.0)
DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)


def load_digits_levels(seed: int, test_fraction: float = 0.3):
    """(x_train, y_train, x_test, y_test): uint8 levels 0..16 shaped [N, 1, 8, 8] and
    int64 labels, split stratified with ``seed``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    levels = digits.images.astype(np.uint8)[:, None]  # exact: the values are integers 0..16
    assert levels.max() <= Q and np.array_equal(levels[:, 0], digits.images)
    xtr, xte, ytr, yte = train_test_split(levels, digits.target, test_size=test_fraction,
                                          random_state=seed, stratify=digits.target)
    return (torch.from_numpy(xtr), torch.from_numpy(ytr).long(),
            torch.from_numpy(xte), torch.from_numpy(yte).long())


def train_base(x, y, sigma, *, epochs, seed, batch_size=64, lr=2e-3):
    """A SmallCNN trained on one random DSSN variant per sample per step."""
    torch.manual_seed(seed)
    model = SmallCNN(in_channels=1, num_classes=NUM_CLASSES, image_size=8)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            noisy = dk.training_noise(x[idx], sigma=sigma, q=Q, seed=0, generator=g)
            loss = loss_fn(model(noisy), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def certified_accuracy(cert, y, radii):
    correct = cert.prediction == y
    return {float(r): float((correct & (cert.radius >= r)).double().mean()) for r in radii}


def format_table(results, radii) -> str:
    head = ["sigma", "L", "max R", "clean acc"] + [f"R={r:g}" for r in radii] + ["ms/image"]
    rows = [head]
    for res in results:
        rows.append([f"{res['sigma']:g}", str(res["L"]), f"{res['max_radius']:.3f}",
                     f"{100 * res['clean_accuracy']:.1f}%"]
                    + [f"{100 * res['certified_accuracy'][float(r)]:.1f}%" for r in radii]
                    + [f"{1e3 * res['seconds_per_image']:.2f}"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m dssn_kernels.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sigmas", type=float, nargs="+", default=None,
                   help=f"noise levels to train and certify (default {' '.join(map(str, DEFAULT_SIGMAS))})")
    p.add_argument("--epochs", type=int, default=None,
                   help="training epochs per sigma (default 60, 3 with --quick)")
    p.add_argument("--radii", type=float, nargs="+", default=list(DEFAULT_RADII),
                   help="L1 radii ([0, 1] scale) to report certified accuracy at")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 3 epochs, two sigmas, the first 100 test images")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the train/test split, weight init and training noise draws "
                        "(the split offsets use seed 0, as at certification)")
    p.add_argument("--no-progress", action="store_true", help="hide the certify progress bar")
    args = p.parse_args(argv)
    if args.sigmas is None:
        args.sigmas = [0.25, 0.5] if args.quick else list(DEFAULT_SIGMAS)
    if args.epochs is None:
        args.epochs = 3 if args.quick else 60
    if args.epochs < 1:
        p.error("--epochs must be >= 1")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    return args


def main(argv=None):
    """Runs the demo; returns one dict per sigma: sigma, L, max_radius, num_test,
    clean_accuracy, certified_accuracy {radius: accuracy}, train_seconds,
    certify_seconds, seconds_per_image, backend."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    import sklearn

    backends = dk.available_backends()
    backend = "cpp" if "cpp" in backends else "torch"
    print(f"dssn_kernels {dk.__version__}, torch {torch.__version__}, scikit-learn "
          f"{sklearn.__version__}, python {platform.python_version()}; "
          f"CPU backends {backends} (auto -> {backend}); {torch.get_num_threads()} threads")

    xtr, ytr, xte, yte = load_digits_levels(args.seed)
    if args.quick:
        xte, yte = xte[:100], yte[:100]
    print(f"digits: {len(xtr)} train / {len(xte)} test images, 1x8x8, q={Q}; "
          f"{args.epochs} epochs per sigma\n")

    t_all = time.perf_counter()
    results = []
    for sigma in args.sigmas:
        L = dk.num_variants(sigma, q=Q)
        t0 = time.perf_counter()
        model = train_base(xtr, ytr, sigma, epochs=args.epochs, seed=args.seed)
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        cert = dk.certify(model, xte, sigma=sigma, q=Q, seed=0, num_classes=NUM_CLASSES,
                          progress=not args.no_progress)
        cert_s = time.perf_counter() - t0
        assert cert.num_variants == L and bool((cert.counts.sum(1) == L).all())
        res = {
            "sigma": float(sigma), "L": L, "max_radius": (L // 2) / Q, "num_test": len(xte),
            "clean_accuracy": float((cert.prediction == yte).double().mean()),
            "certified_accuracy": certified_accuracy(cert, yte, args.radii),
            "train_seconds": train_s, "certify_seconds": cert_s,
            "seconds_per_image": cert_s / len(xte), "backend": backend,
        }
        results.append(res)
        print(f"sigma={sigma:g}: L={L}, trained in {train_s:.1f}s, certified {len(xte)} "
              f"images ({len(xte) * L} forward passes) in {cert_s:.2f}s", flush=True)

    print("\nExact DSSN certificates on held-out digits (certified accuracy = correct "
          "and L1 radius >= R, [0,1] scale;\nmax R = floor(L/2)/q is the largest radius "
          "any image can get):\n")
    print(format_table(results, args.radii))
    print(f"\ntotal {time.perf_counter() - t_all:.1f}s")
    return results


if __name__ == "__main__":
    main()
