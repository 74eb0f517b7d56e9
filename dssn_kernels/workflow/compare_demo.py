"""The paper's comparison (Table 1, Figure 8) in small, on scikit-learn's digits (q = 16):
for each sigma, small CNNs trained under the three noises (DSSN, independent SSN,
uniform), each with standard and with stability training, each certified by its own
method: DSSN exactly on every held-out image, the two Monte Carlo methods (n0 = 64,
alpha = 0.001) on a subset and with a small n, so that the run stays about a minute on
2 idle CPU cores. Prints the Table 1 layout (one row per method and training, best over
sigma), the time per image of each method, and writes the curves.

    python -m dssn_kernels.workflow.compare_demo            # about a minute on 2 idle cores
    python -m dssn_kernels.workflow.compare_demo --quick    # smoke run

The command lines of a full CIFAR-10 reproduction are printed at the end.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from dssn_kernels.workflow import analysis, certify_dataset, train

METHODS = ("dssn", "ssn", "uniform")
DEFAULT_OUT = Path("runs") / "compare"

FULL_RUN = """\
A full CIFAR-10 reproduction (a GPU and the data in DATA; per sigma in 0.25 0.5 0.75 1.0
1.25 1.5 1.75 2.0 2.25 2.5 2.75 3.0 3.25 3.5, noise in dssn ssn uniform, with and without
--stability):
  dssn train --dataset cifar10 --data-root DATA --sigma S --noise NOISE [--stability] \\
      --out runs/cifar-NOISE-S[-stab].pt
  dssn certify runs/cifar-NOISE-S[-stab].pt --data-root DATA --skip 1 --max -1 \\
      --out runs/cifar-NOISE-S[-stab].tsv          # dssn: exact; ssn/uniform: n0 64, n 100000
  dssn analyze runs/cifar-*.tsv [published folders, e.g. cifar_split_derandomized_0.5]
  dssn plot curves runs/cifar-*-0.5.tsv --out figure8.png"""


def parse_args(argv=None):
    from .cli import _Parser, _positive_int, sigma_type
    from .data import INFO

    p = _Parser(prog="python -m dssn_kernels.workflow.compare_demo", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sigmas", type=sigma_type(INFO["digits"]["q"]), nargs="+", default=None,
                   help="noise levels (default 0.25 0.5; --quick: 0.5)")
    p.add_argument("--epochs", type=_positive_int, default=None, help="default 10 (--quick: 1)")
    p.add_argument("--max-train", type=_positive_int, default=None,
                   help="train on the first N shuffled images only (default all)")
    p.add_argument("--max-test", type=_positive_int, default=None,
                   help="held-out images certified by DSSN (default all; --quick: 20)")
    p.add_argument("--mc-images", type=_positive_int, default=None,
                   help="held-out images certified by Monte Carlo (default 50; --quick: 4)")
    p.add_argument("--n", type=_positive_int, default=None,
                   help="Monte Carlo estimation draws (default 1000; --quick: 50; the paper 100000)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: one sigma, one epoch, few images, small n")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="folder for checkpoints, result files, table and plots "
                        "(default runs/compare)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    a = p.parse_args(argv)
    a.sigmas = a.sigmas or ([0.5] if a.quick else [0.25, 0.5])
    a.epochs = a.epochs or (1 if a.quick else 10)
    a.max_test = a.max_test or (20 if a.quick else None)
    a.mc_images = a.mc_images or (4 if a.quick else 50)
    a.n = a.n or (50 if a.quick else 1000)
    return a


def main(argv=None) -> dict:
    """Runs the comparison; returns {"files": [paths], "table": markdown, "seconds_per_image":
    {method: seconds}}."""
    args = parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    files, per_image = [], {m: [] for m in METHODS}
    t_all = time.perf_counter()
    for sigma in args.sigmas:
        for noise in METHODS:
            for stability in (False, True):
                stem = f"digits-{noise}-{sigma:g}" + ("-stab" if stability else "")
                ckpt, tsv = out / f"{stem}.pt", out / f"{stem}.tsv"
                tr = train(ckpt, dataset="digits", sigma=sigma, epochs=args.epochs, noise=noise,
                           stability=stability, device="cpu", overwrite=True,
                           max_train=args.max_train)
                mc = {} if noise == "dssn" else {"n0": 64, "n": args.n, "alpha": 0.001}
                max_index = args.max_test if noise == "dssn" else args.mc_images
                t0 = time.perf_counter()
                certify_dataset(ckpt, tsv, max_index=max_index, device="cpu", overwrite=True,
                                method=noise, **mc)
                res = analysis.load_result(tsv)
                per_image[noise].append((time.perf_counter() - t0) / len(res))
                files.append(res)
                print(f"sigma={sigma:g} {noise:7s} {'stability' if stability else 'standard ':9s}: "
                      f"trained {tr['seconds']:.1f}s, certified {len(res)} images, clean "
                      f"{100 * res.clean_accuracy():.1f}%", flush=True)
    radii = analysis.default_radii(files)
    table = analysis.best_table(files, radii)
    print("\nBest certified accuracy over sigma (clean accuracy @ sigma), the layout of Table 1:\n")
    print(table)
    seconds = {m: sum(v) / len(v) for m, v in per_image.items() if v}
    print("\ntime per image: " + ", ".join(
        f"{analysis.METHOD_LABELS[m]} {1e3 * s:.1f} ms" for m, s in seconds.items())
        + f" (Monte Carlo: n0 = 64, n = {args.n} on {args.mc_images} images; DSSN: exact)")
    (out / "table.md").write_text(table + "\n", encoding="utf-8")
    if not args.no_plots:
        try:
            for sigma in args.sigmas:
                group = [f for f in files if f.sigma == sigma]
                analysis.plot_curves(group, out / f"curves-{sigma:g}.png",
                                     title=f"DSSN vs Monte Carlo, digits, σ={sigma:g}",
                                     envelope=False)
        except analysis.ResultsError as exc:   # matplotlib missing
            print(f"(no plots: {exc})")
    print(f"\nfiles in {out}/; total {time.perf_counter() - t_all:.1f}s\n\n{FULL_RUN}")
    return {"files": [f.path for f in files], "table": table, "seconds_per_image": seconds}


def entry() -> int:
    from .options import run_demo

    return run_demo(main, "dssn_kernels.workflow.compare_demo")


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    sys.exit(entry())
