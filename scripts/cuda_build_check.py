"""`make cuda-build-check`: build the real CUDA extension against a CUDA build of torch and
check what can be checked without a GPU (scripts/check_cuda_binding.py).

    python3 scripts/cuda_build_check.py [--arch 7.5] [--cache DIR]

1. Finds the torch 2.14.1 CUDA wheel on this machine's disk (the file:// indexes and
   find-links folders of pip's configuration); without it, prints one line saying so and
   exits 0 (the only skip).
2. A second virtual environment with that torch (installed from the wheel's path) and
   numpy, scipy, tqdm, ninja, setuptools, wheel from pip. It lives in a cache folder
   outside the checkout (--cache, default $DSSN_CUDA_BUILD_CACHE or
   ~/.cache/dssn-kernels/cuda-build-check) so that other checkouts on the machine, CI's
   fresh clone included, reuse it; it is reused only when a previous run completed it
   (same wheel, marker file written last) and rebuilt otherwise. Nothing depends on the
   cache: a cold run does everything.
3. Copies the package's sources (what git tracks plus untracked files it does not ignore)
   into <cache>/build/src and builds the extension there with ``setup.py build_ext
   --inplace --force`` for TORCH_CUDA_ARCH_LIST=--arch (sm_75, the RTX 2080 Ti) with
   CUDA_HOME set. The checkout's own dssn_kernels/_C*.so (the CPU venv's, same file name
   for the same Python) is never touched. Files whose content did not change keep their
   copy's time stamp, so ninja recompiles only what changed, also from a fresh clone;
   --force makes setuptools always hand over to ninja and relink (setuptools alone would
   miss a changed header).
4. Runs scripts/check_cuda_binding.py with the venv's python on that build.

A lock file in the cache serializes concurrent runs. Stdlib only: runs with any python3
(the venv is made from it).
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import html.parser
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_VERSION = "2.14.1"
EXTRA_PACKAGES = ["numpy", "scipy", "tqdm", "ninja", "setuptools", "wheel"]
# What the build reads (and the check script); everything else of the tree stays out.
COPY_PREFIXES = ("csrc/", "dssn_kernels/", "python/", "scripts/")
COPY_FILES = ("setup.py", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in")
MARKER = ".dssn-cuda-build-check"
DEFAULT_CACHE = os.environ.get("DSSN_CUDA_BUILD_CACHE") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
    "dssn-kernels", "cuda-build-check")


def say(msg):
    print(f"cuda-build-check: {msg}", flush=True)


# ---------------------------------------------------------------------------------------
# 1. The wheel on disk.

class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.hrefs += [v for k, v in attrs if k == "href" and v]


def pip_locations(python):
    """(local index folders, find-links folders) from pip's configuration and PIP_*
    variables; remote ones are ignored (only the disk is looked at)."""
    values = []
    try:
        out = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True,
                             text=True, timeout=60, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    for line in out.splitlines():
        key, _, value = line.partition("=")
        if key.rsplit(".", 1)[-1] in ("index-url", "extra-index-url", "find-links"):
            values.append((key.rsplit(".", 1)[-1], value.strip().strip("'\"")))
    for var, key in (("PIP_INDEX_URL", "index-url"), ("PIP_EXTRA_INDEX_URL", "extra-index-url"),
                     ("PIP_FIND_LINKS", "find-links")):
        if os.environ.get(var):
            values.append((key, os.environ[var]))
    indexes, links = [], []
    for key, value in values:
        for item in value.split():
            path = item.removeprefix("file://")
            if "://" in path or not os.path.isdir(path):
                continue
            (links if key == "find-links" else indexes).append(os.path.abspath(path))
    return list(dict.fromkeys(indexes)), list(dict.fromkeys(links))


def wheel_matches(name, tag):
    """A torch TORCH_VERSION wheel for this Python and Linux x86_64, not a +cpu build."""
    parts = name[:-len(".whl")].split("-") if name.endswith(".whl") else []
    return (len(parts) == 5 and parts[0] == "torch" and parts[1] == TORCH_VERSION
            and parts[2] == tag and "x86_64" in parts[4] and "linux" in parts[4])


def find_torch_wheel(python, tag):
    """Path of the torch TORCH_VERSION CUDA wheel on disk, or None; and where it looked."""
    indexes, links = pip_locations(python)
    candidates = []
    for index in indexes:
        page = os.path.join(index, "torch", "index.html")
        if not os.path.isfile(page):
            continue
        parser = _Links()
        with open(page, encoding="utf-8", errors="replace") as f:
            parser.feed(f.read())
        for href in parser.hrefs:
            url = href.split("#")[0]
            name = urllib.parse.unquote(os.path.basename(url))
            if wheel_matches(name, tag):
                target = urllib.parse.urljoin("file://" + page, url)
                candidates.append(urllib.request.url2pathname(urllib.parse.urlparse(target).path))
    for folder in links:
        candidates += [os.path.join(folder, n) for n in sorted(os.listdir(folder))
                       if wheel_matches(n, tag)]
    for path in candidates:
        if os.path.isfile(path) and is_cuda_wheel(path):
            return path, indexes + links
    return None, indexes + links


def is_cuda_wheel(path):
    """Whether the wheel's metadata requires NVIDIA's CUDA runtime packages."""
    import zipfile
    try:
        with zipfile.ZipFile(path) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            text = z.read(meta).decode("utf-8", "replace")
    except (OSError, StopIteration, zipfile.BadZipFile):
        return False
    return any(line.startswith("Requires-Dist:") and ("nvidia-" in line or "cuda-" in line)
               for line in text.splitlines())


# ---------------------------------------------------------------------------------------
# 2. The venv.

def venv_python(venv):
    return os.path.join(venv, "bin", "python")


def venv_complete(venv, wheel):
    marker = os.path.join(venv, MARKER)
    if not (os.path.isfile(marker) and os.access(venv_python(venv), os.X_OK)):
        return False
    with open(marker, encoding="utf-8") as f:
        if f.read().strip() != os.path.basename(wheel):
            return False
    probe = ("import torch, numpy, scipy, tqdm, ninja, setuptools; "
             f"assert torch.__version__.startswith('{TORCH_VERSION}') and torch.version.cuda")
    return subprocess.run([venv_python(venv), "-c", probe], capture_output=True,
                          check=False).returncode == 0


def make_venv(venv, wheel, log):
    if os.path.exists(venv):
        shutil.rmtree(venv)
    run([sys.executable, "-m", "venv", venv], log)
    # The wheel by path: torch comes from the disk whatever the indexes offer.
    # --no-compile: no .pyc for torch's thousands of files (the check imports few of them)
    run([venv_python(venv), "-m", "pip", "install", "-q", "--no-compile", wheel]
        + EXTRA_PACKAGES, log)
    with open(os.path.join(venv, MARKER), "w", encoding="utf-8") as f:
        f.write(os.path.basename(wheel) + "\n")


# ---------------------------------------------------------------------------------------
# 3. The copy and the build.

def repo_files():
    """Relative paths of the tree's files: what git tracks plus untracked files it does not
    ignore (so uncommitted work is included), or a walk without git."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], cwd=ROOT, capture_output=True,
                             check=True).stdout.decode()
        paths = [p for p in out.split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        paths = []
        for dirpath, dirnames, filenames in os.walk(ROOT):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")
                           and d not in ("build", "__pycache__") and not d.endswith(".egg-info")]
            paths += [os.path.relpath(os.path.join(dirpath, f), ROOT) for f in filenames
                      if not f.endswith((".so", ".pyc"))]
    return sorted(p for p in set(paths) if os.path.isfile(os.path.join(ROOT, p)))


def source_files():
    """Relative paths of the sources the build needs (and the check script)."""
    return [p for p in repo_files() if p.startswith(COPY_PREFIXES) or p in COPY_FILES]


def same_content(a, b):
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


def sync_copy(dest, wanted=None):
    """Mirror ``wanted`` (default source_files()) into dest: copies a file only when its
    content changed (an unchanged file keeps its copy's time stamp, so ninja does not
    recompile it, even from a fresh clone whose files are all new) and drops files that
    left the tree; dest's build/ folder and built extension stay."""
    wanted = source_files() if wanted is None else wanted
    os.makedirs(dest, exist_ok=True)
    for rel in wanted:
        src, dst = os.path.join(ROOT, rel), os.path.join(dest, rel)
        if os.path.isfile(dst) and same_content(src, dst):
            continue
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy2(src, dst)
    keep = set(wanted)
    for dirpath, dirnames, filenames in os.walk(dest):
        rel_dir = os.path.relpath(dirpath, dest)
        if rel_dir == "build" or rel_dir.startswith("build" + os.sep):
            dirnames[:] = []
            continue
        for f in filenames:
            rel = os.path.normpath(os.path.join(rel_dir, f))
            if rel not in keep and not f.endswith((".so", ".pyc")):
                os.remove(os.path.join(dirpath, f))
    return len(wanted)


def cuda_home():
    """CUDA_HOME if set, else the first toolkit with nvcc and cuda_runtime.h (torch's own
    guess on this machine is /usr/local, which lacks cuda_runtime.h)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in candidates:
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")) and \
                os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def run_logged(cmd, log, cwd=None, env=None):
    """Run cmd with its output appended to log; its exit status."""
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT,
                              check=False)
    return proc.returncode


def log_tail(log, chars=6000):
    with open(log, encoding="utf-8", errors="replace") as f:
        return f.read()[-chars:]


def run(cmd, log, cwd=None, env=None):
    """Run cmd with its output appended to log; on failure print the log's tail and exit."""
    rc = run_logged(cmd, log, cwd, env)
    if rc != 0:
        print(log_tail(log), file=sys.stderr)
        say(f"FAILED: {' '.join(cmd[:4])} ... exited {rc} (log: {log})")
        sys.exit(1)


@contextlib.contextmanager
def cache_lock(cache, say=say, what="cuda-build-check"):
    """Holds <cache>/lock for the block: a concurrent run on the same cache waits."""
    os.makedirs(cache, exist_ok=True)
    with open(os.path.join(cache, "lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another {what} using {cache} ...")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="7.5", help="TORCH_CUDA_ARCH_LIST (default 7.5)")
    parser.add_argument("--cache", default=DEFAULT_CACHE,
                        help="folder of the venv and the build (default %(default)s)")
    parser.add_argument("--venv", default=None, help="the venv (default <cache>/venv-...)")
    parser.add_argument("--build-dir", default=None, help="the build (default <cache>/build)")
    parser.add_argument("--jobs", type=int, default=max(1, min(os.cpu_count() or 1, 4)))
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"

    wheel, looked = find_torch_wheel(sys.executable, tag)
    if wheel is None:
        say(f"SKIPPED: no torch {TORCH_VERSION} CUDA wheel for {tag} on this machine's disk "
            f"(looked in pip's local indexes and find-links: {', '.join(looked) or 'none'})")
        return 0
    home = cuda_home()
    if home is None:
        say("FAILED: no CUDA toolkit (nvcc and include/cuda_runtime.h) found; set CUDA_HOME")
        return 1

    cache = os.path.abspath(args.cache)
    venv = os.path.abspath(args.venv or os.path.join(cache, f"venv-torch{TORCH_VERSION}-{tag}"))
    build_dir = os.path.abspath(args.build_dir or os.path.join(cache, "build"))
    os.makedirs(build_dir, exist_ok=True)
    with cache_lock(cache):
        return build_and_check(args, wheel, home, venv, build_dir, t0)


def build_and_check(args, wheel, home, venv, build_dir, t0):
    log = os.path.join(build_dir, "build.log")
    open(log, "w").close()
    t = time.perf_counter()
    if venv_complete(venv, wheel):
        say(f"reusing {venv} (torch {TORCH_VERSION} from {wheel})")
    else:
        say(f"creating {venv}: torch {TORCH_VERSION} from {wheel} and "
            f"{' '.join(EXTRA_PACKAGES)}")
        make_venv(venv, wheel, log)
    t_venv = time.perf_counter() - t

    t = time.perf_counter()
    src = os.path.join(build_dir, "src")
    n = sync_copy(src)
    env = dict(os.environ, CUDA_HOME=home, TORCH_CUDA_ARCH_LIST=args.arch,
               MAX_JOBS=str(args.jobs))
    env.pop("DSSN_NO_CUDA", None)
    say(f"building {n} files in {src} for TORCH_CUDA_ARCH_LIST={args.arch} "
        f"(CUDA_HOME={home}, MAX_JOBS={args.jobs}; log {log})")
    run([venv_python(venv), "setup.py", "build_ext", "--inplace", "--force"], log, cwd=src,
        env=env)
    t_build = time.perf_counter() - t

    t = time.perf_counter()
    proc = subprocess.run([venv_python(venv), os.path.join(src, "scripts", "check_cuda_binding.py"),
                           "--build-dir", src, "--arch", args.arch], cwd=src, check=False)
    t_check = time.perf_counter() - t
    say(f"venv {t_venv:.0f} s, build {t_build:.0f} s, checks {t_check:.0f} s, "
        f"total {time.perf_counter() - t0:.0f} s")
    if proc.returncode != 0:
        say("FAILED")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
