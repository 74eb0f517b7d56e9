#!/usr/bin/env python
"""Runs the whole benchmark suite and writes every report into one folder.

    python benchmarks/run_all.py [--quick] [--out DIR] [--device cpu|cuda]
                                 [--model small|wrn40-2] [--threads N] [--only STEP ...]

Steps (each writes <name>.json and <name>.md into --out, the first two a PNG too):

* ``vs_monte_carlo`` (vs_monte_carlo.py): certification time per image, DSSN against
  Yang et al.'s uniform-noise Monte Carlo with n = 100,000 (the paper's Figure 6), on
  ``--model``, for sigma in 0.25, 0.5, 1, 2, 3.5, with the speedup goal 0.9 (n0 + n) / L;
* ``overhead`` (overhead.py, small CNN): certify against the model's forward passes alone,
  the naive released-code-style pipeline, kernel times, peak memory against L;
* ``overhead_large`` (overhead.py on a larger model, --stem overhead_<model>, no memory
  probes): the naive pipeline against the fused one on WRN-40-2 (``--quick`` on a CPU: the
  ``wide`` CNN, 4x the small one's channels);
* ``micro_ops`` (pytest benchmarks/test_micro_ops.py --benchmark-only): the expand and
  vote ops of every available backend; micro_ops.json is pytest-benchmark's JSON;
* ``early_exit`` (early_exit.py, in a subprocess): variants evaluated and time of the
  early-exit ``certify_at`` / ``predict`` against the full certificate;
* ``precision`` (only with ``--precision-rows`` or ``--only precision``; overhead.py
  --precision-only on the small CNN and WRN-40-2, 2 images, sigma 0.25): certify compiled,
  under bfloat16 autocast and both, as speedups over the eager fp32 forward passes, with
  the compile times, the compilations counted and the votes that differ from eager fp32
  (minutes on a CPU: inductor compiles each model twice).

Then summary.json (environment, steps, files, seconds, errors) and summary.md (every
report in one page). ``--quick`` runs everything small (well under a minute on 2 CPU
cores; Monte Carlo timed with n = 512 and extrapolated, which the reports say). Exit
status 1 if a step failed (the others still run).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_common as bc  # noqa: E402

STEPS = ("vs_monte_carlo", "overhead", "overhead_large", "micro_ops", "early_exit")
OPTIONAL_STEPS = ("precision",)
PRECISION_MODELS = ("small", "wrn40-2")
LARGE_MODEL = "wrn40-2"


def _common(args) -> list[str]:
    out = ["--out", str(args.out), "--device", args.device]
    if args.threads is not None:
        out += ["--threads", str(args.threads)]
    return out


def step_vs_monte_carlo(args) -> dict:
    import vs_monte_carlo
    argv = _common(args) + ["--model", args.model] + (["--quick"] if args.quick else [])
    return vs_monte_carlo.main(argv)["files"]


def step_overhead(args) -> dict:
    import overhead
    argv = _common(args) + ["--model", "small"] + (["--quick"] if args.quick else [])
    return overhead.main(argv)["files"]


def step_overhead_large(args) -> dict:
    """The naive pipeline against the fused one on a larger model: WRN-40-2 on a GPU (8
    images) and on a CPU (one image, sigma 0.25 and 1, three repetitions); ``--quick`` on a
    CPU: the ``wide`` CNN, one image, sigma 0.25, two repetitions (WRN-40-2 takes ~2 ms per
    forward on 2 cores)."""
    import overhead
    on_gpu = "cuda" in args.device
    model = "wide" if args.quick and not on_gpu else LARGE_MODEL
    argv = _common(args) + ["--model", model, "--stem", f"overhead_{model}", "--no-memory"]
    if args.quick:
        argv += ["--images", "1", "--repeats", "2", "--sigmas", "0.25"]
    elif on_gpu:
        argv += ["--images", "8", "--repeats", "3"]
    else:
        argv += ["--images", "1", "--repeats", "3", "--sigmas", "0.25", "1.0"]
    return overhead.main(argv)["files"]


def step_precision(args) -> dict:
    """overhead.py --precision-only for each of PRECISION_MODELS (2 images, sigma 0.25,
    forward batch 256, 5 repetitions; --quick: 2), the reports joined in precision.md."""
    import overhead
    files, parts = {}, []
    for model in PRECISION_MODELS:
        argv = _common(args) + ["--model", model, "--stem", f"precision_{model}",
                                "--precision-only", "--images", "2", "--sigmas", "0.25",
                                "--repeats", "2" if args.quick else "5", "--no-plot"]
        out = overhead.main(argv)["files"]
        files[f"json_{model}"] = out["json"]
        parts.append(Path(out["md"]).read_text())
    md = Path(args.out) / "precision.md"
    md.write_text("\n".join(parts))
    files["md"] = str(md)
    return files


def _micro_markdown(data: dict, env: dict, skipped: dict) -> str:
    lines = ["# Micro-benchmarks of the expand and vote ops (pytest-benchmark)", "",
             bc.describe_environment(env),
             "One certify chunk: expand writes 256 variants of one 3x32x32 image (sigma 1, "
             "L = 883) into a float32 workspace; vote folds 256 x 10 logits into counts.", ""]
    rows = []
    for b in sorted(data.get("benchmarks", []), key=lambda b: b["name"]):
        st, info = b["stats"], b.get("extra_info", {})
        gbs = ""
        if "bytes_written" in info:
            gbs = f"{info['bytes_written'] / st['median'] / 1e9:.2f}"
        rows.append([b["name"].split("[")[0].replace("test_", ""), info.get("backend", "?"),
                     info.get("device", "?"), f"{1e6 * st['min']:.1f}",
                     f"{1e6 * st['median']:.1f}", f"{1e6 * st['mean']:.1f}", st["rounds"],
                     gbs or "-"])
    lines += bc.md_table(["op", "backend", "device", "min (us)", "median (us)", "mean (us)",
                          "rounds", "GB/s written"], rows)
    if skipped:
        lines += ["", "Skipped: " + "; ".join(f"{b}: {r}" for b, r in skipped.items()) + "."]
    return "\n".join(lines) + "\n"


def _run(cmd, args, threads_var: str, tail: int) -> None:
    """Runs cmd in the repository root, with --threads passed on in the environment
    variable threads_var; prints the last tail characters of its stdout to stderr and
    raises RuntimeError if it fails."""
    env = dict(os.environ)
    if args.threads is not None:
        env[threads_var] = str(args.threads)
    proc = subprocess.run(cmd, cwd=HERE.parent, env=env, capture_output=True, text=True,
                          check=False)
    print(proc.stdout[-tail:], file=sys.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def step_micro_ops(args) -> dict:
    import test_micro_ops as micro
    out = Path(args.out)
    raw = out / "micro_ops.json"
    cmd = [sys.executable, "-m", "pytest", str(HERE / "test_micro_ops.py"), "--benchmark-only",
           "-q", "-p", "no:cacheprovider", f"--benchmark-json={raw}",
           "--benchmark-columns=min,median,mean,rounds"]
    if args.quick:
        cmd += ["--benchmark-max-time=0.05", "--benchmark-min-rounds=3",
                "--benchmark-warmup=off"]
    _run(cmd, args, threads_var="DSSN_BENCH_THREADS", tail=4000)
    data = json.loads(raw.read_text())
    skipped = micro.skip_reasons()
    ran = sorted({b.get("extra_info", {}).get("backend") for b in data.get("benchmarks", [])})
    environment = bc.environment(args.device, None, None, ran, quick=args.quick,
                                 skipped=skipped)
    data["dssn_environment"] = environment
    raw.write_text(json.dumps(data, indent=2) + "\n")
    md = _micro_markdown(data, environment, skipped)
    (out / "micro_ops.md").write_text(md)
    print(md)
    return {"json": str(raw), "md": str(out / "micro_ops.md")}


def step_early_exit(args) -> dict:
    script = HERE / "early_exit.py"
    out = Path(args.out)
    cmd = [sys.executable, str(script), "--out", str(out), "--device", args.device]
    cmd += ["--quick"] if args.quick else []
    _run(cmd, args, threads_var="OMP_NUM_THREADS", tail=6000)
    return {"json": str(out / "early_exit.json"), "md": str(out / "early_exit.md")}


def parse_args(argv=None):
    p = bc.arg_parser(__doc__, "everything small (CI smoke run)", out_help="output folder")
    p.add_argument("--model", choices=("small", "wrn40-2"), default=None,
                   help="model of the Monte Carlo comparison (default: small on a CPU, "
                        "wrn40-2 on a GPU)")
    p.add_argument("--only", nargs="+", choices=STEPS + OPTIONAL_STEPS, default=None,
                   metavar="STEP", help=f"run only these steps ({', '.join(STEPS + OPTIONAL_STEPS)})")
    p.add_argument("--precision-rows", action="store_true",
                   help="also run the precision step: certify compiled, bf16 and compiled + "
                        "bf16 on the small CNN and WRN-40-2 against the eager fp32 forward")
    args = bc.parse_args(p, argv)
    if args.model is None:
        args.model = "wrn40-2" if "cuda" in args.device else "small"
    return args


def summary_markdown(summary: dict) -> str:
    lines = ["# DSSN benchmark suite" + (" (quick)" if summary["quick"] else ""), "",
             f"`{summary['command']}`, {summary['seconds']:.1f} s in all.", ""]
    lines += bc.md_table(["step", "status", "seconds", "files"], [
        [name, "ok" if s["ok"] else "**failed**", f"{s['seconds']:.1f}",
         ", ".join(Path(f).name for f in s.get("files", {}).values())]
        for name, s in summary["steps"].items()])
    for name, s in summary["steps"].items():
        md = s.get("files", {}).get("md")
        if md and Path(md).is_file():
            text = Path(md).read_text()
            lines += ["", "#" + text if text.startswith("# ") else text]
        png = s.get("files", {}).get("png")
        if png:
            lines += ["", f"![{name}]({Path(png).name})"]
        if not s["ok"]:
            lines += ["", f"## {name}: failed", "", "```", s["error"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = list(args.only or STEPS)
    if args.precision_rows and "precision" not in names:
        names.append("precision")
    steps = {name: globals()[f"step_{name}"] for name in names}
    t_all = time.perf_counter()
    results = {}
    for name, fn in steps.items():
        print(f"== {name}", file=sys.stderr)
        t0 = time.perf_counter()
        try:
            results[name] = {"ok": True, "files": fn(args)}
        except Exception:  # noqa: BLE001 (report and go on with the other steps)
            results[name] = {"ok": False, "error": traceback.format_exc()}
            print(results[name]["error"], file=sys.stderr)
        results[name]["seconds"] = time.perf_counter() - t0
    summary = {
        "command": " ".join(["python", "benchmarks/run_all.py"] + list(argv if argv is not None
                                                                      else sys.argv[1:])),
        "quick": args.quick, "device": args.device, "model": args.model,
        "environment": bc.environment(args.device, None, None, []),
        "seconds": time.perf_counter() - t_all, "steps": results,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(summary_markdown(summary))
    summary["files"] = {"json": str(out / "summary.json"), "md": str(out / "summary.md")}
    print(f"reports in {out} ({summary['seconds']:.1f} s)", file=sys.stderr)
    return summary


if __name__ == "__main__":
    sys.exit(0 if all(s["ok"] for s in main()["steps"].values()) else 1)
