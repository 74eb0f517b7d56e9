"""Denoised smoothing on digits (the DSSN paper's Appendix D after Salman et al. 2020):
certify a classifier trained on clean images without retraining it, and compare.

    python -m dssn_kernels.workflow.denoise_demo               # a few minutes on 2 CPU cores
    python -m dssn_kernels.workflow.denoise_demo --threads 1   # on a busy machine
    python -m dssn_kernels.workflow.denoise_demo --quick       # smoke run

For each sigma, every held-out digit is certified exactly with DSSN by

    (a) clean        the classifier trained on clean images (dssn train --noise none), as is
    (b) mse          a DnCNN trained with the MSE objective in front of it (train-denoiser)
    (c) stability    a DnCNN trained with the stability objective in front of it,
                     started from (b)'s MSE denoiser, as Salman et al. do
    (d) mse-retrain  an MSE DnCNN, then a classifier retrained through it, both fine-tuned
    (e) dssn-trained a classifier trained under DSSN noise (dssn train), the reference

and the certified accuracies are printed per sigma and, best over sigma, in the layout of
the paper's Table 1 (``dssn analyze``). The paper's finding to compare with: the
denoisers do not close the gap to training under the noise at large sigma.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from . import analysis
from .certify_data import certify_dataset
from .checkpoint import SmoothingSpec, model_from_checkpoint, read_checkpoint, save_checkpoint
from .denoiser import train_denoiser
from .trainer import train

DEFAULT_SIGMAS = (0.5, 1.0)
DEFAULT_OUT = Path("runs") / "denoise-demo"
LABELS = ("clean", "mse", "stability", "mse-retrain", "dssn-trained")


def respec(src, dst, sigma: float) -> Path:
    """A copy of checkpoint ``src`` (weights, architecture) that smooths at ``sigma``: the
    clean classifier certified directly at each sigma."""
    ckpt = read_checkpoint(src)
    old: SmoothingSpec = ckpt["spec_obj"]
    spec = SmoothingSpec.create(sigma=sigma, q=old.q, seed=old.seed, input_shape=old.input_shape,
                                num_classes=old.num_classes)
    return save_checkpoint(dst, model_from_checkpoint(ckpt), arch=ckpt["model"]["arch"],
                           model_kwargs=ckpt["model"]["kwargs"], spec=spec,
                           dataset=ckpt["dataset"], training=ckpt.get("training", {}))


def parse_args(argv=None):
    from .cli import _Parser, sigma_type
    from .data import INFO

    p = _Parser(prog="python -m dssn_kernels.workflow.denoise_demo", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sigmas", type=sigma_type(INFO["digits"]["q"]), nargs="+", default=list(DEFAULT_SIGMAS),
                   help="noise levels (default 0.5 1)")
    p.add_argument("--epochs", type=int, default=None,
                   help="classifier epochs (default 60, 2 with --quick)")
    p.add_argument("--denoiser-epochs", type=int, default=None,
                   help="denoiser epochs (default 20, 1 with --quick)")
    p.add_argument("--retrain-epochs", type=int, default=None,
                   help="mse-retrain's second phase (default 30, 1 with --quick)")
    p.add_argument("--radii", type=float, nargs="+", default=None,
                   help="L1 radii, [0, 1] scale (default: analyze's)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny budgets, 50 test images")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="folder for checkpoints, result files and table "
                        "(default runs/denoise-demo)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N)")
    p.add_argument("--seed", type=int, default=0, help="train seed of every model")
    args = p.parse_args(argv)
    q = args.quick
    args.epochs = (2 if q else 60) if args.epochs is None else args.epochs
    args.denoiser_epochs = (1 if q else 20) if args.denoiser_epochs is None else args.denoiser_epochs
    args.retrain_epochs = (1 if q else 30) if args.retrain_epochs is None else args.retrain_epochs
    if min(args.epochs, args.denoiser_epochs, args.retrain_epochs) < 1:
        p.error("epochs must be >= 1")
    return args


def main(argv=None) -> dict:
    """Runs the comparison; returns {label: [result file per sigma]} and prints the tables."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    max_train = 200 if args.quick else None
    max_index = 50 if args.quick else None
    t_all = time.perf_counter()
    print(f"denoised smoothing on digits (q=16), sigmas {args.sigmas}; classifier epochs "
          f"{args.epochs}, denoiser epochs {args.denoiser_epochs}, retrain epochs "
          f"{args.retrain_epochs}; {torch.get_num_threads()} threads; files in {out}/", flush=True)

    clean = out / "clean.pt"
    t0 = time.perf_counter()
    train(clean, dataset="digits", sigma=args.sigmas[0], noise="none", epochs=args.epochs,
          train_seed=args.seed, max_train=max_train, device="cpu", overwrite=True)
    print(f"clean classifier: {time.perf_counter() - t0:.1f}s", flush=True)
    files = {label: [] for label in LABELS}
    for sigma in args.sigmas:
        tag = f"sigma{sigma:g}"
        ckpts = {"clean": respec(clean, out / f"clean-{tag}.pt", sigma)}
        for objective in ("mse", "stability", "mse-retrain"):
            t0 = time.perf_counter()
            ckpts[objective] = out / f"{objective}-{tag}.pt"
            train_denoiser(clean, ckpts[objective], objective=objective, sigma=sigma,
                           init=ckpts["mse"] if objective == "stability" else None,
                           epochs=args.denoiser_epochs, retrain_epochs=args.retrain_epochs,
                           train_seed=args.seed, max_train=max_train, device="cpu",
                           overwrite=True)
            print(f"sigma={sigma:g}: {objective} denoiser {time.perf_counter() - t0:.1f}s",
                  flush=True)
        t0 = time.perf_counter()
        ckpts["dssn-trained"] = out / f"dssn-trained-{tag}.pt"
        train(ckpts["dssn-trained"], dataset="digits", sigma=sigma, epochs=args.epochs,
              train_seed=args.seed, max_train=max_train, device="cpu", overwrite=True)
        print(f"sigma={sigma:g}: DSSN-trained classifier {time.perf_counter() - t0:.1f}s",
              flush=True)
        t0 = time.perf_counter()
        for label in LABELS:
            tsv = out / f"{label}-{tag}.tsv"
            certify_dataset(ckpts[label], tsv, max_index=max_index, device="cpu",
                            overwrite=True, progress=False)
            files[label].append(tsv)
        print(f"sigma={sigma:g}: certified {len(LABELS)} models in "
              f"{time.perf_counter() - t0:.1f}s", flush=True)

    report = analysis.analyze([f"{label}={f}" for label in LABELS for f in files[label]],
                              args.radii)
    (out / "table.md").write_text(report, encoding="utf-8")
    print("\n" + report)
    print(f"written to {out / 'table.md'}; total {time.perf_counter() - t_all:.1f}s")
    return files


def entry() -> int:
    from .options import run_demo

    return run_demo(main, "dssn_kernels.workflow.denoise_demo")


if __name__ == "__main__":
    sys.exit(entry())
