#!/usr/bin/env python
"""Overhead of exact DSSN certification over the base model's own forward passes.

    python benchmarks/overhead.py [--quick] [--out benchmarks/results]

For each sigma (q = 255, so L = dk.num_variants(sigma) = 220, 441, 883 for sigma = 0.25,
0.5, 1.0) and a batch of B images with random uint8 levels, this times, interleaved and
repeated (the median and the min over repetitions are reported):

* ``certify_cpp`` / ``certify_torch``: ``dk.certify(model, x, sigma=..., batch_size=bs,
  backend=...)``;
* ``forward``: the model's forward passes alone over the same number B*L of inputs at
  the same forward batch size, on a preallocated input tensor (holding certify's first
  batch of variants), under ``torch.inference_mode`` (the floor any exact certifier
  pays);
* ``naive``: a pipeline in the style of the paper's released code: per image and chunk
  of variants, split points s = (j + 0.5)/q and the noised images from the float
  formula of the paper's eq. 47-48, broadcast into a float [chunk, d] tensor, then the
  model, then votes as ``F.one_hot(argmax).float().sum``.

``ratio = time / forward time``. It also times the expand and vote kernels alone over
the same work (where certify's overhead goes), and measures the peak resident-memory
increase of certify (and of the forward passes alone) at sigma 0.25 and 3.5 (L = 3091),
each in a fresh subprocess (``--memory-probe SIGMA``): torch's CPU allocations are
invisible to tracemalloc, so the probe reads the kernel's peak-RSS counter.

Writes ``overhead.json`` and ``overhead.md`` into ``--out`` and prints the markdown.
Timings on a shared or busy machine are noisy; the JSON keeps every repetition.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import dssn_kernels as dk
from dssn_kernels.backends import resolve_backend
from dssn_kernels.ops import expand_into, vote_into
from dssn_kernels.pipeline import windows

Q = 255
SHAPE = (3, 32, 32)
NUM_CLASSES = 10
SIGMAS = (0.25, 0.5, 1.0)
MEMORY_SIGMAS = (0.25, 3.5)
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


class TinyCNN(nn.Module):
    """conv 3->16 3x3, ReLU, max-pool, conv 16->32 3x3, ReLU, max-pool, linear 2048->10.
    Normalization is inside the model, after the noise."""

    def __init__(self, in_channels=3, num_classes=NUM_CLASSES, image_size=32):
        super().__init__()
        side = image_size // 4
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * side * side, num_classes))

    def forward(self, x):
        return self.net((x - 0.5) / 0.5)


def build_model(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if name == "tiny":
        model = TinyCNN(SHAPE[0], NUM_CLASSES, SHAPE[1])
    elif name == "smallcnn":
        from dssn_kernels.models import SmallCNN
        model = SmallCNN(SHAPE[0], NUM_CLASSES, SHAPE[1])
    else:
        raise ValueError(f"unknown model {name!r}")
    return model.eval()


def model_description(model: nn.Module, name: str) -> str:
    def layer(m):
        if isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            return f"Conv2d({m.in_channels}->{m.out_channels}, {kh}x{kw})"
        if isinstance(m, nn.Linear):
            return f"Linear({m.in_features}->{m.out_features})"
        return type(m).__name__
    leaves = [layer(m) for m in model.modules() if not list(m.children())]
    params = sum(p.numel() for p in model.parameters())
    return (f"{name}: {', '.join(leaves)}; {params} parameters; "
            f"input {'x'.join(map(str, SHAPE))}, {NUM_CLASSES} classes; eval mode")


def make_images(B: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, Q + 1, (B, *SHAPE), generator=g, dtype=torch.uint8)


def variant_buffer(x: torch.Tensor, sigma: float, rows: int) -> torch.Tensor:
    """The first ``rows`` inputs certify feeds the model (variants in (image, variant)
    order): the forward-only baseline runs on the same data, since the speed of ReLU
    and max-pool depends on it (an all-zero input runs ~25% faster than noise)."""
    L = dk.num_variants(sigma, q=Q)
    parts, b = [], 0
    while rows > 0:
        n = min(L, rows)
        parts.append(dk.variants(x[b:b + 1], sigma=sigma, q=Q, stop=n).reshape(n, *SHAPE))
        rows -= n
        b += 1
    return torch.cat(parts)


# --- the timed pipelines -------------------------------------------------------------

def forward_only(model, buffer, total, bs):
    """The model's forward passes over ``total`` inputs in batches of ``bs``."""
    with torch.inference_mode():
        for pos in range(0, total, bs):
            model(buffer[:min(bs, total - pos)])


def naive_certify(model, x, sigma, bs, seed=0):
    """Vote counts in the style of the released code: float split points and the float
    noise formula of eq. 47-48, materialized per image and chunk; one-hot float votes."""
    L = dk.num_variants(sigma, q=Q)
    two_lam = L / Q                                   # 2*lambda, a multiple of 1/q
    B = x.shape[0]
    pixels = x.reshape(B, -1).float() / Q
    offsets = dk.split_offsets(pixels.shape[1], L, seed)
    counts = torch.zeros(B, NUM_CLASSES)
    with torch.no_grad():
        for b in range(B):
            xi = pixels[b][None, :]
            for t0 in range(0, L, bs):
                t = torch.arange(t0, min(t0 + bs, L))
                s = (((offsets[None, :] + t[:, None]) % L).float() + 0.5) / Q  # [chunk, d]
                top = two_lam * torch.ceil((xi - s) / two_lam) + s
                noised = (torch.minimum(top, torch.ones_like(top))
                          + torch.maximum(top - two_lam, torch.zeros_like(top))) / 2
                logits = model(noised.view(-1, *SHAPE))
                counts[b] += F.one_hot(logits.argmax(1), NUM_CLASSES).float().sum(0)
    return counts


class NoOpModel(nn.Module):
    """Logits = a view of the first pixels: certify with this model times the pipeline
    alone (validation, expand, vote, Python per chunk), without a forward pass."""

    def forward(self, x):
        return x.reshape(x.shape[0], -1)[:, :NUM_CLASSES]


def kernel_times(x, sigma, bs, backend, logits, reps):
    """Seconds spent by the expand calls, by the vote calls that certify makes for x
    (same windows, same workspace), and by certify with a no-op model: the minimum over
    ``reps`` runs (the cost without interference from other work)."""
    L = dk.num_variants(sigma, q=Q)
    levels = x.reshape(x.shape[0], -1).contiguous()
    B, d = levels.shape
    offsets = dk.split_offsets(d, L, 0).to(torch.int32)
    total = B * L
    rows = min(bs, total)
    expand_s, vote_s = [], []
    with torch.inference_mode():
        workspace = torch.empty((rows, d), dtype=torch.float32)
        counts = torch.zeros((B, NUM_CLASSES), dtype=torch.int64)
        nan_rows = torch.zeros(1, dtype=torch.int64)
        for _ in range(reps + 1):                     # the first run is a warm-up
            te = tv = 0.0
            for pos in range(0, total, rows):
                end = min(pos + rows, total)
                t0 = time.perf_counter()
                row = 0
                for b, n, t, count in windows(pos, end, L):
                    out = workspace[row:row + n * count].view(n, count, d)
                    expand_into(out, levels[b:b + n], offsets, L, Q, t, backend)
                    row += n * count
                t1 = time.perf_counter()
                first = pos // L
                vote_into(counts[first:], nan_rows, logits[:end - pos], pos - first * L, L,
                          backend)
                t2 = time.perf_counter()
                te += t1 - t0
                tv += t2 - t1
            expand_s.append(te)
            vote_s.append(tv)
    noop, pipeline_s = NoOpModel(), []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        dk.certify(noop, x, sigma=sigma, q=Q, batch_size=bs, backend=backend)
        pipeline_s.append(time.perf_counter() - t0)
    return min(expand_s[1:]), min(vote_s[1:]), min(pipeline_s[1:])


def measure(args, model) -> list[dict]:
    x = make_images(args.images, args.seed)
    bs = args.batch_size
    rows = []
    for sigma in args.sigmas:
        L = dk.num_variants(sigma, q=Q)
        total = args.images * L
        buffer = variant_buffer(x, sigma, min(bs, total))
        methods = {"forward": lambda: forward_only(model, buffer, total, bs)}
        for backend in args.backends:
            methods[f"certify_{backend}"] = (
                lambda backend=backend: dk.certify(model, x, sigma=sigma, q=Q, batch_size=bs,
                                                   backend=backend))
        if not args.no_naive:
            methods["naive"] = lambda: naive_certify(model, x, sigma, bs)
        names = list(methods)
        # Warm-up run of each, which also checks that the pipelines count the same votes
        # (the naive float formula can land one ulp off and rarely flip an argmax).
        reference, reference_counts, moved = None, None, {}
        for name in names:
            out = methods[name]()
            if name == "forward":
                continue
            counts = (out.counts if hasattr(out, "counts") else out).long()
            if reference is None:
                reference, reference_counts = name, counts
            moved[name] = int((counts - reference_counts).abs().sum().item()) // 2
        times = {name: [] for name in names}
        for rep in range(args.repeats):
            k = rep % len(names)                      # rotate the order every repetition
            for name in names[k:] + names[:k]:
                t0 = time.perf_counter()
                methods[name]()
                times[name].append(time.perf_counter() - t0)
        fwd_med, fwd_min = statistics.median(times["forward"]), min(times["forward"])
        row = {"sigma": sigma, "L": L, "inputs": total, "forward_batches": -(-total // bs),
               "votes_moved": {"reference": reference, "moved": moved}, "methods": {}}
        for name in names:
            med, mn = statistics.median(times[name]), min(times[name])
            row["methods"][name] = {"median_s": med, "min_s": mn, "times_s": times[name],
                                    "ratio_median": med / fwd_med, "ratio_min": mn / fwd_min}
        logits = torch.randn(min(bs, total), NUM_CLASSES,
                             generator=torch.Generator().manual_seed(3))
        row["kernels"] = {}
        for backend in args.backends:
            e, v, p = kernel_times(x, sigma, bs, backend, logits, args.repeats)
            row["kernels"][backend] = {"expand_s": e, "vote_s": v, "noop_certify_s": p,
                                       "expand_per_forward": e / fwd_min,
                                       "vote_per_forward": v / fwd_min,
                                       "noop_certify_per_forward": p / fwd_min}
        rows.append(row)
    return rows


# --- memory probe (each runs in a fresh subprocess) ----------------------------------

def _proc_status_bytes(key: str):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024          # reported in kB
    except OSError:
        pass
    return None


def _peak_rss_bytes() -> int:
    """Peak RSS of this process image: VmHWM where /proc has it (it restarts at exec),
    else ru_maxrss (which Linux carries over exec, so it may hold the parent's peak)."""
    hwm = _proc_status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _reset_peak_rss() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _proc_status_bytes("VmRSS") is not None


def memory_probe(args) -> dict:
    """Peak RSS increase of one run of ``args.probe_target`` in this fresh process:
    ``certify`` (dk.certify of the B images) or ``forward`` (the model's forward passes
    alone over the same B*L inputs at the same batch size, on a preallocated input).
    Before the baseline: the model and the input are built, a tiny certify runs (lazy
    initialization) and one warm-up forward. The baseline is the current RSS with the
    peak counter reset where Linux allows it, else the peak so far."""
    sigma = args.memory_probe
    L = dk.num_variants(sigma, q=Q)
    model = build_model(args.model, args.seed)
    x = make_images(args.images, args.seed)
    dk.certify(model, x[:1], L=1, q=Q, batch_size=1, backend=args.backend)
    with torch.inference_mode():
        model(variant_buffer(x, sigma, 1))
    if args.probe_target == "forward":
        buffer = variant_buffer(x, sigma, min(args.batch_size, args.images * L))

        def target():
            forward_only(model, buffer, args.images * L, args.batch_size)
    else:
        def target():
            dk.certify(model, x, sigma=sigma, q=Q, batch_size=args.batch_size,
                       backend=args.backend)
    if _reset_peak_rss():
        baseline, how = _proc_status_bytes("VmRSS"), "VmHWM after run - VmRSS after clear_refs"
    else:
        baseline, how = _peak_rss_bytes(), "peak RSS after run - peak RSS before"
    t0 = time.perf_counter()
    target()
    seconds = time.perf_counter() - t0
    peak = _peak_rss_bytes()
    return {"sigma": sigma, "L": L, "target": args.probe_target,
            "backend": args.backend if args.probe_target == "certify" else None,
            "images": args.images, "batch_size": args.batch_size, "method": how,
            "baseline_rss_bytes": baseline, "peak_rss_bytes": peak,
            "peak_increase_bytes": peak - baseline, "seconds": seconds}


def run_memory_probe(sigma, target, backend, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", repr(sigma),
           "--probe-target", target, "--backend", backend,
           "--images", str(args.memory_images), "--batch-size", str(args.batch_size),
           "--model", args.model, "--seed", str(args.seed),
           "--threads", str(torch.get_num_threads())]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe {' '.join(cmd)} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory(args) -> dict:
    """Median over ``args.memory_repeats`` fresh processes per cell: the allocator's
    peak varies by several MiB from run to run (per-thread arenas, fragmentation)."""
    runs = [("certify", backend) for backend in args.memory_backends]
    if not args.quick:
        runs.append(("forward", "auto"))
    probes = {(target, backend, sigma): [run_memory_probe(sigma, target, backend, args)
                                         for _ in range(args.memory_repeats)]
              for target, backend in runs for sigma in MEMORY_SIGMAS}
    summary = []
    for target, backend in runs:
        increase, peak = [], []
        for sigma in MEMORY_SIGMAS:
            cell = probes[target, backend, sigma]
            increase.append(int(statistics.median(p["peak_increase_bytes"] for p in cell)))
            peak.append(int(statistics.median(p["peak_rss_bytes"] for p in cell)))
        summary.append({
            "run": "forward" if target == "forward" else f"certify_{backend}",
            "sigmas": list(MEMORY_SIGMAS),
            "L": [dk.num_variants(sigma, q=Q) for sigma in MEMORY_SIGMAS],
            "peak_increase_bytes": increase,
            "increase_ratio": increase[1] / increase[0] if increase[0] > 0 else None,
            "peak_rss_bytes": peak,
        })
    first = next(iter(probes.values()))[0]
    return {"images": args.memory_images, "batch_size": args.batch_size,
            "repeats": args.memory_repeats, "method": first["method"],
            "probes": [p for cell in probes.values() for p in cell], "summary": summary}


# --- environment and report ----------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, check=False, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment(args, model) -> dict:
    return {
        "torch": torch.__version__, "dssn_kernels": dk.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
        "device": "cpu", "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "backends": list(args.backends), "auto_backend": resolve_backend("auto", "cpu"),
        "available_backends": dk.available_backends(),
        "model": model_description(model, args.model), "num_classes": NUM_CLASSES,
        "q": Q, "batch_size": args.batch_size, "images": args.images,
        "repeats": args.repeats, "sigmas": list(args.sigmas), "quick": args.quick,
        "seed": args.seed, "git_commit": git_commit(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _mib(b):
    return f"{b / 2**20:.2f}"


def markdown(result) -> str:
    env = result["environment"]
    lines = ["# DSSN certify overhead vs the model's own forward passes", "",
             f"{env['cpu_model']}, {env['torch_threads']} torch thread(s), torch "
             f"{env['torch']}. Model {env['model']}. B = {env['images']} images, forward "
             f"batch {env['batch_size']}, q = {env['q']}. Median of {env['repeats']} "
             f"interleaved repetitions; ratio = time / forward time (ratio of the minima in "
             f"brackets).", ""]
    timings = result["timings"]
    names = [n for n in timings[0]["methods"] if n != "forward"] if timings else []
    head = ["sigma", "L", "inputs B*L", "forward (s)"] + \
           [f"{n} (s)" for n in names] + [f"{n} ratio" for n in names]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in timings:
        m = row["methods"]
        cells = [f"{row['sigma']:g}", str(row["L"]), str(row["inputs"]),
                 f"{m['forward']['median_s']:.4f}"]
        cells += [f"{m[n]['median_s']:.4f}" for n in names]
        cells += [f"{m[n]['ratio_median']:.3f} ({m[n]['ratio_min']:.3f})" for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Where certify's time goes besides the model: the expand and vote kernels "
                  "alone over the windows certify uses, and certify with a no-op model "
                  "(the whole pipeline without a forward pass); minimum seconds, and as a "
                  "fraction of the minimum forward time:", "",
              "| sigma | backend | expand (s) | vote (s) | no-op certify (s) | "
              "expand / fwd | vote / fwd | no-op certify / fwd |",
              "|---|---|---|---|---|---|---|---|"]
    for row in timings:
        for backend, k in row["kernels"].items():
            lines.append(f"| {row['sigma']:g} | {backend} | {k['expand_s']:.4f} | "
                         f"{k['vote_s']:.4f} | {k['noop_certify_s']:.4f} | "
                         f"{k['expand_per_forward']:.3f} | {k['vote_per_forward']:.3f} | "
                         f"{k['noop_certify_per_forward']:.3f} |")
    mem = result.get("memory")
    if mem:
        s0, s1 = MEMORY_SIGMAS
        lines += ["", f"Peak resident memory increase of one call over the RSS at its start "
                      f"(median of {mem['repeats']} fresh processes per cell; B = "
                      f"{mem['images']}, forward batch "
                      f"{mem['batch_size']}; `forward` = the model's own forward passes over "
                      f"the same B*L inputs):", "",
                  f"| run | L | sigma {s0:g} (MiB) | sigma {s1:g} (MiB) | ratio | "
                  f"peak RSS (MiB) |", "|---|---|---|---|---|---|"]
        for r in mem["summary"]:
            ratio = "n/a" if r["increase_ratio"] is None else f"{r['increase_ratio']:.3f}"
            lines.append(f"| {r['run']} | {r['L'][0]} / {r['L'][1]} | "
                         f"{_mib(r['peak_increase_bytes'][0])} | "
                         f"{_mib(r['peak_increase_bytes'][1])} | {ratio} | "
                         f"{_mib(r['peak_rss_bytes'][0])} / {_mib(r['peak_rss_bytes'][1])} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="CI smoke run: B=2, 2 repetitions, sigma 0.25 only; one B=1 memory "
                        "probe per sigma, first backend only")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    p.add_argument("--batch-size", type=int, default=256, help="forward batch size")
    p.add_argument("--images", type=int, default=None, help="images B (default 8; quick 2)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repetitions (default 5; quick 2)")
    p.add_argument("--sigmas", type=float, nargs="+", default=None,
                   help="default 0.25 0.5 1.0 (quick: 0.25)")
    p.add_argument("--backends", nargs="+", default=None,
                   help="certify backends (default: cpp and torch, where available)")
    p.add_argument("--model", choices=("tiny", "smallcnn"), default="tiny",
                   help="tiny: the CNN defined here; smallcnn: dssn_kernels.models.SmallCNN")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-naive", action="store_true", help="skip the naive pipeline")
    p.add_argument("--no-memory", action="store_true", help="skip the memory probes")
    p.add_argument("--memory-images", type=int, default=None,
                   help="images per memory probe (default: --images; quick 1)")
    p.add_argument("--memory-repeats", type=int, default=None,
                   help="fresh processes per memory cell (default 3; quick 1)")
    p.add_argument("--memory-probe", type=float, default=None, metavar="SIGMA",
                   help="internal: print one memory measurement as JSON and exit")
    p.add_argument("--probe-target", choices=("certify", "forward"), default="certify",
                   help=argparse.SUPPRESS)
    p.add_argument("--backend", default="auto", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.images is None:
        args.images = 2 if args.quick else 8
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    if args.sigmas is None:
        args.sigmas = [0.25] if args.quick else list(SIGMAS)
    if args.backends is None:
        available = dk.available_backends()
        args.backends = [b for b in ("cpp", "torch") if b in available]
    if args.memory_images is None:
        args.memory_images = 1 if args.quick else args.images
    if args.memory_repeats is None:
        args.memory_repeats = 1 if args.quick else 3
    args.memory_backends = args.backends[:1] if args.quick else list(args.backends)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.memory_probe is not None:
        result = memory_probe(args)
        print(json.dumps(result))
        return result
    model = build_model(args.model, args.seed)
    result = {"environment": environment(args, model), "timings": measure(args, model)}
    result["memory"] = None if args.no_memory else memory(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (args.out / "overhead.md").write_text(md)
    print(md)
    return result


if __name__ == "__main__":
    main()
