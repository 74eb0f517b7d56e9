"""`make gpu-stack-check`: the GPU machines' software stack on a CPU machine, without a GPU.

    python3 scripts/gpu_stack_check.py [--torch 2.11.0] [--arch 9.0] [--venv DIR]
                                       [--cache DIR] [--pytest-args ARGS] [--skip-tests]

A rehearsal of `make gpu-check` before a GPU is lent: the GPU machines' torch (a CUDA
build, and the triton it pins) in a virtual environment here, the extension built for the
H200's architecture with gpu_check.py's own build command, then what runs without a GPU.
It is how triton 3.6's interpreter (torch 2.11's triton) was found to fail 123 CPU tests
that triton 3.9 passed.

1. The venv, in a cache folder outside the checkout (--cache, default
   $DSSN_GPU_STACK_CACHE or ~/.cache/dssn-kernels/gpu-stack-check), made from the python
   running this script: ``torch==--torch`` from the package index (a download of several
   GB; one line says so first), then requirements-dev.txt without its torch, triton and
   setuptools lines (torch decides triton; requirements-dev's setuptools is newer than
   torch 2.11 allows) plus pytest-xdist (GPU_MACHINE_EXTRAS: the GPU machines have it and
   gpu_check.py's -n workers use it), then the setuptools that torch's metadata requires (torch 2.11:
   ``setuptools<82``), upgraded to the newest it allows. A marker file written last names
   the torch version; the venv is reused only when the marker matches and a probe imports
   torch of that version (a CUDA build), triton, pytest, hypothesis and the rest, and is
   made again otherwise. --venv DIR uses DIR instead: reused when complete, or when it
   has no marker but passes the probe (a venv made by hand); created when it does not
   exist; refused otherwise (a folder this script did not make is never deleted).
2. A copy of the tree (every file git tracks plus untracked files it does not ignore,
   tests/ and benchmarks/ included) in <cache>/src, with cuda_build_check's sync_copy (a
   file whose content did not change keeps its copy's time stamp). The checkout's .venv
   and its built dssn_kernels/_C*.so are never touched.
3. The build: benchmarks/gpu_check.py's own command (``build_command``, an editable pip
   install, no index) and environment (``build_env``) with the venv's python, in the copy,
   TORCH_CUDA_ARCH_LIST=--arch (9.0, the H200), CUDA_HOME from cuda_build_check.cuda_home(),
   MAX_JOBS=--jobs. pip's editable build compiles in a temporary folder, so every run
   compiles everything, as the GPU run does.
4. Each a step with its status and time: scripts/check_cuda_binding.py on that build; the
   test suite (pytest --pytest-args in the copy; --skip-tests leaves it out); and
   ``benchmarks/gpu_check.py --dry-run --out <cache>/gpu_check_dry_run``. The venv's bin
   comes first on PATH for every step.

A summary ends the run: python, torch, triton, numpy and setuptools versions, each step's
status and seconds, PASSED or FAILED; exit status 0 only if every step that ran passed.
Logs in <cache>/logs/. Without a CUDA toolkit (nvcc and cuda_runtime.h) it prints one
line and exits 1: the rehearsal builds the CUDA kernels, as the GPU run does. A lock file
in the cache serializes concurrent runs. Stdlib only: runs with any python3.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cuda_build_check as cbc  # noqa: E402

ROOT = cbc.ROOT
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import gpu_check  # noqa: E402

# The GPU machines' torch: the H200 machines lent to this project have torch 2.11.0+cu130
# (with triton 3.6.0 and setuptools<82) installed, as README.md's section "Rehearsing the
# GPU machines' stack" records. Change it (and the Makefile's GPU_STACK_TORCH) with them.
TORCH_VERSION = "2.11.0"
ARCH = "9.0"                  # the H200 (sm_90)
# The lines of requirements-dev.txt left out of the venv: torch is --torch, and torch's
# own pins decide triton and the setuptools range.
DROPPED_REQUIREMENTS = ("torch", "triton", "setuptools")
# Beyond requirements-dev.txt, what the GPU machines have and gpu_check.py uses there:
# pytest-xdist (its -n workers; the dry run asks for 2 where it is installed).
GPU_MACHINE_EXTRAS = ("pytest-xdist",)
PROBE_MODULES = ("torch", "triton", "numpy", "scipy", "pytest", "hypothesis", "sklearn",
                 "matplotlib", "ninja", "setuptools", "build", "xdist")
DEFAULT_PYTEST_ARGS = "-q -p no:cacheprovider"
MARKER = ".dssn-gpu-stack-check"


def say(msg):
    print(f"gpu-stack-check: {msg}", flush=True)


def default_cache(environ=os.environ):
    return environ.get("DSSN_GPU_STACK_CACHE") or os.path.join(
        environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
        "dssn-kernels", "gpu-stack-check")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--torch", default=TORCH_VERSION,
                        help="the torch version of the venv (default %(default)s, the GPU "
                             "machines')")
    parser.add_argument("--arch", default=ARCH,
                        help="TORCH_CUDA_ARCH_LIST (default %(default)s, the H200)")
    parser.add_argument("--cache", default=default_cache(),
                        help="folder of the venv, the copy and the logs (default %(default)s)")
    parser.add_argument("--venv", default=None,
                        help="use this venv instead of the cache's (default "
                             "<cache>/venv-torch<version>-cpXY)")
    parser.add_argument("--pytest-args", default=DEFAULT_PYTEST_ARGS,
                        help="pytest's arguments, one string (default: the whole suite, "
                             "'%(default)s')")
    parser.add_argument("--skip-tests", action="store_true", help="leave out the pytest step")
    parser.add_argument("--jobs", type=int, default=max(1, min(os.cpu_count() or 1, 4)),
                        help="MAX_JOBS of the build (default %(default)s)")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------
# The venv.

def requirement_name(line):
    """The normalized project name of a requirement line, or None (comment, blank, option)."""
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line.split("#", 1)[0])
    return re.sub(r"[-_.]+", "-", m.group(1)).lower() if m else None


def filter_requirements(text):
    """(kept lines, dropped lines) of requirements-dev.txt: the torch, triton and setuptools
    lines go."""
    kept, dropped = [], []
    for line in text.splitlines():
        (dropped if requirement_name(line) in DROPPED_REQUIREMENTS else kept).append(line)
    return kept, dropped


def setuptools_requirements(requires):
    """torch's Requires-Dist entries for setuptools (markers kept, pip evaluates them)."""
    return [r for r in requires if requirement_name(r) == "setuptools"]


def venv_python(venv):
    return cbc.venv_python(venv)


def probe_code(version):
    return (f"import {', '.join(PROBE_MODULES)}; "
            f"assert torch.__version__.split('+')[0] == {version!r}, torch.__version__; "
            "assert torch.version.cuda, 'torch is not a CUDA build'")


def venv_probe(venv, version):
    """Whether the venv's python imports torch ``version`` (a CUDA build) and the rest."""
    if not os.access(venv_python(venv), os.X_OK):
        return False
    return subprocess.run([venv_python(venv), "-c", probe_code(version)],
                          capture_output=True, check=False).returncode == 0


def marker_matches(venv, version):
    try:
        with open(os.path.join(venv, MARKER), encoding="utf-8") as f:
            return f.read().strip() == f"torch=={version}"
    except OSError:
        return False


def venv_complete(venv, version):
    """Made by this script to the end (the marker, written last, names ``version``) and the
    probe passes."""
    return marker_matches(venv, version) and venv_probe(venv, version)


def make_venv(venv, version, cache, log):
    """Creates the venv; its exit status (0: made, marker written)."""
    if os.path.exists(venv):
        shutil.rmtree(venv)
    py = venv_python(venv)
    with open(os.path.join(ROOT, "requirements-dev.txt"), encoding="utf-8") as f:
        kept, _ = filter_requirements(f.read())
    reqs = os.path.join(cache, "requirements-gpu-stack.txt")
    with open(reqs, "w", encoding="utf-8") as f:
        f.write("\n".join(list(kept) + list(GPU_MACHINE_EXTRAS)) + "\n")
    for cmd in ([sys.executable, "-m", "venv", venv],
                # --no-compile: no .pyc for torch's thousands of files up front
                [py, "-m", "pip", "install", "-q", "--no-compile", f"torch=={version}"],
                [py, "-m", "pip", "install", "-q", "-r", reqs]):
        rc = cbc.run_logged(cmd, log)
        if rc:
            return rc
    requires = subprocess.run(
        [py, "-c", "import importlib.metadata as m, json; "
                   "print(json.dumps(m.requires('torch') or []))"],
        capture_output=True, text=True, check=False)
    wanted = setuptools_requirements(json.loads(requires.stdout or "[]"))
    if wanted:   # the newest setuptools torch allows (the venv's own may be older)
        rc = cbc.run_logged([py, "-m", "pip", "install", "-q", "--upgrade"] + wanted, log)
        if rc:
            return rc
    with open(os.path.join(venv, MARKER), "w", encoding="utf-8") as f:
        f.write(f"torch=={version}\n")
    return 0


def versions(venv):
    code = ("import json, sys, torch, triton, numpy, setuptools; print(json.dumps({"
            "'python': sys.version.split()[0], 'torch': torch.__version__, "
            "'cuda': torch.version.cuda, 'triton': triton.__version__, "
            "'numpy': numpy.__version__, 'setuptools': setuptools.__version__}))")
    out = subprocess.run([venv_python(venv), "-c", code], capture_output=True, text=True,
                         check=False).stdout.strip().splitlines()
    try:
        return json.loads(out[-1])
    except (IndexError, ValueError):
        return {}


# ---------------------------------------------------------------------------------------
# The steps.

def last_line(log):
    lines = [ln.strip() for ln in cbc.log_tail(log, 2000).splitlines() if ln.strip()]
    return lines[-1] if lines else ""


class Steps:
    """Runs and records the steps: name, status (ok, FAILED, skipped, not run), seconds."""

    def __init__(self, logs):
        self.logs = logs
        self.records = []

    def log(self, name):
        return os.path.join(self.logs, name.replace(" ", "_") + ".log")

    def note(self, name, status, detail):
        self.records.append({"name": name, "status": status, "seconds": 0.0, "detail": detail})
        say(f"{name}: {status} ({detail})")

    def run(self, name, func, detail=last_line):
        """func(log) -> exit status; the step passes on 0. Its detail: detail(log)."""
        log = self.log(name)
        open(log, "w").close()
        say(f"{name} ... (log {log})")
        t = time.perf_counter()
        rc = func(log)
        rec = {"name": name, "status": "ok" if rc == 0 else "FAILED",
               "seconds": time.perf_counter() - t, "detail": detail(log) if detail else ""}
        self.records.append(rec)
        if rc:
            print(cbc.log_tail(log, 3000), file=sys.stderr)
        say(f"{name}: {rec['status']} ({rec['seconds']:.0f} s)"
            + (f": {rec['detail']}" if rec["detail"] else ""))
        return rc == 0

    def command(self, name, cmd, cwd, env):
        return self.run(name, lambda log: cbc.run_logged(cmd, log, cwd=cwd, env=env))


def step_env(venv):
    """The steps' environment: the venv's bin first on PATH, no PYTHONPATH (the copy's
    dssn_kernels, not a checkout's) and no DSSN_NO_CUDA."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.pop("DSSN_NO_CUDA", None)
    env["PATH"] = os.pathsep.join(filter(None, [os.path.join(venv, "bin"), env.get("PATH")]))
    return env


def prepare_venv(steps, args, cache, venv, given):
    """The venv step: reuse, create or refuse. Whether the venv is usable."""
    if venv_complete(venv, args.torch):
        steps.note("venv", "ok", f"reused {venv}")
        return True
    if given and os.path.exists(venv):
        if venv_probe(venv, args.torch):
            steps.note("venv", "ok", f"reused {venv}: no marker, the probe passed")
            return True
        steps.note("venv", "FAILED", f"{venv} exists but is not a complete venv with torch "
                                     f"{args.torch} (a CUDA build), "
                                     f"{', '.join(PROBE_MODULES[1:])}: not touched")
        return False
    say(f"creating {venv}: DOWNLOADS torch=={args.torch} and its CUDA packages from the "
        f"package index (several GB, about 4.6 GB on disk), then requirements-dev.txt "
        f"without its torch, triton and setuptools lines, then torch's setuptools")
    return steps.run("venv", lambda log: make_venv(venv, args.torch, cache, log),
                     detail=lambda log: venv)


def summary(steps, info, venv, total, logs, skipped_tests):
    passed = all(rec["status"] in ("ok", "skipped") for rec in steps.records)
    lines = [f"python {info.get('python', '?')}, torch {info.get('torch', '?')} "
             f"(CUDA {info.get('cuda', '?')}), triton {info.get('triton', '?')}, "
             f"numpy {info.get('numpy', '?')}, setuptools {info.get('setuptools', '?')} "
             f"(venv {venv})"]
    lines += [f"  {rec['name']:<20} {rec['status']:<8} {rec['seconds']:6.0f} s"
              + (f"  {rec['detail']}" if rec["detail"] else "") for rec in steps.records]
    lines.append(f"{'PASSED' if passed else 'FAILED'}"
                 + (" (pytest skipped)" if skipped_tests and passed else "")
                 + f" in {total:.0f} s; logs in {logs}")
    return passed, lines


def rehearse(args, home, cache, venv, given, t0):
    logs = os.path.join(cache, "logs")
    os.makedirs(logs, exist_ok=True)
    steps = Steps(logs)
    venv_ok = prepare_venv(steps, args, cache, venv, given)
    src = os.path.join(cache, "src")
    py = venv_python(venv)
    env = step_env(venv)
    built = False
    if venv_ok:
        n = cbc.sync_copy(src, cbc.repo_files())
        say(f"copied the tree ({n} files) into {src}; building for "
            f"TORCH_CUDA_ARCH_LIST={args.arch} (CUDA_HOME={home}, MAX_JOBS={args.jobs})")
        built = steps.command("build", gpu_check.build_command(py), src,
                              gpu_check.build_env(args.arch, home, args.jobs, base=env))
    if not built:
        for name in ("check_cuda_binding", "pytest", "gpu_check dry run"):
            steps.note(name, "not run", "the build failed" if venv_ok else "no venv")
    else:
        steps.command("check_cuda_binding",
                      [py, os.path.join("scripts", "check_cuda_binding.py"), "--build-dir",
                       src, "--arch", args.arch], src, env)
        if args.skip_tests:
            steps.note("pytest", "skipped", "--skip-tests")
        else:
            steps.command("pytest", [py, "-m", "pytest"] + shlex.split(args.pytest_args),
                          src, env)
        out = os.path.join(cache, "gpu_check_dry_run")
        shutil.rmtree(out, ignore_errors=True)
        steps.command("gpu_check dry run", [py, os.path.join("benchmarks", "gpu_check.py"),
                                            "--dry-run", "--out", out], src, env)
    info = versions(venv) if os.access(py, os.X_OK) else {}
    passed, lines = summary(steps, info, venv, time.perf_counter() - t0, logs,
                            args.skip_tests)
    with open(os.path.join(logs, "summary.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    for line in lines:
        say(line)
    return 0 if passed else 1


def main(argv=None):
    args = parse_args(argv)
    t0 = time.perf_counter()
    home = cbc.cuda_home()
    if home is None:
        say("FAILED: no CUDA toolkit (nvcc and include/cuda_runtime.h) found; the rehearsal "
            "builds the CUDA kernels as the GPU run does: install one or set CUDA_HOME")
        return 1
    cache = os.path.abspath(args.cache)
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    given = args.venv is not None
    venv = os.path.abspath(args.venv or os.path.join(cache, f"venv-torch{args.torch}-{tag}"))
    with cbc.cache_lock(cache, say, "gpu-stack-check"):
        return rehearse(args, home, cache, venv, given, t0)


if __name__ == "__main__":
    sys.exit(main())
