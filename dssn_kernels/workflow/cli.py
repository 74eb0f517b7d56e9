"""dssn: train, certify, analyze and plot exact DSSN certificates; run the benchmarks.

    dssn train --dataset digits --sigma 0.5 --out runs/digits-0.5.pt
    dssn train --dataset digits --sigma 0.5 --out runs/digits-0.5.pt --resume   # after a crash
    dssn train-denoiser runs/clean.pt --objective stability --out runs/denoised.pt
    dssn certify runs/digits-0.5.pt --out runs/digits-0.5.tsv
    dssn analyze runs/digits-*.tsv
    dssn plot curves runs/digits-*.tsv --out runs/curves.png
    dssn plot noise --dataset digits --sigma 3.5 --out runs/noise.png
    dssn bench --quick
    torchrun --nproc_per_node=4 -m dssn_kernels certify model.pt --out results.tsv --max-index 500

User errors (a missing file, a result file of another run, a spec that disagrees with
the checkpoint, an output that exists or is locked by another run, ...) exit with status
2 and a one-line message, with nothing created or changed.
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

PROG = "dssn"


class UsageError(Exception):
    """A user error: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit status 2), like every other user error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _positive_int(text):
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _nonnegative_int(text):
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def _max_index(text):
    v = int(text)
    if v < -1:
        raise argparse.ArgumentTypeError(f"must be an index >= 0, or -1 for all images; got {v}")
    return v


def sigma_type(q: int):
    """An argparse type: a sigma that gives at least one split-noise variant at ``q`` (the
    demos' --sigmas, on digits: q = 16), refused in one line otherwise."""
    def parse(text):
        from ..spec import num_variants

        try:
            v = float(text)
            num_variants(v, q=q)
        except (TypeError, ValueError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return v
    return parse


def _radius(text):
    v = float(text)
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"must be a finite radius >= 0, got {text}")
    return v


def _add_threads(p):
    # also accepted after the subcommand (`dssn certify ... --threads 4`); SUPPRESS keeps
    # the top-level value when it is not given here
    p.add_argument("--threads", type=_positive_int, default=argparse.SUPPRESS,
                   help="torch.set_num_threads(N) (also accepted before the command)")


def _add_spec_args(p, what):
    g = p.add_argument_group("smoothing spec" + what)
    x = g.add_mutually_exclusive_group()
    x.add_argument("--sigma", type=float, help="noise level sigma (lambda = sigma * sqrt(3))")
    x.add_argument("--lam", type=float, help="splitting half-period lambda instead of sigma")
    g.add_argument("--q", type=int, help="quantization: pixels are k/q (digits 16, images 255)")
    g.add_argument("--seed", type=int, default=None,
                   help="seed of the split offsets numpy.random.RandomState(seed).randint(L, size=d)")


def _add_train_denoiser_parser(sub, datasets):
    from .denoiser import NOISES, OBJECTIVES

    d = sub.add_parser(
        "train-denoiser", help="train a DnCNN denoiser in front of a frozen classifier",
        description="Denoised smoothing (Salman et al. 2020, the DSSN paper's Appendix D): "
        "trains a DnCNN under the smoothing noise in front of the classifier of CLASSIFIER.pt "
        "(frozen: eval mode, weights untouched) and writes denoiser + classifier as one "
        "checkpoint that dssn certify / analyze / plot use like any other. Objectives: mse "
        "(||D(x~) - x||^2), stability (CE(F(D(x~)), argmax F(x))), mse-retrain (an mse "
        "denoiser, then a classifier of the same architecture trained from scratch through it, "
        "the denoiser fine-tuned with it). While it runs it holds OUT.lock, as dssn train does.")
    d.add_argument("classifier", help="checkpoint of the classifier (e.g. dssn train --noise none)")
    d.add_argument("--objective", choices=OBJECTIVES, required=True)
    d.add_argument("--out", required=True,
                   help="checkpoint to write; an existing file is refused unless --overwrite")
    d.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out (and start again over an interrupted state)")
    d.add_argument("--resume", action="store_true",
                   help="continue an interrupted training from OUT.train-state (same options)")
    d.add_argument("--noise", choices=NOISES, default="dssn",
                   help="training noise (default dssn: one random variant, the certification "
                        "offsets)")
    d.add_argument("--dataset", choices=datasets, help="default: the classifier checkpoint's")
    d.add_argument("--data-root", help="local folder of cifar10 / imagenet")
    _add_spec_args(d, " (default: the classifier checkpoint's; q is the data set's)")
    d.add_argument("--depth", type=_positive_int, help="DnCNN conv layers (default: 17; digits 5)")
    d.add_argument("--width", type=_positive_int, help="DnCNN channels (default: 64; digits 32)")
    d.add_argument("--no-clamp", dest="clamp", action="store_false",
                   help="leave the denoiser's output unclamped (Salman et al.); default: "
                        "clamped to [0, 1]")
    d.add_argument("--init", metavar="DENOISER.pt",
                   help="start the denoiser from the denoiser of this checkpoint (written by an "
                        "earlier train-denoiser, e.g. --objective mse before stability, as "
                        "Salman et al.); its depth, width, clamp, smoothing spec and noise must "
                        "be this run's. Recorded with its sha256: a resume needs the same")
    d.add_argument("--epochs", type=_positive_int,
                   help="denoiser epochs (default: digits 20, cifar10 90, imagenet 25)")
    d.add_argument("--retrain-epochs", type=_positive_int,
                   help="mse-retrain: classifier + fine-tuning epochs (default: digits 30, "
                        "cifar10 90, imagenet 30)")
    d.add_argument("--batch-size", type=_positive_int, help="default 64")
    d.add_argument("--lr", type=float, help="denoiser Adam learning rate (default 1e-3)")
    d.add_argument("--retrain-lr", type=float,
                   help="mse-retrain: classifier learning rate (default: 2e-3 on digits, else 1e-3)")
    d.add_argument("--train-seed", type=int, default=0,
                   help="seed of weight init, shuffling and noise draws (default 0)")
    d.add_argument("--max-train", type=_positive_int, help="train on the first N shuffled images only")
    d.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    d.add_argument("--no-progress", action="store_true")
    _add_threads(d)


def cmd_train_denoiser(args) -> int:
    from .denoiser import train_denoiser

    given = [f for f in ("--retrain-epochs", "--retrain-lr")
             if getattr(args, f[2:].replace("-", "_")) is not None]
    if given and args.objective != "mse-retrain":
        raise UsageError(f"{' and '.join(given)} {'applies' if len(given) == 1 else 'apply'} to "
                         f"--objective mse-retrain only, not {args.objective}")
    res = train_denoiser(args.classifier, args.out, objective=args.objective, noise=args.noise,
                         dataset=args.dataset, sigma=args.sigma, lam=args.lam, q=args.q,
                         seed=args.seed, depth=args.depth, width=args.width, clamp=args.clamp,
                         init=args.init, epochs=args.epochs, retrain_epochs=args.retrain_epochs,
                         batch_size=args.batch_size, lr=args.lr, retrain_lr=args.retrain_lr,
                         train_seed=args.train_seed, max_train=args.max_train,
                         data_root=args.data_root, device=args.device,
                         progress=not args.no_progress, overwrite=args.overwrite,
                         resume=args.resume)
    print(f"trained a {res['objective']} denoiser on {res['num_train']} {res['dataset']} images, "
          f"{res['spec'].describe()}, {res['noise']} noise, in {res['seconds']:.1f}s (last "
          f"epoch loss {res['final_loss']:.4f})")
    print(f"checkpoint: {res['path']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    from .data import DATASETS, SPLITS
    from .checkpoint import ARCHS

    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0],
                epilog="`dssn COMMAND --help` describes each command.")
    p.add_argument("--version", action="version", version=f"{PROG} (dssn-kernels) {__version__}")
    p.add_argument("--threads", type=_positive_int, help="torch.set_num_threads(N)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    t = sub.add_parser("train", help="train a base classifier under DSSN training noise",
                       description="Trains a base classifier on one random split-noise variant "
                       "per sample and step (the same offsets as certification; --noise picks "
                       "another noise) and saves a checkpoint holding the weights and the "
                       "smoothing spec. --sigma or --lam is required. While it runs it holds "
                       "OUT.lock: a second training into the same --out stops at once.")
    t.add_argument("--out", required=True,
                   help="checkpoint file to write (e.g. model.pt); an existing file is refused "
                        "unless --overwrite")
    t.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out (and start again over an interrupted "
                        "training's state file instead of resuming it)")
    t.add_argument("--resume", action="store_true",
                   help="continue an interrupted training from OUT.train-state (written after "
                        "every epoch; the same options are required); without that file "
                        "training starts from epoch 1")
    t.add_argument("--dataset", choices=DATASETS, default="digits",
                   help="default digits (bundled with scikit-learn, q = 16)")
    t.add_argument("--data-root", help="local folder of cifar10 / imagenet (nothing is downloaded)")
    t.add_argument("--arch", choices=sorted(a for a in ARCHS if a != "denoised"),
                   help="model (default: small_cnn for digits, wrn40_2 for cifar10, resnet50 for imagenet)")
    _add_spec_args(t, " (--sigma or --lam required; q defaults to the data set's)")
    t.add_argument("--epochs", type=_positive_int, help="default: digits 60, cifar10 120, imagenet 30")
    t.add_argument("--batch-size", type=_positive_int, help="default 64")
    t.add_argument("--lr", type=float, help="default: adam 2e-3 (digits), sgd 0.1")
    t.add_argument("--optimizer", choices=("adam", "sgd"),
                   help="default: adam + one-cycle for digits; SGD (momentum 0.9, nesterov, wd 1e-4) "
                        "+ cosine annealing otherwise, as in the paper")
    aug = t.add_mutually_exclusive_group()
    aug.add_argument("--augment", dest="augment", action="store_true", default=None,
                     help="random flips (and crops on cifar10); default on for cifar10/imagenet")
    aug.add_argument("--no-augment", dest="augment", action="store_false")
    t.add_argument("--train-seed", type=int, default=0,
                   help="seed of weight init, shuffling and noise draws (default 0)")
    t.add_argument("--noise", choices=("dssn", "ssn", "uniform", "none"), default="dssn",
                   help="training noise: dssn (one DSSN variant per image; default), ssn "
                        "(independent SSN), uniform (x + U(-lambda, lambda)^d, Yang et al.) or "
                        "none (clean images: a classifier for train-denoiser; the spec is still "
                        "stored, certify smooths with it)")
    t.add_argument("--stability", action="store_true",
                   help="stability training (Li et al. 2019): two noise draws per image, "
                        "loss CE(f(x1), y) + W * KL(f(x1) || f(x2))")
    t.add_argument("--stability-weight", type=float, metavar="W",
                   help="W of --stability (default 6; only with --stability)")
    t.add_argument("--compile", action="store_true",
                   help="train through torch.compile(model) (recorded in the checkpoint; a "
                        "resume needs the same)")
    t.add_argument("--compile-backend", help=argparse.SUPPRESS)   # tests: eager, aot_eager
    t.add_argument("--autocast", choices=("bf16", "fp16"),
                   help="forward and loss under torch.autocast in bfloat16 or float16 (fp16: "
                        "CUDA only, with a gradient scaler); recorded like --compile")
    t.add_argument("--max-train", type=_positive_int, help="train on the first N shuffled images only")
    t.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    t.add_argument("--workers", type=_nonnegative_int, default=0,
                   help="data loader processes (imagenet; default 0)")
    t.add_argument("--no-progress", action="store_true")
    _add_threads(t)

    _add_train_denoiser_parser(sub, DATASETS)

    c = sub.add_parser("certify", help="certify a data split with a checkpoint (resumable, shardable)",
                       description="Certifies the images of a data split (--skip/--max) exactly "
                       "with DSSN, or by Monte Carlo with --method ssn|uniform, and writes a TSV "
                       "(idx label predict radius correct time counts; with --margin also "
                       "num_ambiguous ambiguous; Monte Carlo also selection). Rerunning the same "
                       "command resumes; a file of another checkpoint, spec, split, selection, "
                       "margin, method or evaluation setting is refused. While it runs it holds "
                       "OUT.lock: a second certify of the same --out stops at once. Under "
                       "torchrun the images are split over the ranks and rank 0 merges the rows.")
    c.add_argument("checkpoint", help="checkpoint written by `dssn train` or `dssn train-denoiser`")
    c.add_argument("--out", required=True, help="result TSV (appended to / resumed)")
    c.add_argument("--dataset", choices=DATASETS, help="default: the checkpoint's")
    c.add_argument("--data-root", help="local folder of cifar10 / imagenet")
    c.add_argument("--split", choices=SPLITS, default="test", help="default test")
    c.add_argument("--skip", type=_positive_int, default=1,
                   help="certify every SKIP-th image (Cohen et al.'s --skip; default 1)")
    c.add_argument("--max", "--max-index", type=_max_index, default=-1, dest="max_index",
                   help="stop before image index MAX (Cohen et al.'s --max; -1: all). Under "
                        "torchrun spell it --max-index: torchrun's own parser rejects --max as "
                        "an ambiguous abbreviation of its --max-restarts")
    _add_spec_args(c, " (optional: must agree with the checkpoint's)")
    c.add_argument("--batch-size", type=_positive_int, help="model forward batch (default 256)")
    c.add_argument("--images-per-batch", type=_positive_int,
                   help="images certified (and written) per step (default: what fills a forward batch)")
    c.add_argument("--backend", default="auto",
                   help="auto (default), cpp, torch, triton or cuda")
    c.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    c.add_argument("--dist-backend", choices=("gloo", "nccl"),
                   help="torch.distributed backend under torchrun (default: nccl on GPU, gloo on CPU)")
    c.add_argument("--overwrite", action="store_true",
                   help="discard an existing result file instead of resuming it")
    c.add_argument("--margin", type=float, default=0.0, metavar="TAU",
                   help="vote margin tau >= 0 (default 0: off): a variant whose top logit beats "
                        "the runner-up by less than TAU votes for no class and counts against "
                        "the prediction, so the certificate survives logit changes below TAU/2 "
                        "(another GPU, batch size, TF32...). The file records TAU and the "
                        "ambiguous counts (columns num_ambiguous, ambiguous); radius -1/q marks "
                        "an image not certified even at radius 0. Resuming needs the same TAU")
    c.add_argument("--compile", action="store_true",
                   help="compile the model with torch.compile, once for the forward batch's "
                        "shape (CUDA graphs on a GPU); recorded in the file's header: resuming "
                        "needs the same evaluation settings")
    c.add_argument("--autocast", choices=("bf16", "fp16"),
                   help="run the model under torch.autocast in bfloat16 or float16; recorded "
                        "in the header like --compile (see dk.logit_drift for the margin that "
                        "covers both evaluations)")
    c.add_argument("--method", choices=("dssn", "ssn", "uniform"),
                   help="dssn (exact), or the Monte Carlo certificates of independent SSN (ssn) "
                        "or uniform noise (Yang et al.); default: the checkpoint's training noise "
                        "(dssn for a classifier trained with --noise none)")
    c.add_argument("--n0", type=_positive_int, help="Monte Carlo selection draws (default 64)")
    c.add_argument("--n", "--N", type=_positive_int, dest="n",
                   help="Monte Carlo estimation draws (default 100000; under torchrun write --N, "
                        "as torchrun reads --n as an abbreviation of its own options)")
    c.add_argument("--alpha", type=float, help="Monte Carlo failure probability (default 0.001)")
    c.add_argument("--noise-seed", type=_nonnegative_int,
                   help="Monte Carlo noise seed: image i's noise is seeded by (seed, i) (default 0)")
    c.add_argument("--no-progress", action="store_true")
    _add_threads(c)

    a = sub.add_parser("analyze", help="certified accuracy tables (markdown) from result files",
                       description="Certified accuracy at chosen radii per file, and the best "
                       "over sigma in the layout of the paper's Table 1. A file given as "
                       "LABEL=PATH is grouped under LABEL (one table row per label).")
    a.add_argument("files", nargs="+", metavar="[LABEL=]FILE")
    a.add_argument("--radii", type=_radius, nargs="+",
                   help="L1 radii, [0, 1] scale (default: 0.5 .. 4.0 for q=255, else 8 evenly "
                        "spaced radii up to the largest any file can certify)")
    a.add_argument("--decimals", type=_nonnegative_int, default=1,
                   help="decimals of the percentages (default 1)")
    a.add_argument("--out", help="also write the markdown to this file (not one of FILE; "
                                 "an earlier table is replaced, never a binary or result "
                                 "file; written atomically, missing folders created)")
    _add_threads(a)

    pl = sub.add_parser("plot", help="plots (PNG, or PDF, SVG, ... by --out's suffix): "
                                     "accuracy-radius curves, noise pictures")
    _add_threads(pl)
    psub = pl.add_subparsers(dest="plot", metavar="KIND", required=True)
    pc = psub.add_parser("curves", help="certified accuracy against radius, one line per file")
    pc.add_argument("files", nargs="+", metavar="[LABEL=]FILE")
    pc.add_argument("--out", required=True, help="image file: .png (or .pdf, .svg, ...)")
    pc.add_argument("--title")
    _add_threads(pc)
    pn = psub.add_parser("noise", help="images under DSSN noise next to uniform additive noise "
                                       "(the paper's Figure 3)")
    pn.add_argument("--out", required=True, help="image file: .png (or .pdf, .svg, ...)")
    pn.add_argument("--dataset", choices=DATASETS, default="digits", help="default digits")
    pn.add_argument("--data-root", help="local folder of cifar10 / imagenet")
    pn.add_argument("--split", choices=SPLITS, default="test", help="default test")
    pn.add_argument("--indices", type=int, nargs="+", default=[0, 1, 2, 3],
                    help="images of the split to show (default 0 1 2 3)")
    pn.add_argument("--sigma", type=float, default=3.5, help="default 3.5, as in Figure 3")
    pn.add_argument("--seed", type=int, default=0, help="split-offset seed (default 0)")
    pn.add_argument("--noise-seed", type=int, default=0,
                    help="seed of the variant / noise draws (default 0)")
    _add_threads(pn)

    b = sub.add_parser("bench", help="run the benchmark suite (benchmarks/run_all.py)",
                       description="Runs benchmarks/run_all.py with this python: DSSN vs "
                       "100k-sample Monte Carlo (Figure 6), overhead over the model's forward "
                       "passes, the naive released-code-style pipeline, peak memory against L, "
                       "micro-benchmarks of the ops and early exit; JSON, markdown and PNG reports. "
                       "Arguments after -- go to run_all.py as they are.")
    b.add_argument("--quick", action="store_true", help="a short smoke run (under a minute)")
    b.add_argument("--out", help="report folder (default benchmarks/results)")
    b.add_argument("--device", help="cpu (default) or cuda")
    b.add_argument("--model", choices=("small", "wrn40-2"),
                   help="model of the Monte Carlo comparison (default: small on a CPU, "
                        "wrn40-2 on a GPU)")
    b.add_argument("--only", nargs="+", metavar="STEP",
                   help="vs_monte_carlo, overhead, overhead_large, micro_ops, early_exit, "
                        "precision (default: all but precision)")
    _add_threads(b)
    b.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return p


# --------------------------------------------------------------------------- commands

def cmd_train(args) -> int:
    from .trainer import train

    if args.stability_weight is not None and not args.stability:
        raise UsageError("--stability-weight applies to --stability training only: add "
                         "--stability, or leave the weight out")
    res = train(args.out, dataset=args.dataset, arch=args.arch, sigma=args.sigma,
                lam=args.lam, q=args.q, seed=0 if args.seed is None else args.seed,
                epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                optimizer=args.optimizer, augment=args.augment,
                train_seed=args.train_seed, max_train=args.max_train,
                data_root=args.data_root, device=args.device, workers=args.workers,
                progress=not args.no_progress, overwrite=args.overwrite,
                resume=args.resume, noise=args.noise, stability=args.stability,
                stability_weight=6.0 if args.stability_weight is None else args.stability_weight,
                compile=({"backend": args.compile_backend} if args.compile_backend
                         else args.compile),
                autocast=args.autocast)
    print(f"trained {res['arch']} on {res['num_train']} {args.dataset} images, "
          f"{res['spec'].describe()}, in {res['seconds']:.1f}s (last epoch: loss "
          f"{res['final_loss']:.3f}, accuracy under noise {100 * res['final_noisy_accuracy']:.1f}%)")
    print(f"checkpoint: {res['path']}")
    return 0


def cmd_certify(args) -> int:
    from .certify_data import certify_dataset

    res = certify_dataset(
        args.checkpoint, args.out, dataset=args.dataset, split=args.split,
        data_root=args.data_root, skip=args.skip, max_index=args.max_index, sigma=args.sigma,
        lam=args.lam, q=args.q, seed=args.seed, batch_size=args.batch_size,
        images_per_batch=args.images_per_batch, backend=args.backend, device=args.device,
        overwrite=args.overwrite, progress=not args.no_progress, dist_backend=args.dist_backend,
        margin=args.margin, method=args.method, n0=args.n0, n=args.n, alpha=args.alpha,
        noise_seed=args.noise_seed, compile=args.compile, autocast=args.autocast)
    if res["rank"] == 0:
        ranks = f" over {res['world_size']} ranks" if res["world_size"] > 1 else ""
        clean = (f"clean accuracy {100 * res['clean_accuracy']:.1f}%" if res["rows"]
                 else "no images certified yet")
        print(f"certified {res['certified']} images{ranks} in {res['seconds']:.1f}s "
              f"(rank 0); {res['rows']} rows in {res['out']}, {clean}"
              + (f"; margin {res['margin']:g}: {res['not_certified']} not certified even at "
                 "radius 0" if res["margin"] > 0 else ""))
    return 0


def cmd_analyze(args) -> int:
    from .analysis import analyze, parse_result_arg
    from .options import check_not_input, check_output_path
    from .results import write_text_atomic

    if args.out is not None:
        check_output_path(args.out)
        check_not_input(args.out, [("one of the result files", path)
                                   for _, path in map(parse_result_arg, args.files)], "the table")
        _check_replaces_a_table(args.out)
    text = analyze(args.files, args.radii, args.decimals)
    print(text, end="")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        # through a temporary file and a rename: never a half-written table
        write_text_atomic(args.out, text)
        print(f"\nwritten to {args.out}")
    return 0


def _check_replaces_a_table(out) -> None:
    """analyze --out replaces an earlier table, never another kind of file: an existing
    --out holding binary data (a checkpoint, an image) or a dssn result file is refused."""
    import codecs

    from .results import HEADER_PREFIX

    path = Path(out)
    if not path.is_file():
        return
    with open(path, "rb") as f:
        head = f.read(4096)
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
        text = b"\0" not in head
    except UnicodeDecodeError:
        text = False
    if not text or head.startswith(HEADER_PREFIX.encode()):
        what = "is a dssn result file" if text else "holds binary data (a checkpoint? an image?)"
        raise UsageError(f"--out {out} exists and {what}, not a table; nothing was changed: "
                         "give another name for the table")


def cmd_plot(args) -> int:
    from . import analysis

    analysis.check_image_path(args.out)
    if args.plot == "curves":
        out = analysis.plot_curves(analysis.load_results(args.files), args.out, title=args.title)
    else:
        from .data import load_dataset

        ds = load_dataset(args.dataset, args.split, args.data_root)
        bad = [i for i in args.indices if not 0 <= i < len(ds)]
        if bad:
            raise UsageError(f"--indices {bad} out of range: {args.dataset} {args.split} has "
                             f"{len(ds)} images")
        x, _ = ds.get(args.indices)
        try:
            out = analysis.plot_noise(x, ds.q, args.sigma, args.out, seed=args.seed,
                                      noise_seed=args.noise_seed)
        except analysis.ResultsError:
            raise
        except (TypeError, ValueError) as exc:
            raise UsageError(str(exc)) from None
    print(f"plot: {out}")
    return 0


def cmd_bench(args) -> int:
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "run_all.py"
    if not script.is_file():
        raise UsageError(f"the benchmark suite is not here ({script} is missing): `dssn bench` "
                         "runs from a source checkout")
    rest = list(args.rest)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    cmd = [sys.executable, str(script)] + (["--quick"] if args.quick else [])
    for flag in ("out", "device", "model", "threads"):
        if getattr(args, flag, None) is not None:
            cmd += [f"--{flag}", str(getattr(args, flag))]
    if args.only:
        cmd += ["--only", *args.only]
    return subprocess.call(cmd + rest)


COMMANDS = {"train": cmd_train, "train-denoiser": cmd_train_denoiser, "certify": cmd_certify,
            "analyze": cmd_analyze, "plot": cmd_plot, "bench": cmd_bench}


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .options import USER_ERRORS, Terminated, sigterm_as_interrupt

    def fail(msg: str, code: int = 2) -> int:
        rank = int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
        where = f"[rank {rank}] " if rank else ""
        sys.stderr.write(f"{where}{PROG} {args.command}: error: {msg}\n")  # one write: no interleaving
        sys.stderr.flush()
        return code

    try:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        with sigterm_as_interrupt():
            return COMMANDS[args.command](args)
    except (UsageError, *USER_ERRORS) as exc:
        return fail(str(exc))
    except OSError as exc:
        if exc.filename is None:
            raise
        return fail(f"{exc.strerror or type(exc).__name__}: {exc.filename}")
    except KeyboardInterrupt as exc:
        resume = "; rerun the same command with --resume to continue from the last finished epoch"
        # certify --overwrite would discard the rows again: resuming is without it
        again = ("the same command without --overwrite" if getattr(args, "overwrite", False)
                 else "the same command")
        hint = {"certify": f"; rerun {again} to resume", "train": resume,
                "train-denoiser": resume}.get(args.command, "")
        if isinstance(exc, Terminated):   # 128 + SIGTERM, as a shell reports it
            return fail(f"terminated (SIGTERM){hint}", 128 + signal.SIGTERM)
        return fail(f"interrupted{hint}", 130)


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
