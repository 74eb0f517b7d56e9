"""Packaging: the sdist and the wheel build, hold what they must (and no build debris),
install into fresh virtual environments and work from a directory outside the checkout.

The tracked files are copied to a temporary directory, with decoy build products planted
(a .so, a .pyc, build/, dist/, .venv/), and `python -m build --no-isolation` builds the
sdist and then the wheel from the unpacked sdist (so the sdist alone must be enough to
build). The wheel is installed into one fresh environment and the sdist (compiled again
by pip) into another. Nothing is downloaded: each environment is made without pip and
sees this interpreter's packages (torch, numpy, scipy, tqdm, pip, setuptools) through a
.pth file naming a folder of links to them, from which this checkout's own install
(editable or not) is left out, so only the fresh install can be imported.

Two builds of the C++ extension, about a minute each on 2 cores, make this the slowest
test file."""
import email
import fnmatch
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "dssn_kernels-0.1.0"
SOURCE_DIRS = ("csrc", "dssn_kernels", "python", "docs", "tests", "benchmarks")
STRAYS = ["dssn_kernels/_C.cpython-311-x86_64-linux-gnu.so",
          "dssn_kernels/__pycache__/spec.cpython-311.pyc",
          "build/temp.linux-x86_64-cpython-311/csrc/ops.o", "dist/old.whl", ".venv/bin/python",
          "csrc/cpu/vote.o"]
BUILD_PRODUCT = re.compile(r"\.(so|pyc|o)$|__pycache__|^(build|dist|\.venv[^/]*)/")
# Five lines certifying four images with a model whose logits are exact integers (so the
# votes cannot depend on how a backend batches the forward calls).
CERTIFY = """\
import torch, dssn_kernels as dk
w = torch.randint(-3, 4, (16, 3), generator=torch.Generator().manual_seed(0)).double()
class M(torch.nn.Module): forward = lambda self, x: torch.round(x.flatten(1).double() * 64) @ w
x = torch.randint(0, 17, (4, 1, 4, 4), generator=torch.Generator().manual_seed(1)).to(torch.uint8)
counts = dk.certify(M().eval(), x, sigma=0.5, q=16, backend={backend!r}).counts.tolist()
"""

pytest.importorskip("build", reason="needs `build`: pip install -r requirements-dev.txt")


def run(cmd, cwd, env=None, timeout=600):
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                       check=False)
    assert p.returncode == 0, \
        f"{cmd} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return p


def tracked_files():
    """The checkout's files: git's list when this is a git checkout, with the files not yet
    added under the source folders (an unpacked sdist has no .git: then every file but
    build products and environments)."""
    if os.path.isdir(os.path.join(ROOT, ".git")) and shutil.which("git"):
        out = run(["git", "ls-files", "-z"], ROOT).stdout
        out += run(["git", "ls-files", "-z", "--others", "--exclude-standard", "--", *SOURCE_DIRS],
                   ROOT).stdout
        return sorted({f for f in out.split("\0") if f and os.path.isfile(os.path.join(ROOT, f))})
    skip_dir = re.compile(r"^(\.git|\.venv.*|build|dist|__pycache__|.*\.egg-info|\..*_cache"
                          r"|\.hypothesis|\.benchmarks|runs)$")
    found = []
    for base, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not skip_dir.match(d)]
        rel = os.path.relpath(base, ROOT)
        found += [os.path.normpath(os.path.join(rel, f)) for f in names
                  if not re.search(r"\.(so|pyc|o)$", f)]
    return sorted(f for f in found if f not in ("PKG-INFO", "setup.cfg"))


def clean_env():
    """Environment for the subprocesses: no PYTHONPATH or virtual environment of the caller;
    builds compile the CPU kernels only (with a CUDA torch, nvcc would take many minutes:
    the sdist test checks that the CUDA sources are shipped)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["DSSN_NO_CUDA"] = "1"
    return env


@pytest.fixture(scope="module")
def files():
    return tracked_files()


@pytest.fixture(scope="module")
def dists(tmp_path_factory, files):
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    for f in files:
        os.makedirs(src / os.path.dirname(f), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, f), src / f)
    for f in STRAYS:                       # decoys: what a developer's checkout holds
        os.makedirs(src / os.path.dirname(f), exist_ok=True)
        (src / f).write_bytes(b"stray build product")
    out = tmp / "dist"
    p = run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)],
            tmp, env=clean_env())
    assert "project.license" not in p.stdout + p.stderr   # no deprecated license table
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return sdist, wheel


@pytest.fixture(scope="module")
def site_links(tmp_path_factory):
    """A folder of links to this interpreter's installed packages, less this checkout's
    own distribution (its files, dist-info and editable-install hooks) and the .pth files."""
    import numpy
    import scipy
    import torch
    import tqdm
    sites = []
    for mod in (torch, numpy, scipy, tqdm):
        site = os.path.dirname(os.path.dirname(os.path.abspath(mod.__file__)))
        if site not in sites:
            sites.append(site)
    for key in ("purelib", "platlib"):                 # pip and setuptools
        if sysconfig.get_paths()[key] not in sites:
            sites.append(sysconfig.get_paths()[key])
    links = tmp_path_factory.mktemp("site-links")
    ours = re.compile(r"^(dssn[_-]kernels.*|dssn_reference.*|__editable__.*)$|\.pth$",
                      re.IGNORECASE)
    for site in sites:
        if not os.path.isdir(site):
            continue
        for name in os.listdir(site):
            if not ours.search(name) and not (links / name).exists():
                os.symlink(os.path.join(site, name), links / name)
    return links


def fresh_venv(path, site_links):
    run([sys.executable, "-m", "venv", "--without-pip", str(path)], os.path.dirname(path))
    python = path / "bin" / "python"
    purelib = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                  path).stdout.strip()
    with open(os.path.join(purelib, "zz_outer_packages.pth"), "w") as f:
        f.write(str(site_links) + "\n")
    return python


def pip_install(python, target, cwd, *extra):
    run([str(python), "-m", "pip", "install", "--no-index", "--no-build-isolation",
         "--disable-pip-version-check", *extra, str(target)], cwd, env=clean_env())


def check_installed(python, outside):
    """dssn --help, available_backends() and the five-line certify, from outside the
    checkout, against the installed package only."""
    env = clean_env()
    bindir = os.path.dirname(str(python))
    assert not str(outside).startswith(ROOT)
    p = run([os.path.join(bindir, "dssn"), "--help"], outside, env=env)
    assert "certify" in p.stdout and "train" in p.stdout
    run([str(python), "-m", "dssn_kernels", "--help"], outside, env=env)

    code = CERTIFY.format(backend="cpp") + (
        "print(dk.__file__); print(dk.available_backends()); print(counts)\n")
    out = run([str(python), "-c", code], outside, env=env).stdout
    where, backends, counts = out.splitlines()[-3:]
    assert where.startswith(os.path.dirname(bindir) + os.sep), where  # the venv's copy
    assert "'cpp'" in backends, backends
    ns = {}
    exec(CERTIFY.format(backend="torch"), ns)  # noqa: S102  (the source tree's counts, here)
    assert counts == str(ns["counts"])
    assert all(sum(row) == 27 for row in ns["counts"])   # L = 27 for sigma 0.5, q = 16


def test_sdist_holds_the_sources_and_no_build_products(dists, files):
    sdist, _ = dists
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    needed = [f for f in files if f.split("/")[0] in ("csrc", "dssn_kernels", "python", "docs")
              or f.split("/")[0] in SOURCE_DIRS and f.endswith((".py", ".md"))]
    needed += ["LICENSE", "README.md", "pyproject.toml", "setup.py", "MANIFEST.in", "PKG-INFO"]
    missing = sorted(set(needed) - names)
    assert not missing, f"missing from the sdist: {missing}"
    for header in ("csrc/dssn_noise.h", "csrc/op_checks.h", "csrc/cpu/expand_rows.h",
                   "csrc/cuda/launchers.h", "csrc/cuda/vote.cu"):
        assert header in names
    stray = sorted(n for n in names if BUILD_PRODUCT.search(n))
    assert not stray, f"build products in the sdist: {stray}"


# What a command line names: a path (possibly a glob, as in $(wildcard csrc/*.h)), a bare
# file name, or a module run with `python -m`.
PATH_TOKEN = re.compile(r"[\w.\-]+(?:/[\w.*?\-]+)+|\b[\w\-]+\.(?:py|txt|toml|in|md|sh)\b"
                        r"|\bMakefile\b")
MODULE_TOKEN = re.compile(r"\s-m\s+([A-Za-z_][\w.]*)")


def named_files(text, files):
    """The files of the checkout that ``text`` names: paths, globs (every file they match)
    and ``-m`` modules (their .py, or a package's __main__.py). Names that are no file of
    the checkout (outputs, the venv, other tools' modules) are left out."""
    files = set(files)
    found = set()
    for token in PATH_TOKEN.findall(text):
        token = token.rstrip(".")
        if any(c in token for c in "*?"):
            found |= {f for f in files if fnmatch.fnmatchcase(f, token)}
        elif token in files:
            found.add(token)
    for module in MODULE_TOKEN.findall(text):
        base = module.rstrip(".").replace(".", "/")
        found |= {f for f in (base + ".py", base + "/__main__.py") if f in files}
    return found


def test_sdist_holds_what_the_makefile_and_the_readme_run(dists, files):
    """`make cuda-build-check`, `make gpu-check`, `make demo`, `.ci/run`... work from an
    unpacked sdist: every file of the checkout that the Makefile or the README names is in
    it (scripts/ and .ci/run were not), and .ci/run stays executable."""
    sdist, _ = dists
    with tarfile.open(sdist) as tar:
        members = {m.name.split("/", 1)[1]: m for m in tar.getmembers() if "/" in m.name}
    with open(os.path.join(ROOT, "Makefile")) as f:
        makefile = named_files(f.read(), files)
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = named_files(f.read(), files)
    # the parse finds what the targets run (so this test cannot pass by finding nothing)
    assert {"scripts/cuda_build_check.py", "benchmarks/gpu_check.py", "benchmarks/run_all.py",
            "requirements-dev.txt", "setup.py", "pyproject.toml", "csrc/ops.cpp",
            "csrc/cuda/vote.cu", "dssn_kernels/workflow/demo.py",
            "dssn_kernels/workflow/compare_demo.py"} <= makefile, sorted(makefile)
    assert {".ci/run", "scripts/check_cuda_binding.py"} <= readme, sorted(readme)
    missing = sorted((makefile | readme) - set(members))
    assert not missing, f"named by the Makefile or README.md but missing from the sdist: {missing}"
    assert members[".ci/run"].mode & 0o111, ".ci/run lost its executable bit in the sdist"


def test_wheel_holds_every_module_and_no_build_products(dists, files):
    _, wheel = dists
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        metadata = email.message_from_bytes(z.read(f"{NAME}.dist-info/METADATA"))
        entry_points = z.read(f"{NAME}.dist-info/entry_points.txt").decode()
    modules = {f for f in files if f.startswith("dssn_kernels/") and f.endswith(".py")}
    modules |= {f.replace("python/", "", 1) for f in files
                if f.startswith("python/dssn_reference/") and f.endswith(".py")}
    assert "dssn_kernels/workflow/cli.py" in modules
    missing = sorted(modules - names)
    assert not missing, f"missing from the wheel (pyproject's packages list?): {missing}"
    (ext,) = [n for n in names if n.endswith(".so")]
    assert re.fullmatch(r"dssn_kernels/_C\.cpython-.*\.so", ext)
    extra = sorted(n for n in names - modules - {ext} if not n.startswith(f"{NAME}.dist-info/"))
    assert not extra, f"unexpected files in the wheel: {extra}"
    assert f"{NAME}.dist-info/licenses/LICENSE" in names
    assert metadata["License-Expression"] == "MIT"
    assert "dssn = dssn_kernels.workflow.cli:main" in entry_points


def install_and_check(dist, site_links, tmp_path):
    """Installs ``dist`` into a fresh venv and checks it from a folder outside the tree."""
    python = fresh_venv(tmp_path / "venv", site_links)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    pip_install(python, dist, outside)
    check_installed(python, outside)


def test_wheel_installs_and_certifies(dists, site_links, tmp_path):
    install_and_check(dists[1], site_links, tmp_path)


def test_sdist_installs_and_certifies(dists, site_links, tmp_path):
    install_and_check(dists[0], site_links, tmp_path)


def test_build_without_torch_says_how_to_fix(monkeypatch):
    """pip's default build isolation hides the installed torch: one line saying what to do."""
    import runpy
    monkeypatch.setitem(sys.modules, "torch", None)     # import torch -> ModuleNotFoundError
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="__main__")
    message = str(exit_.value.code)
    assert "\n" not in message
    assert "pip install torch==2.13.0" in message
    assert "pip install --no-build-isolation ." in message
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    for line in ("pip install torch==2.13.0", "pip install --no-build-isolation ."):
        assert re.search(r"^    " + re.escape(line) + r"( |$)", readme, re.MULTILINE), line


def test_dev_requirements_are_pinned():
    with open(os.path.join(ROOT, "requirements-dev.txt")) as f:
        reqs = [line.split("#")[0].strip() for line in f]
    reqs = [r for r in reqs if r]
    assert "torch==2.13.0" in reqs
    loose = [r for r in reqs if not re.fullmatch(r"[A-Za-z0-9_.\-]+==[0-9][A-Za-z0-9.+]*", r)]
    assert not loose, f"unpinned: {loose}"
    names = {r.split("==")[0].lower().replace("_", "-") for r in reqs}
    assert {"triton", "build", "setuptools", "numpy", "scipy", "tqdm"} <= names
