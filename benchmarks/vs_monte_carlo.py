#!/usr/bin/env python
"""Certification time per image: exact DSSN against Yang et al.'s uniform-noise Monte Carlo
certificate with n = 100,000 samples (the paper's Figure 6), same model, same machine, same
chunked pipeline and vote kernels, in one run.

    python benchmarks/vs_monte_carlo.py [--quick] [--out DIR] [--device cpu|cuda]
                                        [--model small|wrn40-2] [--sigmas ...]
                                        [--stem NAME]

For each sigma (q = 255, L = dk.num_variants(sigma) = 220, 441, 883, 1766, 3091 for
sigma = 0.25, 0.5, 1, 2, 3.5):

* DSSN: ``dk.certify(model, x, sigma=...)`` of B images, median over repetitions (half
  before, half after the Monte Carlo run), divided by B;
* Monte Carlo: ``dssn_kernels.workflow.baselines.certify_uniform(model, x, sigma=..., n0=64,
  n=n_timed)`` of one image (B_mc images, divided by B_mc), one timed run after a warm-up.
  When ``n_timed`` < ``n_reported`` (= 100,000) the reported time is the timed one scaled
  linearly in the number of forwards, (n0 + n_reported) / (n0 + n_timed); the JSON and
  the table say so per row (``mc_method``: "measured" or "extrapolated"). By default the
  small model on a CPU and every model on a GPU are timed at the full n = 100,000; the
  wrn40-2 on a CPU (about 2 ms per forward) and ``--quick`` extrapolate.

speedup = MC time / DSSN time; the goal is 0.9 * (n0 + n) / L: DSSN must use each forward
at least 90% as efficiently as Monte Carlo does (``forward_efficiency`` = MC seconds per
forward / DSSN seconds per forward). Writes vs_monte_carlo.{json,md,png} into --out.
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import dssn_kernels as dk  # noqa: E402
from dssn_kernels.backends import resolve_backend  # noqa: E402
from dssn_kernels.workflow.baselines import certify_uniform  # noqa: E402

import bench_common as bc  # noqa: E402

STEM = "vs_monte_carlo"
GOAL_EFFICIENCY = 0.9


def measure(args, model, device) -> list[dict]:
    x = bc.make_images(args.images, args.seed, device)
    x_mc = bc.make_images(args.mc_images, args.seed, device).float() / bc.Q
    kw = dict(batch_size=args.batch_size)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    # warm-up (lazy initialization, allocator, cudnn autotuning)
    dk.certify(model, x, L=min(64, args.batch_size), q=bc.Q, backend=args.backend, **kw)
    certify_uniform(model, x_mc, sigma=1.0, n0=8, n=min(args.batch_size, args.mc_n_timed),
                    generator=gen, **kw)
    rows = []
    for sigma in args.sigmas:
        L = dk.num_variants(sigma, q=bc.Q)
        def run_dssn():
            return bc.timed(lambda: dk.certify(model, x, sigma=sigma, q=bc.Q,
                                               backend=args.backend, **kw), device)

        # DSSN runs on both sides of the long Monte Carlo run, so that a change of load
        # on a shared machine during the run weighs on both methods alike
        before = (args.repeats + 1) // 2
        dssn_times = [run_dssn() for _ in range(before)]
        mc_timed = bc.timed(lambda: certify_uniform(model, x_mc, sigma=sigma, n0=args.n0,
                                                    n=args.mc_n_timed, generator=gen, **kw),
                            device) / args.mc_images
        dssn_times += [run_dssn() for _ in range(args.repeats - before)]
        dssn = statistics.median(dssn_times) / args.images
        forwards_timed = args.n0 + args.mc_n_timed
        forwards_reported = args.n0 + args.mc_n
        mc = mc_timed * forwards_reported / forwards_timed
        goal = GOAL_EFFICIENCY * forwards_reported / L
        speedup = mc / dssn
        rows.append({
            "sigma": sigma, "L": L,
            "dssn_s_per_image": dssn, "dssn_times_s": dssn_times, "dssn_images": args.images,
            "mc_s_per_image": mc, "mc_s_per_image_timed": mc_timed,
            "mc_images": args.mc_images, "n0": args.n0,
            "n_timed": args.mc_n_timed, "n_reported": args.mc_n,
            "mc_method": "measured" if args.mc_n_timed == args.mc_n else "extrapolated",
            "dssn_us_per_forward": 1e6 * dssn / L,
            "mc_us_per_forward": 1e6 * mc_timed / forwards_timed,
            "forward_efficiency": (mc_timed / forwards_timed) / (dssn / L),
            "speedup": speedup, "speedup_goal": goal, "meets_goal": speedup >= goal,
        })
        print(f"sigma {sigma:g}: L {L}, DSSN {dssn:.4f} s/image, MC {mc:.3f} s/image "
              f"({rows[-1]['mc_method']}), speedup {speedup:.1f}x (goal {goal:.1f}x)",
              file=sys.stderr)
    return rows


def markdown(result) -> str:
    env, rows = result["environment"], result["rows"]
    extrapolated = [r for r in rows if r["mc_method"] == "extrapolated"]
    lines = ["# Certification time per image: DSSN vs uniform-noise Monte Carlo (Figure 6)",
             "", bc.describe_environment(env),
             f"Forward batch {env['batch_size']}, q = {env['q']}. DSSN: `dk.certify` of "
             f"{env['images']} image(s), median of {env['repeats']} run(s) (before and after "
             f"the Monte Carlo run), per image. "
             f"Monte Carlo: `certify_uniform` (Yang et al. 2020), n0 = {env['n0']} + "
             f"n = {env['mc_n']} forwards per image, {env['mc_images']} image(s), one timed "
             f"run. Goal: speedup >= 0.9 * (n0 + n) / L.", ""]
    if extrapolated:
        lines += [f"**Monte Carlo timed with n = {extrapolated[0]['n_timed']} and scaled "
                  f"linearly to n = {extrapolated[0]['n_reported']}** (per-forward "
                  f"throughput measured, rows marked `extrapolated`).", ""]
    else:
        lines += [f"Monte Carlo timed at the full n = {env['mc_n']} for every sigma.", ""]
    head = ["sigma", "L", "DSSN (s/image)", "MC (s/image)", "MC method", "speedup",
            "goal", "meets goal", "us/forward DSSN", "us/forward MC", "forward efficiency"]
    body = [[f"{r['sigma']:g}", r["L"], f"{r['dssn_s_per_image']:.4f}",
             f"{r['mc_s_per_image']:.3f}", f"{r['mc_method']} (n = {r['n_timed']})",
             f"{r['speedup']:.1f}x", f"{r['speedup_goal']:.1f}x",
             "yes" if r["meets_goal"] else "**no**", f"{r['dssn_us_per_forward']:.2f}",
             f"{r['mc_us_per_forward']:.2f}", f"{r['forward_efficiency']:.3f}"]
            for r in rows]
    lines += bc.md_table(head, body)
    p = bc.PAPER_SIGMA35_SECONDS
    lines += ["", f"For reference, the paper (WRN-40-2, CIFAR-10, one RTX 2080 Ti) reports "
                  f"{p['dssn']} s (DSSN) and {p['uniform_mc']} s (Yang et al.) per image at "
                  f"sigma 3.5, a {p['uniform_mc'] / p['dssn']:.1f}x speedup."]
    return "\n".join(lines) + "\n"


def plot(result, path: Path) -> str:
    plt = bc.pyplot()
    rows, env = result["rows"], result["environment"]
    sig = [r["sigma"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    panels = [(a, "certification time per image (s)",
               [("mc_s_per_image", "o-", "Yang et al. (MC, n=100k)"),
                ("dssn_s_per_image", "s-", "DSSN (exact)")]),
              (b, "MC time / DSSN time",
               [("speedup", "o-", "measured speedup"),
                ("speedup_goal", "k--", "goal 0.9 (n0+n)/L")])]
    for ax, ylabel, series in panels:
        for key, style, label in series:
            ax.plot(sig, [r[key] for r in rows], style, label=label)
        ax.set_yscale("log")
        ax.set_xlabel("sigma")
        ax.set_ylabel(ylabel)
        ax.legend()
        ax.grid(True, which="both", alpha=0.3)
    return bc.save_figure(fig, path, env)


def parse_args(argv=None):
    p = bc.arg_parser(__doc__, "smoke run: 1 DSSN image, 1 repetition, MC timed with "
                               "n = 512 and extrapolated")
    p.add_argument("--model", choices=bc.MODELS, default="small")
    p.add_argument("--stem", default=STEM, help="output file names <stem>.{json,md,png}")
    p.add_argument("--backend", default="auto", help="DSSN backend (default auto)")
    p.add_argument("--sigmas", type=float, nargs="+", default=list(bc.FIGURE6_SIGMAS))
    p.add_argument("--batch-size", type=int, default=None,
                   help="forward batch size, both methods (default 256 on CPU, 1024 on GPU)")
    p.add_argument("--images", type=int, default=None, help="DSSN images (default 4; quick 1)")
    p.add_argument("--repeats", type=int, default=None, help="DSSN runs (default 3; quick 1)")
    p.add_argument("--n0", type=int, default=64)
    p.add_argument("--mc-n", type=int, default=100_000, help="the reported MC sample size n")
    p.add_argument("--mc-n-timed", type=int, default=None,
                   help="MC samples actually run (default: --mc-n, except wrn40-2 on CPU: "
                        "2048 and --quick: 512); the time is scaled to --mc-n")
    p.add_argument("--mc-images", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plot", action="store_true")
    args = bc.parse_args(p, argv)
    on_gpu = torch.device(args.device).type == "cuda"
    if args.batch_size is None:
        args.batch_size = 1024 if on_gpu else 256
    if args.images is None:
        args.images = 1 if args.quick else 4
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.mc_n_timed is None:
        if args.quick:
            args.mc_n_timed = min(512, args.mc_n)
        elif args.model == "wrn40-2" and not on_gpu:
            args.mc_n_timed = min(2048, args.mc_n)
        else:
            args.mc_n_timed = args.mc_n
    if not 1 <= args.mc_n_timed <= args.mc_n:
        p.error("--mc-n-timed must be in 1..--mc-n")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = args.device
    model = bc.build_model(args.model, args.seed, device)
    backend = resolve_backend(args.backend, device)
    env = bc.environment(device, args.model, model, [backend], batch_size=args.batch_size,
                         images=args.images, repeats=args.repeats, n0=args.n0,
                         mc_n=args.mc_n, mc_n_timed=args.mc_n_timed,
                         mc_images=args.mc_images, mc_alpha=0.001,
                         mc_backend=resolve_backend("auto", device),
                         sigmas=list(args.sigmas), quick=args.quick, seed=args.seed)
    result = {"environment": env, "rows": measure(args, model, device)}
    return bc.publish(args.out, args.stem, result, markdown(result),
                      None if args.no_plot else plot)


if __name__ == "__main__":
    main()
