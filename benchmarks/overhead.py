#!/usr/bin/env python
"""Overhead of exact DSSN certification over the base model's own forward passes, and
peak memory against L.

    python benchmarks/overhead.py [--quick] [--out benchmarks/results] [--device cpu|cuda]
                                  [--model tiny|wide|smallcnn|wrn40-2] [--stem NAME]

For each sigma (q = 255, so L = dk.num_variants(sigma) = 220, 441, 883, 1766, 3091 for
sigma = 0.25, 0.5, 1, 2, 3.5) and a batch of B images with random uint8 levels, this
times, interleaved and repeated (the median and the min over repetitions are reported):

* ``certify_<backend>`` (cpp and torch on a CPU; cuda, triton and torch on a GPU):
  ``dk.certify(model, x, sigma=..., batch_size=bs, backend=...)``;
* ``forward``: the model's forward passes alone over the same number B*L of inputs at
  the same forward batch size, on a preallocated input tensor (holding certify's first
  batch of variants), under ``torch.inference_mode`` (the floor any exact certifier
  pays);
* ``naive``: a pipeline in the style of the paper's released code: per image and chunk
  of variants, split points s = (j + 0.5)/q and the noised images from the float
  formula of the paper's eq. 47-48, broadcast into a float [chunk, d] tensor, then the
  model, then votes as ``F.one_hot(argmax).float().sum`` (what the fused pipeline gains;
  run it on a larger model too, e.g. ``--model wrn40-2 --images 1 --stem overhead_wrn``).

``ratio = time / forward time``. It also times the expand and vote kernels alone over
the same work (where certify's overhead goes), and measures the peak memory increase of
certify (and of the forward passes alone) for several sigmas (L from 220 to 3091): on a
CPU each in a fresh subprocess (``--memory-probe SIGMA``; torch's CPU allocations are
invisible to tracemalloc, so the probe reads the kernel's peak-RSS counter), on a GPU
with torch.cuda.max_memory_allocated.

Writes ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` (time ratio per sigma, memory
against L) into ``--out`` and prints the markdown. Timings on a shared or busy machine
are noisy; the JSON keeps every repetition.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import dssn_kernels as dk  # noqa: E402
from dssn_kernels.ops import expand_into, vote_into  # noqa: E402
from dssn_kernels.pipeline import windows  # noqa: E402

import bench_common as bc  # noqa: E402
from bench_common import (DEFAULT_OUT, NUM_CLASSES, Q, SHAPE, TinyCNN,  # noqa: E402,F401
                          build_model, make_images)

SIGMAS = bc.FIGURE6_SIGMAS
QUICK_MEMORY_SIGMAS = (0.25, 3.5)


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
    B, device = x.shape[0], x.device
    pixels = x.reshape(B, -1).float() / Q
    offsets = dk.split_offsets(pixels.shape[1], L, seed).to(device)
    counts = torch.zeros(B, NUM_CLASSES, device=device)
    with torch.no_grad():
        for b in range(B):
            xi = pixels[b][None, :]
            for t0 in range(0, L, bs):
                t = torch.arange(t0, min(t0 + bs, L), device=device)
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
    device = x.device
    levels = x.reshape(x.shape[0], -1).contiguous()
    B, d = levels.shape
    offsets = dk.split_offsets(d, L, 0).to(device=device, dtype=torch.int32)
    total = B * L
    rows = min(bs, total)
    expand_s, vote_s = [], []
    with torch.inference_mode():
        workspace = torch.empty((rows, d), dtype=torch.float32, device=device)
        counts = torch.zeros((B, NUM_CLASSES), dtype=torch.int64, device=device)
        nan_rows = torch.zeros(1, dtype=torch.int64, device=device)
        for _ in range(reps + 1):                     # the first run is a warm-up
            te = tv = 0.0
            for pos in range(0, total, rows):
                end = min(pos + rows, total)
                bc.synchronize(device)
                t0 = time.perf_counter()
                row = 0
                for b, n, t, count in windows(pos, end, L):
                    out = workspace[row:row + n * count].view(n, count, d)
                    expand_into(out, levels[b:b + n], offsets, L, Q, t, backend)
                    row += n * count
                bc.synchronize(device)
                t1 = time.perf_counter()
                first = pos // L
                vote_into(counts[first:], nan_rows, logits[:end - pos], pos - first * L, L,
                          backend)
                bc.synchronize(device)
                t2 = time.perf_counter()
                te += t1 - t0
                tv += t2 - t1
            expand_s.append(te)
            vote_s.append(tv)
    noop = NoOpModel()
    pipeline_s = [bc.timed(lambda: dk.certify(noop, x, sigma=sigma, q=Q, batch_size=bs,
                                              backend=backend), device)
                  for _ in range(reps + 1)]
    return min(expand_s[1:]), min(vote_s[1:]), min(pipeline_s[1:])


def forward_method(model, x, sigma, images: int, bs: int):
    """(L, variants in all, {"forward": the model's own forward passes over them}) for one
    sigma: the baseline every row of a sigma is a ratio to."""
    L = dk.num_variants(sigma, q=Q)
    total = images * L
    buffer = variant_buffer(x, sigma, min(bs, total))
    return L, total, {"forward": lambda: forward_only(model, buffer, total, bs)}


def measure(args, model) -> list[dict]:
    device = args.device
    x = make_images(args.images, args.seed, device)
    bs = args.batch_size
    rows = []
    for sigma in args.sigmas:
        L, total, methods = forward_method(model, x, sigma, args.images, bs)
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
            counts = (out.counts if hasattr(out, "counts") else out).long().cpu()
            if reference is None:
                reference, reference_counts = name, counts
            moved[name] = int((counts - reference_counts).abs().sum().item()) // 2
        times = {name: [] for name in names}
        for rep in range(args.repeats):
            k = rep % len(names)                      # rotate the order every repetition
            for name in names[k:] + names[:k]:
                times[name].append(bc.timed(methods[name], device))
        fwd_med, fwd_min = statistics.median(times["forward"]), min(times["forward"])
        row = {"sigma": sigma, "L": L, "inputs": total, "forward_batches": -(-total // bs),
               "votes_moved": {"reference": reference, "moved": moved}, "methods": {}}
        for name in names:
            med, mn = statistics.median(times[name]), min(times[name])
            row["methods"][name] = {"median_s": med, "min_s": mn, "times_s": times[name],
                                    "ratio_median": med / fwd_med, "ratio_min": mn / fwd_min}
        logits = torch.randn(min(bs, total), NUM_CLASSES,
                             generator=torch.Generator().manual_seed(3)).to(device)
        row["kernels"] = {}
        for backend in args.backends:
            e, v, p = kernel_times(x, sigma, bs, backend, logits, args.repeats)
            row["kernels"][backend] = {"expand_s": e, "vote_s": v, "noop_certify_s": p,
                                       "expand_per_forward": e / fwd_min,
                                       "vote_per_forward": v / fwd_min,
                                       "noop_certify_per_forward": p / fwd_min}
        rows.append(row)
        print(f"overhead sigma {sigma:g} (L {L}): " + ", ".join(
            f"{n} {row['methods'][n]['ratio_median']:.3f}" for n in names if n != "forward")
            + " x forward", file=sys.stderr)
    return rows


# --- precision rows: compiled and bfloat16 certification ------------------------------

# bfloat16 runs channels_last: oneDNN's bf16 convolutions on a CPU are ~2x faster in that
# memory format (contiguous bf16 is barely faster than fp32 there).
PRECISION_CONFIGS = (
    ("eager fp32", {}),
    ("compiled", {"compile": True}),
    ("bf16 autocast, channels_last", {"autocast": torch.bfloat16, "channels_last": True}),
    ("compiled + bf16, channels_last", {"compile": True, "autocast": torch.bfloat16,
                                        "channels_last": True}),
)


def cpu_has_bf16() -> bool | None:
    """Whether /proc/cpuinfo lists AVX512-BF16 or AMX-BF16 (None: no /proc/cpuinfo)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return None
    return "avx512_bf16" in flags or "amx_bf16" in flags


def measure_precision(args, model) -> list[dict]:
    """Per sigma: the eager fp32 forward passes alone (the baseline), and certify eager
    fp32, compiled (torch.compile, dynamic=False, one static shape), eager under bfloat16
    autocast and compiled under bfloat16 autocast, on the same images at the same forward
    batch. The first call of a compiled configuration compiles: its time is reported apart
    (first call - median call) with the graphs dynamo compiled during it and during the
    timed repetitions (torch._dynamo's counters["stats"]["unique_graphs"]; 1 and 0 mean
    one compilation per run, the tail included). Votes differ = half the L1 distance of
    the counts to eager fp32's (votes that went to another class), reported, never hidden.
    Inductor's on-disk FX graph cache is off (its C++ kernel cache may still hold kernels
    of earlier runs)."""
    import torch._dynamo
    import torch._inductor.config
    from torch._dynamo.utils import counters

    torch._inductor.config.fx_graph_cache = False
    device, bs = args.device, args.batch_size
    backend = args.backends[0]
    x = make_images(args.images, args.seed, device)
    rows = []
    for sigma in args.sigmas:
        L, total, methods = forward_method(model, x, sigma, args.images, bs)
        for name, kw in PRECISION_CONFIGS:
            if "compile" in kw and args.compile_backend != "inductor":
                kw = {**kw, "compile": {"backend": args.compile_backend}}
            methods[name] = (lambda kw=kw: dk.certify(model, x, sigma=sigma, q=Q, batch_size=bs,
                                                      backend=backend, **kw))
        first, compiles, counts = {}, {}, {}
        for name in methods:                  # first calls: compile where compiled
            before = counters["stats"]["unique_graphs"]
            box = {}
            first[name] = bc.timed(lambda name=name: box.setdefault("out", methods[name]()),
                                   device)
            compiles[name] = counters["stats"]["unique_graphs"] - before
            if name != "forward":
                counts[name] = box["out"].counts.long().cpu()
        before = counters["stats"]["unique_graphs"]
        names = list(methods)
        times = {name: [] for name in names}
        for rep in range(args.repeats):
            k = rep % len(names)
            for name in names[k:] + names[:k]:
                times[name].append(bc.timed(methods[name], device))
        recompiles = counters["stats"]["unique_graphs"] - before
        fwd = statistics.median(times["forward"])
        ref = counts["eager fp32"]
        row = {"sigma": sigma, "L": L, "inputs": total, "batch_size": bs, "backend": backend,
               "forward_median_s": fwd, "graphs_during_repeats": recompiles, "configs": {}}
        for name in names:
            med = statistics.median(times[name])
            cfg = {"median_s": med, "min_s": min(times[name]), "times_s": times[name],
                   "first_call_s": first[name], "ratio_to_forward": med / fwd,
                   "speedup_over_forward": fwd / med, "graphs_first_call": compiles[name]}
            if name != "forward":
                cfg["compile_s"] = first[name] - med if "compiled" in name else 0.0
                cfg["votes_differ"] = int((counts[name] - ref).abs().sum()) // 2
            row["configs"][name] = cfg
        rows.append(row)
        print(f"precision sigma {sigma:g} (L {L}): " + ", ".join(
            f"{n} {row['configs'][n]['speedup_over_forward']:.2f}x" for n in names
            if n != "forward") + " faster than the eager fp32 forward", file=sys.stderr)
    return rows


def precision_markdown(result) -> list[str]:
    env = result["environment"]
    bf16 = {True: "AVX512-BF16/AMX-BF16: yes", False: "AVX512-BF16/AMX-BF16: no",
            None: "AVX512-BF16: unknown"}[env.get("cpu_bf16")]
    lines = ["", f"Compiled and bfloat16 certification ({env['model_name']}; {bf16}); "
                 f"`x faster` = eager fp32 forward-only time / time (median of "
                 f"{env['repeats']}, same run); compile s = first call - median call "
                 f"(torch.compile backend {env.get('compile_backend', 'inductor')}, dynamic="
                 f"False; inductor's FX graph cache off, its C++ kernel cache on disk may hold "
                 f"kernels of earlier runs); graphs = graphs dynamo compiled in "
                 f"the first call (1 = one compilation for the run, the padded tail "
                 f"included) and in all timed repetitions after it; votes differ = votes that "
                 f"went to another class than under eager fp32:", ""]
    body = []
    for row in result["precision"]:
        fwd = row["forward_median_s"]
        body.append([f"{row['sigma']:g}", str(row["L"]), "forward only, eager fp32",
                     f"{fwd:.4f}", "1.00", "-", "-", "-"])
        for name, c in row["configs"].items():
            if name == "forward":
                continue
            body.append([f"{row['sigma']:g}", str(row["L"]), f"certify, {name}",
                         f"{c['median_s']:.4f}", f"{c['speedup_over_forward']:.2f}",
                         f"{c['compile_s']:.1f}" if "compiled" in name else "-",
                         f"{c['graphs_first_call']} + {row['graphs_during_repeats']}"
                         if "compiled" in name else "-", str(c["votes_differ"])])
    return lines + bc.md_table(["sigma", "L", "run", "median (s)", "x faster",
                                "compile (s)", "graphs", "votes differ"], body)


# --- memory probe (each CPU probe runs in a fresh subprocess) -------------------------

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


def _probe_target(args, sigma, target, backend, model, x):
    L = dk.num_variants(sigma, q=Q)
    if target == "forward":
        buffer = variant_buffer(x, sigma, min(args.batch_size, x.shape[0] * L))
        return lambda: forward_only(model, buffer, x.shape[0] * L, args.batch_size)
    return lambda: dk.certify(model, x, sigma=sigma, q=Q, batch_size=args.batch_size,
                              backend=backend)


def _probe_record(args, sigma, target, backend, how, baseline, peak, seconds) -> dict:
    return {"sigma": sigma, "L": dk.num_variants(sigma, q=Q), "target": target,
            "backend": backend if target == "certify" else None,
            "images": args.memory_images, "batch_size": args.batch_size, "method": how,
            "baseline_rss_bytes": baseline, "peak_rss_bytes": peak,
            "peak_increase_bytes": peak - baseline, "seconds": seconds}


def memory_probe(args) -> dict:
    """Peak RSS increase of one run of ``args.probe_target`` in this fresh process:
    ``certify`` (dk.certify of the B images) or ``forward`` (the model's forward passes
    alone over the same B*L inputs at the same batch size, on a preallocated input).
    Before the baseline: the model and the input are built, a tiny certify runs (lazy
    initialization) and one warm-up forward. The baseline is the current RSS with the
    peak counter reset where Linux allows it, else the peak so far."""
    sigma = args.memory_probe
    model = build_model(args.model, args.seed)
    x = make_images(args.memory_images, args.seed)
    dk.certify(model, x[:1], L=1, q=Q, batch_size=1, backend=args.backend)
    with torch.inference_mode():
        model(variant_buffer(x, sigma, 1))
    target = _probe_target(args, sigma, args.probe_target, args.backend, model, x)
    if _reset_peak_rss():
        baseline, how = _proc_status_bytes("VmRSS"), "VmHWM after run - VmRSS after clear_refs"
    else:
        baseline, how = _peak_rss_bytes(), "peak RSS after run - peak RSS before"
    t0 = time.perf_counter()
    target()
    seconds = time.perf_counter() - t0
    return _probe_record(args, sigma, args.probe_target, args.backend, how, baseline,
                         _peak_rss_bytes(), seconds)


def cuda_memory_probe(sigma, target, backend, args, model) -> dict:
    """On a GPU: the peak of torch's CUDA allocator over one run, in this process
    (``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``)."""
    device = args.device
    x = make_images(args.memory_images, args.seed, device)
    run = _probe_target(args, sigma, target, backend, model, x)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    seconds = bc.timed(run, device)
    return _probe_record(args, sigma, target, backend,
                         "torch.cuda.max_memory_allocated - memory_allocated before", baseline,
                         torch.cuda.max_memory_allocated(device), seconds)


def run_memory_probe(sigma, target, backend, args, model) -> dict:
    if torch.device(args.device).type == "cuda":
        return cuda_memory_probe(sigma, target, backend, args, model)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", repr(sigma),
           "--probe-target", target, "--backend", backend,
           "--memory-images", str(args.memory_images), "--batch-size", str(args.batch_size),
           "--model", args.model, "--seed", str(args.seed),
           "--threads", str(torch.get_num_threads())]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe {' '.join(cmd)} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory(args, model) -> dict:
    """Median over ``args.memory_repeats`` fresh processes per cell: the allocator's
    peak varies by several MiB from run to run (per-thread arenas, fragmentation)."""
    runs = [("certify", backend) for backend in args.memory_backends]
    if not args.quick:
        runs.append(("forward", "auto"))
    sigmas = list(args.memory_sigmas)
    probes = {(target, backend, sigma): [run_memory_probe(sigma, target, backend, args, model)
                                         for _ in range(args.memory_repeats)]
              for target, backend in runs for sigma in sigmas}
    summary = []
    for target, backend in runs:
        increase, peak = [], []
        for sigma in sigmas:
            cell = probes[target, backend, sigma]
            increase.append(int(statistics.median(p["peak_increase_bytes"] for p in cell)))
            peak.append(int(statistics.median(p["peak_rss_bytes"] for p in cell)))
        summary.append({
            "run": "forward" if target == "forward" else f"certify_{backend}",
            "sigmas": sigmas, "L": [dk.num_variants(sigma, q=Q) for sigma in sigmas],
            "peak_increase_bytes": increase,
            "increase_ratio": increase[-1] / increase[0] if increase[0] > 0 else None,
            "peak_rss_bytes": peak,
        })
    first = next(iter(probes.values()))[0]
    return {"images": args.memory_images, "batch_size": args.batch_size,
            "repeats": args.memory_repeats, "method": first["method"],
            "probes": [p for cell in probes.values() for p in cell], "summary": summary}


# --- report --------------------------------------------------------------------------

def environment(args, model) -> dict:
    return bc.environment(args.device, args.model, model, args.backends,
                          batch_size=args.batch_size, images=args.images,
                          repeats=args.repeats, sigmas=list(args.sigmas), quick=args.quick,
                          naive=not args.no_naive, seed=args.seed,
                          cpu_bf16=cpu_has_bf16(),
                          compile_backend=getattr(args, "compile_backend", "inductor"))


def _mib(b):
    return f"{b / 2**20:.2f}"


def markdown(result) -> str:
    env = result["environment"]
    lines = [f"# DSSN certify overhead vs the model's own forward passes ({env['model_name']})",
             "", bc.describe_environment(env),
             f"B = {env['images']} images, forward batch {env['batch_size']}, q = {env['q']}. "
             f"Median of {env['repeats']} interleaved repetitions; ratio = time / forward time "
             f"(ratio of the minima in brackets). `naive`: the released code's style (float "
             f"noise formula broadcast into a [chunk, d] tensor per image, one-hot float "
             f"votes) on the same model.", ""]
    timings = result["timings"]
    if not timings and result.get("precision"):    # --precision-only
        return "\n".join(lines[:3] + precision_markdown(result)) + "\n"
    names = [n for n in timings[0]["methods"] if n != "forward"] if timings else []
    head = ["sigma", "L", "inputs B*L", "forward (s)"] + \
           [f"{n} (s)" for n in names] + [f"{n} ratio" for n in names]
    body = []
    for row in timings:
        m = row["methods"]
        body.append([f"{row['sigma']:g}", str(row["L"]), str(row["inputs"]),
                     f"{m['forward']['median_s']:.4f}"]
                    + [f"{m[n]['median_s']:.4f}" for n in names]
                    + [f"{m[n]['ratio_median']:.3f} ({m[n]['ratio_min']:.3f})" for n in names])
    lines += bc.md_table(head, body)
    lines += ["", "Where certify's time goes besides the model: the expand and vote kernels "
                  "alone over the windows certify uses, and certify with a no-op model "
                  "(the whole pipeline without a forward pass); minimum seconds, and as a "
                  "fraction of the minimum forward time:", ""]
    lines += bc.md_table(
        ["sigma", "backend", "expand (s)", "vote (s)", "no-op certify (s)", "expand / fwd",
         "vote / fwd", "no-op certify / fwd"],
        [[f"{row['sigma']:g}", backend, f"{k['expand_s']:.4f}", f"{k['vote_s']:.4f}",
          f"{k['noop_certify_s']:.4f}", f"{k['expand_per_forward']:.3f}",
          f"{k['vote_per_forward']:.3f}", f"{k['noop_certify_per_forward']:.3f}"]
         for row in timings for backend, k in row["kernels"].items()])
    mem = result.get("memory")
    if mem:
        s = mem["summary"][0]
        lines += ["", f"Peak memory increase of one call over the memory at its start "
                      f"({mem['method']}; median of {mem['repeats']} run(s) per cell, each CPU "
                      f"run a fresh process; B = {mem['images']}, forward batch "
                      f"{mem['batch_size']}; `forward` = the model's own forward passes over "
                      f"the same B*L inputs), in MiB:", ""]
        head = ["run"] + [f"sigma {sg:g} (L {L})" for sg, L in zip(s["sigmas"], s["L"])] + \
               ["last / first", "peak (MiB)"]
        lines += bc.md_table(head, [
            [r["run"]] + [_mib(b) for b in r["peak_increase_bytes"]]
            + ["n/a" if r["increase_ratio"] is None else f"{r['increase_ratio']:.3f}",
               " / ".join(_mib(b) for b in r["peak_rss_bytes"])]
            for r in mem["summary"]])
    if result.get("precision"):
        lines += precision_markdown(result)
    return "\n".join(lines) + "\n"


def plot(result, path: Path) -> str:
    """Left: time / forward time per sigma for each method; right: peak memory increase
    against L for each run (flat = memory does not grow with L)."""
    plt = bc.pyplot()
    env, timings, mem = result["environment"], result["timings"], result.get("memory")
    fig, axes = plt.subplots(1, 2 if mem else 1, figsize=(10 if mem else 5.5, 4),
                             squeeze=False)
    a = axes[0][0]
    names = [n for n in timings[0]["methods"] if n != "forward"]
    sig = [r["sigma"] for r in timings]
    for n in names:
        a.plot(sig, [r["methods"][n]["ratio_median"] for r in timings], "o-", label=n)
    a.axhline(1.0, color="k", ls="--", lw=1, label="forward only")
    a.set_xlabel("sigma")
    a.set_ylabel("time / forward-only time")
    a.set_title("certification time over the model's forwards", fontsize=9)
    a.legend(fontsize=8)
    a.grid(True, alpha=0.3)
    if mem:
        b = axes[0][1]
        for r in mem["summary"]:
            b.plot(r["L"], [v / 2**20 for v in r["peak_increase_bytes"]], "o-", label=r["run"])
        b.set_xlabel("L (variants per image)")
        b.set_ylabel("peak memory increase (MiB)")
        b.set_ylim(bottom=0)
        b.set_title("peak memory against L", fontsize=9)
        b.legend(fontsize=8)
        b.grid(True, alpha=0.3)
    return bc.save_figure(fig, path, env)


def parse_args(argv=None):
    p = bc.arg_parser(__doc__, "CI smoke run: B=2, 2 repetitions, sigma 0.25 only; one B=1 "
                               "memory probe at sigma 0.25 and 3.5, first backend only",
                      out_help="output folder")
    p.add_argument("--stem", default="overhead", help="output file names <stem>.{json,md,png}")
    p.add_argument("--batch-size", type=int, default=256, help="forward batch size")
    p.add_argument("--images", type=int, default=None, help="images B (default 8; quick 2)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repetitions (default 5; quick 2)")
    p.add_argument("--sigmas", type=float, nargs="+", default=None,
                   help="default 0.25 0.5 1 2 3.5 (quick: 0.25)")
    p.add_argument("--backends", nargs="+", default=None,
                   help="certify backends (default: those available on the device, but not "
                        "interpreted triton)")
    p.add_argument("--model", choices=bc.MODELS, default="tiny",
                   help="tiny/small: TinyCNN; wide: TinyCNN with 4x the channels; smallcnn: "
                        "dssn_kernels.workflow.models.SmallCNN; wrn40-2: WideResNet-40-2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-naive", action="store_true", help="skip the naive pipeline")
    p.add_argument("--no-memory", action="store_true", help="skip the memory probes")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--precision-rows", action="store_true",
                   help="also time certify compiled (torch.compile), under bfloat16 autocast "
                        "and both, against the eager fp32 forward passes, with compile times, "
                        "compilations counted and votes that differ from eager fp32")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend of the precision rows (default inductor; "
                        "eager or aot_eager: a quick check of the table, not of speed)")
    p.add_argument("--precision-only", action="store_true",
                   help="only the --precision-rows table (no other timing, kernel or "
                        "memory measurement)")
    p.add_argument("--memory-sigmas", type=float, nargs="+", default=None,
                   help="default 0.25 0.5 1 2 3.5 (quick: 0.25 3.5)")
    p.add_argument("--memory-images", type=int, default=None,
                   help="images per memory probe (default: --images; quick 1)")
    p.add_argument("--memory-repeats", type=int, default=None,
                   help="fresh processes per memory cell (default 3; quick 1)")
    p.add_argument("--memory-probe", type=float, default=None, metavar="SIGMA",
                   help="internal: print one memory measurement as JSON and exit")
    p.add_argument("--probe-target", choices=("certify", "forward"), default="certify",
                   help=argparse.SUPPRESS)
    p.add_argument("--backend", default="auto", help=argparse.SUPPRESS)
    args = bc.parse_args(p, argv)
    if args.images is None:
        args.images = 2 if args.quick else 8
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    if args.sigmas is None:
        args.sigmas = [0.25] if args.quick else list(SIGMAS)
    if args.memory_sigmas is None:
        args.memory_sigmas = list(QUICK_MEMORY_SIGMAS if args.quick else SIGMAS)
    if args.backends is None:
        from dssn_kernels.triton import interpreting
        preferred = ("cuda", "triton", "torch") if "cuda" in args.device else ("cpp", "torch")
        available = dk.available_backends(args.device)
        args.backends = [b for b in preferred if b in available
                         and not (b == "triton" and interpreting())]
    if args.memory_images is None:
        args.memory_images = 1 if args.quick else args.images
    if args.memory_repeats is None:
        args.memory_repeats = 1 if args.quick else 3
    args.memory_backends = args.backends[:1] if args.quick else list(args.backends)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.memory_probe is not None:
        result = memory_probe(args)
        print(json.dumps(result))
        return result
    model = build_model(args.model, args.seed, args.device)
    only = args.precision_only
    result = {"environment": environment(args, model),
              "timings": [] if only else measure(args, model)}
    result["memory"] = None if args.no_memory or only else memory(args, model)
    if args.precision_rows or only:
        result["precision"] = measure_precision(args, model)
    return bc.publish(args.out, args.stem, result, markdown(result),
                      None if args.no_plot or only else plot)


if __name__ == "__main__":
    main()
