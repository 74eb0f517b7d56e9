#!/usr/bin/env python
"""`make gpu-check`: one command that builds, tests, sanitizes and benchmarks every GPU
path on the machine it runs on, and writes one report.

    python benchmarks/gpu_check.py [--out DIR] [--budget SECONDS] [--only STEP ...]
    python benchmarks/gpu_check.py --dry-run --out DIR     # CPU, tiny sizes (CI)

For a GPU machine with a CUDA build of torch, triton, pytest, hypothesis, scipy, tqdm,
ninja, matplotlib and scikit-learn installed, and no network: it creates no virtual
environment and downloads nothing. Steps, each a subprocess with a time limit, in order:

* ``build``: ``pip install --no-build-isolation --no-deps --no-index -e .`` with this
  python, for the visible GPU's architecture only (TORCH_CUDA_ARCH_LIST from
  torch.cuda.get_device_capability(), CUDA_HOME detected), then a probe of what was
  built (versions, backends, whether the CUDA kernels are registered);
* ``gpu_tests``: ``pytest -m gpu`` (every kernel test on CUDA tensors, each GPU backend,
  against the CPU reference, and the cuda cases of tests/test_workflow_devices.py: train,
  resume, certify, Monte Carlo and train-denoiser on the GPU; 4 pytest-xdist processes
  where the plugin is installed, so that a fresh machine's Triton compilations run in
  parallel), log in logs/pytest_gpu.log;
* ``sanitizer``: ``compute-sanitizer --tool memcheck`` over a small certify (K = 1025
  classes, margin 0 and > 0, a forward batch that is not a multiple of L) on each GPU
  backend, whose counts must equal the ``torch`` backend's on the same device; said so
  (status ``unavailable``, not a failure) where the tool is missing or refuses the
  machine ("Device not supported", as in gVisor sandboxes);
* ``overhead``: benchmarks/overhead.py on WRN-40-2 (random weights) and the small CNN,
  sigma in {0.15, 0.5, 1, 2, 3.5}: certify per backend against the model's forward passes
  alone at the same batch size and against the released-code-style pipeline (``naive``),
  and peak GPU memory against L (torch.cuda.max_memory_allocated);
* ``precision``: certify against forward-only time in fp32 (TF32 off), TF32, and
  autocast bfloat16 / float16 with channels_last, with the votes that moved against fp32;
* ``vs_monte_carlo``: benchmarks/vs_monte_carlo.py, DSSN against uniform-noise Monte Carlo
  at n = 100,000 (WRN-40-2 timed with fewer samples and scaled linearly, which its rows
  say), next to the paper's RTX 2080 Ti figures;
* ``cpu_exactness``: the CPU suite's exactness tests, once (logs/pytest_cpu_exactness.log);
* ``compiled``: overhead.py's precision rows (``--precision-only``) on WRN-40-2 and the
  small CNN: certify eager fp32, compiled (torch.compile, inductor, CUDA graphs),
  autocast bfloat16 with channels_last, and compiled + bfloat16 with channels_last, each
  as a ratio to the eager fp32 forward passes alone of the same run, the compile time
  apart, the graphs dynamo compiled, and the votes that differ from eager fp32
  (last: compilation time can only cut short its own rows).

Everything goes into --out: gpu_check.json, summary.md (also printed), logs/, and each
benchmark's own JSON/markdown/PNG. A time budget (--budget, default 450 s) keeps the run
under 8 minutes on an H100/H200-class GPU, which leaves room in a 15-minute GPU window for
the machine's start and a rerun of a step (--only): a step that would start with too
little time left is skipped and reported as such. Exit status 0 only if every step ran and passed.

``--dry-run`` runs the same steps on the CPU with tiny sizes and the small CNN only, with
no build (the command is reported), no sanitizer (the sanitized script runs bare) and
torch.compile's ``eager`` backend (a check of the rows, not of speed), so
that CI exercises this script without a GPU (tests/test_gpu_check.py).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

# compiled runs last: its compilations (the slowest, least predictable part) can only cut
# short its own rows, never the steps before it
STEPS = ("build", "gpu_tests", "sanitizer", "overhead", "precision", "vs_monte_carlo",
         "cpu_exactness", "compiled")
GPU_SIGMAS = (0.15, 0.5, 1.0, 2.0, 3.5)
# The paper (Levine & Feizi 2021, section 5 and Figure 6): WRN-40-2 on CIFAR-10, one RTX
# 2080 Ti. Its text quotes one point of Figure 6, sigma 3.5: 0.41 s/image for DSSN, 13.44 s
# for Yang et al.'s Monte Carlo (bench_common.PAPER_SIGMA35_SECONDS, a test ties the two).
# The other ends of Figure 6's curves are read off the plot, not stated in the text, so
# they are reported as approximate: DSSN about 0.0224 s at sigma 0.15, Monte Carlo between
# about 12.8 and 13.9 s over the sigmas.
PAPER_GPU = "RTX 2080 Ti"
PAPER_DSSN_S = {3.5: 0.41}
PAPER_MC_S = {3.5: 13.44}
PAPER_PLOT_DSSN_S = {0.15: 0.0224}
PAPER_PLOT_MC_S = (12.8, 13.9)
EXACTNESS_TESTS = ("test_expand.py", "test_vote.py", "test_vote_margin.py",
                   "test_certificate.py", "test_soundness.py", "test_lemma.py",
                   "test_margin.py", "test_early_exit.py", "test_pipeline.py",
                   "test_expand_clones.py", "test_noise_header.py")
# The whole run, report included, under 8 minutes: room for a rerun in a 15-minute window.
DEFAULT_BUDGET_S = 450.0
# compute-sanitizer's own refusal of the device or runtime: a line of the tool's own
# output (its "=========" prefix), never one the target printed
SANITIZER_REFUSES = re.compile(r"^=+ .*(?:device not supported|not supported on this "
                               r"(?:device|platform)).*$", re.I | re.M)
# pytest -rs lines: SKIPPED [count] location: reason
SKIPPED_RE = re.compile(r"^SKIPPED \[(\d+)\] ([^:\n]+:\d+): (.*)$", re.M)
MODES = ("fp32", "tf32", "bf16_channels_last", "fp16_channels_last")
SUMMARY_RE = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)")


# --- sizes -----------------------------------------------------------------------------

def plan(dry_run: bool) -> dict:
    """What each step runs: the real sizes for an H100/H200-class GPU, or the dry run's."""
    if dry_run:
        # sigma 0.02 and 0.05: L = 17 and 44 (q = 255)
        return {"device": "cpu", "models": ("small",), "sigmas": (0.02, 0.05),
                "batch_size": 256, "images": {"small": 1}, "repeats": 1,
                "precision_images": {"small": 1}, "precision_repeats": 1,
                "compiled_sigmas": (0.05,), "compiled_images": {"small": 1},
                "compiled_repeats": 1, "compile_backend": "eager",
                "mc_images": 1, "mc_n_timed": {"small": 256}, "mc_repeats": 1,
                # 2 for pytest -m gpu where pytest-xdist is installed (gpu-stack-check's
                # venv): the -n path runs before a GPU does; CI has no xdist (one process)
                "pytest_workers": {"gpu_tests": 2, "cpu_exactness": 1},
                "caps": {"build": 60, "gpu_tests": 60, "sanitizer": 60, "overhead": 60,
                         "precision": 60, "compiled": 60, "vs_monte_carlo": 60,
                         "cpu_exactness": 60}}
    return {"device": "cuda", "models": ("wrn40-2", "small"), "sigmas": GPU_SIGMAS,
            "batch_size": 1024, "images": {"wrn40-2": 4, "small": 8}, "repeats": 3,
            "precision_images": {"wrn40-2": 4, "small": 8}, "precision_repeats": 2,
            # images * L >= the forward batch at both sigmas: one static shape, so one
            # compilation per compiled configuration and model (inductor's, timed apart)
            "compiled_sigmas": (0.5, 3.5), "compiled_images": {"wrn40-2": 4, "small": 4},
            "compiled_repeats": 3, "compile_backend": "inductor",
            "mc_images": 1, "mc_n_timed": {"wrn40-2": 20_000, "small": 100_000},
            "mc_repeats": 3,
            # pytest-xdist processes where installed: 4 share the GPU (its Triton kernels
            # compile in parallel), the CPU tests take half the cores
            "pytest_workers": {"gpu_tests": 4,
                               "cpu_exactness": max(1, min(8, (os.cpu_count() or 2) // 2))},
            # seconds, per subprocess; the budget cuts them further
            "caps": {"build": 300, "gpu_tests": 180, "sanitizer": 90, "overhead": 120,
                     "precision": 90, "compiled": 240, "vs_monte_carlo": 90,
                     "cpu_exactness": 120}}


# --- running steps ---------------------------------------------------------------------

class Runner:
    """Runs the steps' subprocesses within the budget and records each."""

    def __init__(self, out: Path, budget: float, python: str):
        self.out, self.budget, self.python = out, budget, python
        self.t0 = time.monotonic()
        self.records: list[dict] = []
        (out / "logs").mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    def run(self, step: str, name: str, cmd: list[str], cap: float, log: str,
            env: dict | None = None, min_left: float = 10.0) -> dict:
        """Runs cmd (output to logs/<log>) for at most min(cap, budget left) seconds, with
        the repository first on PYTHONPATH (the tree's dssn_kernels, built or not)."""
        env = dict(os.environ if env is None else env)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        rec = {"step": step, "name": name, "command": " ".join(map(str, cmd)),
               "log": f"logs/{log}"}
        limit = min(cap, self.left())
        if limit < min_left:
            rec.update(status="skipped", seconds=0.0,
                       detail=f"time budget: {self.left():.0f} s of {self.budget:.0f} s left")
            self.records.append(rec)
            print(f"[gpu-check] {name}: skipped ({rec['detail']})", flush=True)
            return rec
        print(f"[gpu-check] {name} (limit {limit:.0f} s) ...", flush=True)
        t = time.monotonic()
        with open(self.out / "logs" / log, "w") as f:
            f.write(f"$ {rec['command']}\n")
            f.flush()
            try:
                proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, stdout=f,
                                        stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
            except OSError as exc:
                proc, rc = None, None
                rec.update(status="failed", detail=f"could not start: {exc}")
            if proc is not None:
                try:
                    rc = proc.wait(timeout=limit)
                    rec["status"] = "ok" if rc == 0 else "failed"
                except subprocess.TimeoutExpired:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)   # the step's own process group
                    except ProcessLookupError:
                        pass
                    rc = proc.wait()
                    rec["status"] = "timeout"
        rec.update(returncode=rc, seconds=round(time.monotonic() - t, 1))
        self.records.append(rec)
        print(f"[gpu-check] {name}: {rec['status']} ({rec['seconds']} s)", flush=True)
        return rec

    def note(self, step: str, name: str, status: str, detail: str) -> dict:
        rec = {"step": step, "name": name, "status": status, "seconds": 0.0, "detail": detail}
        self.records.append(rec)
        print(f"[gpu-check] {name}: {status} ({detail})", flush=True)
        return rec

    def log_text(self, rec: dict) -> str:
        try:
            return (self.out / rec["log"]).read_text(errors="replace")
        except (KeyError, OSError):
            return ""


def pytest_counts(text: str) -> dict:
    """{'passed': n, ...} from pytest's closing line (the last line naming counts)."""
    for line in reversed(text.splitlines()):
        found = SUMMARY_RE.findall(line)
        if found and ("passed" in line or "skipped" in line or "failed" in line
                      or "error" in line or "deselected" in line):
            return {kind.rstrip("s") if kind.startswith("error") else kind: int(n)
                    for n, kind in found}
    return {}


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# --- helpers the subprocesses share ------------------------------------------------------

def cuda_home():
    sys.path.insert(0, str(ROOT / "scripts"))
    from cuda_build_check import cuda_home as find
    return find()


def find_sanitizer():
    """Path of compute-sanitizer, or None: PATH, then CUDA_HOME's bin/ and
    compute-sanitizer/ folders."""
    tool = shutil.which("compute-sanitizer")
    if tool:
        return tool
    for home in filter(None, (os.environ.get("CUDA_HOME"), cuda_home(), "/usr/local/cuda")):
        for rel in ("bin/compute-sanitizer", "compute-sanitizer/compute-sanitizer"):
            if os.access(os.path.join(home, rel), os.X_OK):
                return os.path.join(home, rel)
    return None


def probe() -> dict:
    """What this python sees (printed as JSON by --probe, after the build)."""
    import torch

    import bench_common as bc
    import dssn_kernels as dk
    from dssn_kernels.backends import (native_extension_error, native_has_cuda_kernels,
                                       resolve_backend)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    return {
        "python": sys.version.split()[0], "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "triton": bc.triton_version(),
        "cuda_available": cuda, "device_name": bc.device_name(device),
        "capability": list(torch.cuda.get_device_capability()) if cuda else None,
        "native_extension_error": native_extension_error(),
        "cuda_kernels_registered": native_has_cuda_kernels(),
        "backends": dk.available_backends(device),
        "auto_backend": resolve_backend("auto", device),
        "git_commit": bc.git_commit(),
    }


# --- the sanitized target ---------------------------------------------------------------

def sanitizer_target(backend: str, device: str) -> int:
    """A small certify on ``backend`` and on ``torch`` (same device, same model): K = 1025
    classes (above every block size the vote kernels assume), L = 220 with a forward batch
    of 100 (windows straddle images), margin 0 (vote_) and 0.05 (vote_margin_). Prints a
    JSON line; exit status 1 if the counts differ."""
    import torch

    import dssn_kernels as dk
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 1025)).eval()
    model = model.to(device)
    x = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8).to(device)
    out = {"backend": backend, "device": device}
    same = True
    for margin in (0.0, 0.05):
        got = dk.certify(model, x, sigma=0.25, batch_size=100, backend=backend, margin=margin)
        ref = dk.certify(model, x, sigma=0.25, batch_size=100, backend="torch", margin=margin)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        equal = torch.equal(got.counts.cpu(), ref.counts.cpu()) and (
            margin == 0 or torch.equal(got.ambiguous.cpu(), ref.ambiguous.cpu()))
        out[f"margin_{margin:g}"] = {"counts_equal_torch": equal,
                                     "votes": int(got.counts.sum())}
        same &= equal
    print(json.dumps(out))
    return 0 if same else 1


# --- the precision benchmark (a subprocess) ----------------------------------------------

def set_tf32(torch, on: bool) -> dict:
    """TF32 on or off for cuBLAS matmuls and cuDNN convolutions, through the long-standing
    flags (torch keeps its newer fp32_precision settings consistent with them; setting
    those instead can clash with code that reads the flags). Returns the flags as set."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # the flags are deprecated in newer torch
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on
        return {"matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32}


def precision_worker(args) -> dict:
    """certify vs forward-only time (same inputs, same batch size, same precision) for each
    mode and sigma; votes and predictions compared with fp32's."""
    import contextlib

    import torch

    import bench_common as bc
    import dssn_kernels as dk
    from overhead import forward_only, variant_buffer

    device, bs = args.device, args.batch_size
    base = bc.build_model(args.model, args.seed, device)
    x = bc.make_images(args.images, args.seed, device)
    settings = {
        "fp32": {"tf32": False, "autocast": None, "channels_last": False},
        "tf32": {"tf32": True, "autocast": None, "channels_last": False},
        "bf16_channels_last": {"tf32": False, "autocast": torch.bfloat16, "channels_last": True},
        "fp16_channels_last": {"tf32": False, "autocast": torch.float16, "channels_last": True},
    }
    rows, fp32_counts = [], {}
    for mode in MODES:
        s = settings[mode]
        flags = set_tf32(torch, s["tf32"])
        model = base
        if s["channels_last"]:
            model = copy.deepcopy(base).to(memory_format=torch.channels_last)

        def autocast():
            return (torch.autocast(torch.device(device).type, dtype=s["autocast"])
                    if s["autocast"] is not None else contextlib.nullcontext())

        for sigma in args.sigmas:
            L = dk.num_variants(sigma, q=bc.Q)
            total = args.images * L
            buffer = variant_buffer(x, sigma, min(bs, total))
            if s["channels_last"]:
                buffer = buffer.contiguous(memory_format=torch.channels_last)

            def run_certify():
                return dk.certify(model, x, sigma=sigma, q=bc.Q, batch_size=bs,
                                  autocast=s["autocast"], channels_last=s["channels_last"])

            def run_forward():
                with autocast():
                    forward_only(model, buffer, total, bs)

            cert = run_certify()                      # warm-up, and the votes
            run_forward()
            ct, ft = [], []
            for _ in range(args.repeats):
                ct.append(bc.timed(run_certify, device))
                ft.append(bc.timed(run_forward, device))
            counts = cert.counts.cpu()
            if mode == "fp32":
                fp32_counts[sigma] = counts
            ref = fp32_counts[sigma]
            c, f = statistics.median(ct), statistics.median(ft)
            rows.append({
                "model": args.model, "mode": mode, **flags, "sigma": sigma, "L": L,
                "images": args.images, "batch_size": bs, "certify_s": c, "forward_s": f,
                "ratio": c / f, "s_per_image": c / args.images, "images_per_s": args.images / c,
                "certify_times_s": ct, "forward_times_s": ft,
                "predictions_agree_fp32": float((counts.argmax(1) == ref.argmax(1))
                                                .float().mean()),
                "votes_moved_vs_fp32": int((counts - ref).abs().sum()) // 2,
            })
            print(f"precision {args.model} {mode} sigma {sigma:g}: certify {c:.4f} s, "
                  f"forward {f:.4f} s, ratio {c / f:.3f}", file=sys.stderr)
    set_tf32(torch, False)
    result = {"model": args.model, "device": device, "device_name": bc.device_name(device),
              "rows": rows}
    Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    return result


# --- the steps ---------------------------------------------------------------------------

def build_command(python: str) -> list[str]:
    """The build of step ``build``: an editable install of the tree (run in the repository
    root) with ``python``, against its torch, no dependency, no index. Also what
    scripts/gpu_stack_check.py runs, so that its rehearsal builds as the GPU run does."""
    return [python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index",
            "-e", "."]


def build_env(arch: str, home: str | None, jobs: int, base: dict | None = None) -> dict:
    """The build's environment: ``base`` (default os.environ) with TORCH_CUDA_ARCH_LIST,
    MAX_JOBS and, when a toolkit was found, CUDA_HOME."""
    env = dict(os.environ if base is None else base, TORCH_CUDA_ARCH_LIST=arch,
               MAX_JOBS=str(jobs))
    if home:
        env["CUDA_HOME"] = home
    return env


def step_build(r: Runner, p: dict, dry: bool, state: dict):
    cmd = build_command(r.python)
    if dry:
        r.note("build", "build", "dry-run", "not run on the CPU: " + " ".join(cmd[1:]))
    else:
        import torch
        major, minor = torch.cuda.get_device_capability()
        arch = f"{major}.{minor}"
        home = cuda_home()
        env = build_env(arch, home, os.cpu_count() or 4)
        rec = r.run("build", "build", cmd, p["caps"]["build"], "build.log", env=env)
        rec["detail"] = f"TORCH_CUDA_ARCH_LIST={arch}, CUDA_HOME={home or 'not found'}"
        state["arch"] = arch
    rec = r.run("build", "probe", [r.python, __file__, "--probe"], 120, "probe.log")
    lines = [ln for ln in r.log_text(rec).splitlines() if ln.startswith("{")]
    state["probe"] = json.loads(lines[-1]) if lines else None
    if state["probe"] is None:
        rec["status"] = "failed"
    elif not dry and not state["probe"]["cuda_kernels_registered"]:
        rec["status"] = "failed"
        rec["detail"] = "the CUDA kernels are not registered (the build has no CUDA code)"


def pytest_workers(workers: int) -> list[str]:
    """pytest-xdist's ``-n workers`` where the plugin is installed (the GPU machines have
    it), so that the Triton JIT compilations of a fresh machine and the CPU tests spread
    over processes; [] without it, or for fewer than 2 workers."""
    import importlib.util
    if workers < 2 or importlib.util.find_spec("xdist") is None:
        return []
    return ["-n", str(workers)]


def step_gpu_tests(r: Runner, p: dict, dry: bool, state: dict):
    workers = pytest_workers(p["pytest_workers"]["gpu_tests"])
    cmd = [r.python, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
           *workers, "tests"]
    rec = r.run("gpu_tests", "pytest -m gpu", cmd, p["caps"]["gpu_tests"], "pytest_gpu.log")
    if rec["status"] == "skipped":          # the budget's reason stays the detail
        return
    text = r.log_text(rec)
    rec["counts"] = pytest_counts(text)
    rec["detail"] = f"{workers[1]} pytest-xdist workers" if workers else "one process"
    if rec.get("returncode") == 5:
        rec["status"], rec["detail"] = "failed", "no test selected by -m gpu"
    # On a GPU every selected test must run: a skip there (scikit-learn missing, say)
    # leaves a GPU path unproven. The dry run's skips are the expected "no CUDA device".
    unexpected = [(int(n), where, why) for n, where, why in SKIPPED_RE.findall(text)
                  if not (dry and "no CUDA device" in why)]
    if unexpected:
        total = sum(n for n, _, _ in unexpected)
        rec["skipped_unexpectedly"] = [f"{n} x {where}: {why}" for n, where, why in unexpected]
        rec["detail"] += (f"; {total} GPU test(s) skipped, e.g. {unexpected[0][1]}: "
                          f"{unexpected[0][2]}")
        if rec["status"] == "ok":
            rec["status"] = "failed"


def step_sanitizer(r: Runner, p: dict, dry: bool, state: dict):
    probe_ = state.get("probe") or {}
    backends = [b for b in (("cpp",) if dry else ("cuda", "triton", "torch"))
                if b in probe_.get("backends", [])]
    tool = None if dry else find_sanitizer()
    state["sanitizer_tool"] = tool
    if not dry and tool is None:
        r.note("sanitizer", "compute-sanitizer", "unavailable",
               "compute-sanitizer not found (PATH, CUDA_HOME/bin, "
               "CUDA_HOME/compute-sanitizer): memcheck not run")
        return
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")  # OOB past an allocation
    for backend in backends:
        cmd = [r.python, __file__, "--sanitizer-target", backend, "--device", p["device"]]
        if not dry:
            cmd = [tool, "--tool", "memcheck", "--error-exitcode", "97", "--print-limit",
                   "20"] + cmd
        rec = r.run("sanitizer", f"memcheck {backend}", cmd, p["caps"]["sanitizer"],
                    f"sanitizer_{backend}.log", env=env)
        text = r.log_text(rec)
        m = re.search(r"ERROR SUMMARY: (\d+) error", text)
        rec["sanitizer_errors"] = int(m.group(1)) if m else None
        refusal = None if dry or rec["status"] == "ok" else SANITIZER_REFUSES.search(text)
        if refusal:
            # the tool, not the target: compute-sanitizer refuses GPUs in gVisor sandboxes
            rec["status"] = "unavailable"
            rec["detail"] = (f"compute-sanitizer cannot run on this machine "
                             f"({refusal.group(0).strip()}): memcheck not run")
            rec["result"] = None
            return
        if not dry and rec["status"] == "failed" and m is None:
            rec["status"] = "tool-error"
            rec["detail"] = "compute-sanitizer printed no ERROR SUMMARY: it did not run the " \
                            "target to the end (see the log)"
        elif not dry and rec["status"] == "failed":
            rec["detail"] = (f"{rec['sanitizer_errors']} memcheck error(s)"
                             if rec.get("returncode") == 97 else
                             "the target failed (counts differ from the torch backend?)")
        lines = [ln for ln in text.splitlines() if ln.startswith("{")]
        rec["result"] = json.loads(lines[-1]) if lines else None
        if dry:
            rec["detail"] = "dry run: the target ran without compute-sanitizer"


def step_overhead(r: Runner, p: dict, dry: bool, state: dict):
    for model in p["models"]:
        n = p["images"][model]
        sig = [f"{s:g}" for s in p["sigmas"]]
        cmd = [r.python, HERE / "overhead.py", "--device", p["device"], "--model", model,
               "--stem", f"overhead_{model}", "--out", r.out, "--sigmas", *sig,
               "--images", n, "--repeats", p["repeats"], "--batch-size", p["batch_size"],
               "--memory-sigmas", *sig, "--memory-repeats", 1, "--memory-images", n]
        if dry:   # one backend, certify's memory only (no forward probe): fewer processes
            cmd += ["--quick", "--backends", "cpp"]
        rec = r.run("overhead", f"overhead {model}", cmd, p["caps"]["overhead"],
                    f"overhead_{model}.log")
        rec["report"] = f"overhead_{model}.json"


def step_precision(r: Runner, p: dict, dry: bool, state: dict):
    for model in p["models"]:
        cmd = [r.python, __file__, "--precision-worker", "--device", p["device"],
               "--model", model, "--sigmas", *[f"{s:g}" for s in p["sigmas"]],
               "--images", p["precision_images"][model], "--repeats", p["precision_repeats"],
               "--batch-size", p["batch_size"], "--json-out", r.out / f"precision_{model}.json"]
        rec = r.run("precision", f"precision {model}", cmd, p["caps"]["precision"],
                    f"precision_{model}.log")
        rec["report"] = f"precision_{model}.json"


def step_compiled(r: Runner, p: dict, dry: bool, state: dict):
    """overhead.py --precision-only: compiled and bfloat16 certify against the eager fp32
    forward passes (compile time apart, votes that differ from eager fp32)."""
    for model in p["models"]:
        cmd = [r.python, HERE / "overhead.py", "--device", p["device"], "--model", model,
               "--stem", f"compiled_{model}", "--out", r.out, "--precision-only",
               "--sigmas", *[f"{s:g}" for s in p["compiled_sigmas"]],
               "--images", p["compiled_images"][model], "--repeats", p["compiled_repeats"],
               "--batch-size", p["batch_size"], "--compile-backend", p["compile_backend"]]
        if dry:
            cmd += ["--backends", "cpp"]
        rec = r.run("compiled", f"compiled {model}", cmd, p["caps"]["compiled"],
                    f"compiled_{model}.log")
        rec["report"] = f"compiled_{model}.json"


def step_vs_monte_carlo(r: Runner, p: dict, dry: bool, state: dict):
    for model in p["models"]:
        cmd = [r.python, HERE / "vs_monte_carlo.py", "--device", p["device"], "--model", model,
               "--stem", f"vs_monte_carlo_{model}", "--out", r.out,
               "--sigmas", *[f"{s:g}" for s in p["sigmas"]], "--images", p["images"][model],
               "--repeats", p["mc_repeats"], "--mc-images", p["mc_images"],
               "--mc-n-timed", p["mc_n_timed"][model], "--batch-size", p["batch_size"]]
        rec = r.run("vs_monte_carlo", f"vs_monte_carlo {model}", cmd,
                    p["caps"]["vs_monte_carlo"], f"vs_monte_carlo_{model}.log")
        rec["report"] = f"vs_monte_carlo_{model}.json"


def step_cpu_exactness(r: Runner, p: dict, dry: bool, state: dict):
    files = [f"tests/{f}" for f in EXACTNESS_TESTS if (ROOT / "tests" / f).exists()]
    workers = [] if dry else pytest_workers(p["pytest_workers"]["cpu_exactness"])
    cmd = [r.python, "-m", "pytest", "-m", "not gpu", "-q", "-rs", "-p", "no:cacheprovider",
           *workers, *files] + (["--collect-only"] if dry else [])
    rec = r.run("cpu_exactness", "CPU exactness tests", cmd, p["caps"]["cpu_exactness"],
                "pytest_cpu_exactness.log")
    rec["counts"] = pytest_counts(r.log_text(rec))
    rec["files"] = files
    if dry:
        rec["detail"] = "dry run: collected only"
        m = re.search(r"(\d+) tests? collected", r.log_text(rec))
        rec["counts"] = {"collected": int(m.group(1))} if m else {}


STEP_FUNCS = {"build": step_build, "gpu_tests": step_gpu_tests, "sanitizer": step_sanitizer,
              "overhead": step_overhead, "precision": step_precision,
              "compiled": step_compiled, "vs_monte_carlo": step_vs_monte_carlo, "cpu_exactness": step_cpu_exactness}


# --- the report ----------------------------------------------------------------------------

def fmt(v, spec=".4f", none="n/a"):
    return none if v is None else format(v, spec)


def md_table(head, rows):
    import bench_common as bc
    return bc.md_table(head, rows)


def collect(r: Runner, p: dict) -> dict:
    """The benchmark reports the steps wrote, keyed by model."""
    out = {"overhead": {}, "precision": {}, "compiled": {}, "vs_monte_carlo": {}}
    for model in p["models"]:
        out["overhead"][model] = read_json(r.out / f"overhead_{model}.json")
        out["precision"][model] = read_json(r.out / f"precision_{model}.json")
        out["compiled"][model] = read_json(r.out / f"compiled_{model}.json")
        out["vs_monte_carlo"][model] = read_json(r.out / f"vs_monte_carlo_{model}.json")
    return out


def headline_rows(reports: dict, p: dict) -> list[dict]:
    """Per model and sigma: DSSN s/image and images/s (vs_monte_carlo's DSSN timing), Monte
    Carlo at n = 100,000, the paper's RTX 2080 Ti figures (WRN-40-2 rows), and certify
    over forward-only time (overhead)."""
    rows = []
    for model in p["models"]:
        mc = reports["vs_monte_carlo"].get(model) or {}
        oh = reports["overhead"].get(model) or {}
        mc_rows = {r["sigma"]: r for r in mc.get("rows", [])}
        oh_rows = {r["sigma"]: r for r in oh.get("timings", [])}
        auto = (mc.get("environment") or {}).get("backends", [None])[0]
        for sigma in p["sigmas"]:
            m, o = mc_rows.get(sigma), oh_rows.get(sigma)
            cert = None
            if o is not None:
                names = [n for n in o["methods"] if n.startswith("certify_")]
                cert = {n[len("certify_"):]: o["methods"][n]["ratio_median"] for n in names}
            rows.append({
                "model": model, "sigma": sigma,
                "L": (m or o or {}).get("L"), "backend": auto,
                "dssn_s_per_image": m and m["dssn_s_per_image"],
                "dssn_images_per_s": m and 1.0 / m["dssn_s_per_image"],
                "paper_dssn_s_per_image": PAPER_DSSN_S.get(sigma) if model == "wrn40-2" else None,
                "mc_s_per_image": m and m["mc_s_per_image"],
                "mc_method": m and f"{m['mc_method']} (n = {m['n_timed']})",
                "speedup": m and m["speedup"],
                "certify_over_forward": cert,
                "naive_over_forward": o and o["methods"].get("naive", {}).get("ratio_median"),
            })
    return rows


def markdown(result: dict, p: dict) -> str:
    probe_ = result.get("probe") or {}
    dry = result["dry_run"]
    lines = ["# gpu-check" + (" (dry run: CPU, tiny sizes)" if dry else ""), ""]
    lines += [f"{probe_.get('device_name', '?')} ({result['device']}"
              + (f", sm_{''.join(map(str, probe_['capability']))}" if probe_.get("capability")
                 else "")
              + f"), torch {probe_.get('torch', '?')} (CUDA {probe_.get('torch_cuda')}), "
              f"triton {probe_.get('triton')}, python {probe_.get('python', '?')}; "
              f"backends {', '.join(probe_.get('backends', []))} (auto: "
              f"{probe_.get('auto_backend')}); CUDA kernels registered: "
              f"{probe_.get('cuda_kernels_registered')}; commit {probe_.get('git_commit')}. "
              f"Total {result['seconds']:.0f} s of a {result['budget_s']:.0f} s budget.", ""]
    lines += ["## Steps", ""]
    lines += md_table(["step", "status", "seconds", "detail"],
                      [[rec["name"], rec["status"], f"{rec['seconds']:.1f}",
                        (rec.get("detail") or "").replace("|", "/")
                        + (f" {rec['counts']}" if rec.get("counts") else "")]
                       for rec in result["steps"]])
    san = [rec for rec in result["steps"] if rec["step"] == "sanitizer"]
    if san:
        lines += ["", "## compute-sanitizer memcheck", ""]
        lines += md_table(["run", "status", "errors", "counts equal torch backend"],
                          [[rec["name"], rec["status"],
                            "n/a" if rec.get("sanitizer_errors") is None
                            else str(rec["sanitizer_errors"]),
                            "n/a" if not rec.get("result") else
                            str(all(v["counts_equal_torch"] for k, v in rec["result"].items()
                                    if k.startswith("margin_")))]
                           for rec in san])
    head = result["headline"]
    if head:
        lines += ["", "## Certification time per image", "",
                  f"DSSN: `dk.certify` (backend auto), forward batch {p['batch_size']}, "
                  f"median of {p['mc_repeats']} run(s); Monte Carlo: Yang et al.'s uniform "
                  f"noise, n0 = 64 + n = 100,000 forwards per image (the `MC method` column "
                  f"says whether it was timed at full n or with fewer samples and scaled "
                  f"linearly). Paper: WRN-40-2 on CIFAR-10, one {PAPER_GPU}, at sigma 3.5 "
                  f"DSSN {PAPER_DSSN_S[3.5]} s/image and Monte Carlo {PAPER_MC_S[3.5]} s/image "
                  f"(the one point of its Figure 6 that its text quotes); read off the plot "
                  f"(approximate): DSSN about {PAPER_PLOT_DSSN_S[0.15]} s/image at sigma "
                  f"0.15, Monte Carlo about {PAPER_PLOT_MC_S[0]} to {PAPER_PLOT_MC_S[1]} "
                  f"s/image. certify / forward: "
                  f"certify's time over the "
                  f"model's own forward passes on the same inputs at the same batch size "
                  f"(overhead.py, per backend); naive: the released-code-style pipeline.", ""]
        lines += md_table(
            ["model", "sigma", "L", "DSSN s/image", "images/s", f"paper {PAPER_GPU} s/image",
             "MC s/image (n=100k)", "MC method", "speedup", "certify / forward",
             "naive / forward"],
            [[h["model"], f"{h['sigma']:g}", h["L"], fmt(h["dssn_s_per_image"]),
              fmt(h["dssn_images_per_s"], ".1f"), fmt(h["paper_dssn_s_per_image"], "g", "-"),
              fmt(h["mc_s_per_image"], ".3f"), h["mc_method"] or "n/a",
              fmt(h["speedup"], ".1f"),
              ", ".join(f"{b} {v:.3f}" for b, v in (h["certify_over_forward"] or {}).items())
              or "n/a", fmt(h["naive_over_forward"], ".3f")]
             for h in head])
    prec = [row for model in p["models"]
            for row in ((result["reports"]["precision"].get(model) or {}).get("rows", []))]
    if prec:
        lines += ["", "## Precision", "",
                  "certify against the model's forward passes alone at the same precision "
                  "(same inputs, batch size and memory format); fp32 with TF32 off, TF32 for "
                  "cuBLAS and cuDNN, autocast with channels_last (model and inputs). "
                  "`moved`: votes that differ from the fp32 run (the certificate is exact "
                  "for the classifier as evaluated).", ""]
        lines += md_table(["model", "mode", "sigma", "L", "certify s/image", "images/s",
                           "forward (s)", "certify / forward", "predictions = fp32", "moved"],
                          [[row["model"], row["mode"], f"{row['sigma']:g}", row["L"],
                            fmt(row["s_per_image"]), fmt(row["images_per_s"], ".1f"),
                            fmt(row["forward_s"]), fmt(row["ratio"], ".3f"),
                            fmt(row["predictions_agree_fp32"], ".3f"),
                            row["votes_moved_vs_fp32"]] for row in prec])
    comp = [(model, row) for model in p["models"]
            for row in ((result["reports"]["compiled"].get(model) or {}).get("precision")
                        or [])]
    if comp:
        backend = ((result["reports"]["compiled"].get(comp[0][0]) or {}).get("environment")
                   or {}).get("compile_backend", "inductor")
        lines += ["", "## Compiled and bfloat16", "",
                  "certify (overhead.py --precision-only) against the eager fp32 forward "
                  "passes alone of the same run (same inputs and batch size): `/ fp32 "
                  "forward` = median time / eager fp32 forward time (below 1: faster than "
                  "the model's own eager forwards); compile s = first call - median call "
                  f"(torch.compile backend {backend}, dynamic=False); graphs = graphs dynamo "
                  "compiled in the first call + in the timed repetitions; votes differ = "
                  "votes that went to another class than under eager fp32 (reported, never "
                  "hidden).", ""]
        body = []
        for model, row in comp:
            for name, c in row["configs"].items():
                compiled = "compiled" in name
                body.append([model, f"{row['sigma']:g}", row["L"],
                             "forward only, eager fp32" if name == "forward"
                             else f"certify, {name}", fmt(c["median_s"]),
                             fmt(c["ratio_to_forward"], ".3f"),
                             fmt(c.get("compile_s"), ".1f") if compiled else "-",
                             f"{c['graphs_first_call']} + {row['graphs_during_repeats']}"
                             if compiled else "-", str(c.get("votes_differ", "-"))])
        lines += md_table(["model", "sigma", "L", "run", "median (s)", "/ fp32 forward",
                           "compile (s)", "graphs", "votes differ"], body)
    mem_rows, Ls = [], None
    for model in p["models"]:
        mem = (result["reports"]["overhead"].get(model) or {}).get("memory")
        for s in (mem or {}).get("summary", []):
            Ls = Ls or s["L"]
            if s["L"] == Ls:
                mem_rows.append([model, s["run"]]
                                + [f"{b / 2**20:.1f}" for b in s["peak_increase_bytes"]])
    if mem_rows:
        lines += ["", "## Peak memory against L", "",
                  "Peak increase of one call over the memory at its start (GPU: "
                  "torch.cuda.max_memory_allocated; CPU: peak RSS), MiB; `forward`: the "
                  "model's own forward passes over the same inputs:", ""]
        lines += md_table(["model", "run"] + [f"L {L}" for L in Ls], mem_rows)
    lines += ["", "Files: gpu_check.json (everything), logs/ (each step's output, the pytest "
                  "logs), overhead_*.{json,md,png}, precision_*.json, "
                  "compiled_*.{json,md}, "
                  "vs_monte_carlo_*.{json,md,png}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=HERE / "results" / "gpu_check",
                    help="report folder (default benchmarks/results/gpu_check)")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU device, tiny sizes, small CNN only, no build, no sanitizer")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for the whole run (default 450; dry run 300)")
    ap.add_argument("--only", nargs="+", choices=STEPS, default=None,
                    help="run these steps only (the probe always runs)")
    ap.add_argument("--skip", nargs="+", choices=STEPS, default=(), help="steps to leave out")
    # internal modes (the subprocesses of the steps)
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--sanitizer-target", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--precision-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="small", help=argparse.SUPPRESS)
    ap.add_argument("--sigmas", type=float, nargs="+", default=list(GPU_SIGMAS),
                    help=argparse.SUPPRESS)
    ap.add_argument("--images", type=int, default=4, help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=2, help=argparse.SUPPRESS)
    ap.add_argument("--batch-size", type=int, default=1024, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--json-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.probe:
        print(json.dumps(probe()))
        return 0
    if args.sanitizer_target:
        return sanitizer_target(args.sanitizer_target, args.device)
    if args.precision_worker:
        precision_worker(args)
        return 0

    dry = args.dry_run
    p = plan(dry)
    if not dry:
        import torch
        if not torch.cuda.is_available():
            print("gpu-check: this torch sees no CUDA GPU (torch.cuda.is_available() is False); "
                  "run `python benchmarks/gpu_check.py --dry-run` to exercise it on a CPU",
                  file=sys.stderr)
            return 2
    budget = args.budget if args.budget is not None else (300.0 if dry else DEFAULT_BUDGET_S)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    r = Runner(out, budget, sys.executable)
    state: dict = {}
    steps = [s for s in (args.only or STEPS) if s not in args.skip]
    if "build" not in steps:   # the probe still says what is installed
        rec = r.run("build", "probe", [r.python, __file__, "--probe"], 120, "probe.log")
        lines = [ln for ln in r.log_text(rec).splitlines() if ln.startswith("{")]
        state["probe"] = json.loads(lines[-1]) if lines else None
    for step in STEPS:
        if step in steps:
            STEP_FUNCS[step](r, p, dry, state)
    reports = collect(r, p)
    result = {
        "dry_run": dry, "device": p["device"], "budget_s": budget,
        "seconds": round(time.monotonic() - r.t0, 1), "plan": {k: v for k, v in p.items()},
        "probe": state.get("probe"), "arch": state.get("arch"),
        "sanitizer_tool": state.get("sanitizer_tool"),
        "steps": r.records, "reports": reports,
    }
    result["headline"] = headline_rows(reports, p) if any(
        s in steps for s in ("overhead", "vs_monte_carlo")) else []
    ok_status = {"ok", "dry-run", "unavailable"}   # unavailable: no compute-sanitizer
    result["passed"] = all(rec["status"] in ok_status for rec in r.records)
    md = markdown(result, p)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / "summary.md").write_text(md)
    print(md)
    print(f"gpu-check: {'PASSED' if result['passed'] else 'NOT PASSED'}: "
          f"{sum(rec['status'] in ok_status for rec in r.records)} of {len(r.records)} runs "
          f"ok, {result['seconds']:.0f} s; report in {out}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
