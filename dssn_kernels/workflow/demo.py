"""End-to-end demo of the researcher's workflow on scikit-learn's bundled 8x8 digits (no
download), through the same Python API as the ``dssn`` command: for a few sigmas, train
a small CNN under DSSN training noise (``dssn train``), certify every held-out image
exactly into a resumable result file (``dssn certify``), then tabulate certified
accuracy (``dssn analyze``) and plot it (``dssn plot``).

    python -m dssn_kernels.workflow.demo            # full run, well under a minute on 2 CPU cores
    python -m dssn_kernels.workflow.demo --quick    # smoke test, a few seconds

Digits pixels are integers 0..16, so q = 16 and L = int(2 * sigma * sqrt(3) * 16).
Radii are L1 on the [0, 1] scale (= steps / q); an image counts as certified at radius
R when the smoothed prediction is correct and its certified radius is >= R.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

import dssn_kernels as dk
from dssn_kernels.backends import resolve_backend
from dssn_kernels.workflow import analysis, certify_dataset, train
from dssn_kernels.workflow.data import digits_levels

Q = 16
DEFAULT_SIGMAS = (0.25, 0.5, 1.0)
DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
DEFAULT_OUT = Path("runs") / "demo"


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
    from .cli import _Parser, sigma_type

    p = _Parser(prog="python -m dssn_kernels.workflow.demo", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sigmas", type=sigma_type(Q), nargs="+", default=None,
                   help=f"noise levels to train and certify (default {' '.join(map(str, DEFAULT_SIGMAS))})")
    p.add_argument("--epochs", type=int, default=None,
                   help="training epochs per sigma (default 60, 3 with --quick)")
    p.add_argument("--radii", type=float, nargs="+", default=list(DEFAULT_RADII),
                   help="L1 radii ([0, 1] scale) to report certified accuracy at")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 3 epochs, two sigmas, the first 100 test images")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help=f"folder for checkpoints, result files, table and plots (default {DEFAULT_OUT})")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of weight init, shuffling and training noise draws (the split "
                        "offsets use seed 0, at training and certification alike)")
    p.add_argument("--no-progress", action="store_true", help="hide the certify progress bar")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
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
    certify_seconds, seconds_per_image, backend, checkpoint, results (file paths)."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    xtr, _, xte, _ = digits_levels()   # without scikit-learn: DatasetError, the CLI's hint
    import sklearn

    backends = dk.available_backends()
    backend = resolve_backend("auto", "cpu")
    print(f"dssn_kernels {dk.__version__}, torch {torch.__version__}, scikit-learn "
          f"{sklearn.__version__}, python {platform.python_version()}; "
          f"CPU backends {backends} (auto -> {backend}); {torch.get_num_threads()} threads")
    max_index = 100 if args.quick else None
    num_test = min(len(xte), max_index or len(xte))
    print(f"digits: {len(xtr)} train / {num_test} test images, 1x8x8, q={Q}; "
          f"{args.epochs} epochs per sigma; files in {args.out}/\n")

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    results, files = [], []
    for sigma in args.sigmas:
        L = dk.num_variants(sigma, q=Q)
        ckpt = out / f"digits-sigma{sigma:g}.pt"
        tsv = out / f"digits-sigma{sigma:g}.tsv"
        trained = train(ckpt, dataset="digits", sigma=sigma, epochs=args.epochs,
                        train_seed=args.seed, device="cpu", overwrite=True)
        t0 = time.perf_counter()
        certify_dataset(ckpt, tsv, max_index=max_index, device="cpu", overwrite=True,
                        progress=not args.no_progress)
        cert_s = time.perf_counter() - t0
        res_file = analysis.load_result(tsv)
        assert len(res_file) == num_test and res_file.L == L
        res = {
            "sigma": float(sigma), "L": L, "max_radius": res_file.max_radius, "num_test": len(res_file),
            "clean_accuracy": res_file.clean_accuracy(),
            "certified_accuracy": {float(r): res_file.certified_accuracy(r) for r in args.radii},
            "train_seconds": trained["seconds"], "certify_seconds": cert_s,
            "seconds_per_image": cert_s / len(res_file), "backend": backend,
            "checkpoint": str(ckpt), "results": str(tsv),
        }
        results.append(res)
        files.append(res_file)
        print(f"sigma={sigma:g}: L={L}, trained in {trained['seconds']:.1f}s -> {ckpt}; "
              f"certified {len(res_file)} images ({len(res_file) * L} forward passes) in "
              f"{cert_s:.2f}s -> {tsv}", flush=True)

    print("\nExact DSSN certificates on held-out digits (certified accuracy = correct "
          "and L1 radius >= R, [0,1] scale;\nmax R = floor(L/2)/q is the largest radius "
          "any image can get):\n")
    print(format_table(results, args.radii))

    radii = [r for r in args.radii if r > 0] or None
    report = analysis.analyze([f.path for f in files], radii)
    table_md = out / "table.md"
    table_md.write_text(report, encoding="utf-8")
    print("\n" + analysis.best_table(files, radii))

    written = [str(table_md)]
    if not args.no_plots:
        try:
            curves = analysis.plot_curves(files, out / "curves.png",
                                          title="Exact DSSN certificates, digits (q = 16)")
            noise = analysis.plot_noise(xte[:4], Q, 3.5, out / "noise.png")
            written += [str(curves), str(noise)]
        except analysis.ResultsError as exc:  # matplotlib missing
            print(f"\n(no plots: {exc})")
    print(f"\nfiles: checkpoints and result TSVs {', '.join(r['results'] for r in results)} "
          f"(+ .pt);\n       {', '.join(written)}")
    print("the same with the command line: dssn train / certify / analyze / plot "
          "(see README, 'The dssn command')")
    print(f"\ntotal {time.perf_counter() - t_all:.1f}s")
    return results


def entry() -> int:
    """``python -m dssn_kernels.workflow.demo``: user errors (scikit-learn missing, a bad
    --out, ...) are one line on stderr and exit status 2, as with the ``dssn`` command."""
    from .options import run_demo

    return run_demo(main, "dssn_kernels.workflow.demo")


if __name__ == "__main__":
    sys.exit(entry())
