"""Compile checks of the CUDA kernels (csrc/cuda), which no development machine can run.

The .cu files and launchers.h include no torch header, so bare nvcc builds them anywhere:
every .cu is compiled for sm_75 (Turing, the paper's RTX 2080 Ti) and sm_80 with
warnings as errors, plus once with the flags a torch CUDAExtension build adds (C++20,
the __CUDA_NO_HALF* defines), all in parallel. Skipped, with the reason, only where no
nvcc is found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin).

binding.cpp is built only with a CUDA build of torch, but it includes only the light
c10/cuda headers, which CPU wheels ship too: it is syntax-checked with the host compiler
(-fsyntax-only, C++20 as torch builds) against the installed torch and the CUDA headers.
The launcher templates it calls (launchers.h) are linked against the .cu objects' explicit
instantiations from a host-compiled program that calls every one of them (on empty work).
"""
import concurrent.futures
import glob
import os
import re
import shutil
import subprocess
import sysconfig
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
CU_FILES = sorted(glob.glob(os.path.join(CUDA_DIR, "*.cu")))

WARNINGS = ["-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra,-Werror", "-Xptxas",
            "-Werror"]
CONFIGS = {
    "sm_75": ["-std=c++17", "-arch=sm_75"],
    "sm_80": ["-std=c++17", "-arch=sm_80"],
    # what torch.utils.cpp_extension (torch 2.13) adds for a CUDAExtension, newest default arch
    "torch-flags-sm_90": ["-std=c++20", "-gencode", "arch=compute_90,code=sm_90",
                          "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                          "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
                          "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr",
                          "-Xcompiler", "-fPIC"],
}
# Includes launchers.h and calls every instantiation the binding can ask for (the type
# lists of launchers.h) on empty work, which returns cudaSuccess without touching a GPU.
# Linked with the .cu objects of each of LINK_CONFIGS (plain nvcc, and torch's flags): an
# instantiation missing from a .cu file is an undefined symbol.
LINK_CONFIGS = ("sm_80", "torch-flags-sm_90")
LAUNCHERS_HOST_CPP = r"""
#include "launchers.h"

#include <stdio.h>

template <typename Out, typename... Levels>
int expand_all_levels(dssn::TypeList<Levels...>) {
  int bad = 0;
  ((bad += dssn::launch_expand<Out, Levels>(nullptr, nullptr, nullptr, 0, 1, 1, 1, 1, 0,
                                            nullptr) != cudaSuccess), ...);
  return bad;
}

template <typename... Outs>
int expand_all(dssn::TypeList<Outs...>) {
  return (0 + ... + expand_all_levels<Outs>(dssn::ExpandLevelTypes{}));
}

template <typename... Logits>
int vote_all(dssn::TypeList<Logits...>) {
  int bad = 0;
  ((bad += dssn::launch_vote<Logits>(nullptr, nullptr, nullptr, 0, 2, 0, 1, nullptr) !=
           cudaSuccess), ...);
  ((bad += dssn::launch_vote_margin<Logits>(nullptr, nullptr, nullptr, nullptr, 0, 2, 0, 1,
                                            0.5, nullptr) != cudaSuccess), ...);
  return bad;
}

int main() {
  const int bad = expand_all(dssn::ExpandOutputTypes{}) + vote_all(dssn::LogitTypes{});
  printf("%d launcher calls on empty work failed\n", bad);
  return bad != 0;
}
"""
ALLOWED_INCLUDES = {"cuda_runtime.h", "cuda_fp16.h", "cuda_bf16.h", "stdint.h",
                    "../dssn_noise.h", "launchers.h"}


def find_nvcc():
    candidates = [shutil.which("nvcc")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "nvcc"))
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def _cuda_include(nvcc):
    homes = [os.path.dirname(os.path.dirname(p)) for p in (nvcc, os.path.realpath(nvcc))]
    homes += [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    for home in homes:
        if home and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
            return os.path.join(home, "include")
    return None


def _run(cmd):
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - t0


def _binding_command(cuda_include):
    try:
        from torch.utils.cpp_extension import include_paths
    except ImportError:
        return None, "torch is not importable"
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        return None, "no host C++ compiler"
    torch_inc = include_paths()
    if not any(os.path.isfile(os.path.join(p, "c10", "cuda", "CUDAStream.h")) for p in torch_inc):
        return None, "the installed torch ships no c10/cuda headers"
    flags = []
    if not any(os.path.isfile(os.path.join(p, "c10", "cuda", "impl", "cuda_cmake_macros.h"))
               for p in torch_inc):
        # CPU wheels lack this generated file (it only sets C10_CUDA_BUILD_SHARED_LIBS)
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    for p in torch_inc + [cuda_include, sysconfig.get_paths()["include"]]:
        flags += ["-isystem", p]
    cmd = [cxx, "-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", *flags,
           os.path.join(CUDA_DIR, "binding.cpp")]
    return cmd, None


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Compiles everything once, in parallel; returns {name: (cmd, rc, log, seconds)}."""
    nvcc = find_nvcc()
    if nvcc is None:
        reason = ("nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin): "
                  "CUDA compile checks not run")
        print(reason)
        pytest.skip(reason)
    tmp = str(tmp_path_factory.mktemp("nvcc"))
    jobs = {}
    for cu in CU_FILES:
        stem = os.path.splitext(os.path.basename(cu))[0]
        for config, flags in CONFIGS.items():
            out = os.path.join(tmp, f"{stem}.{config}.o")
            jobs[(stem, config)] = [nvcc, "-c", "-O3", "--fmad=false", *flags, *WARNINGS,
                                    "-o", out, cu]
    cuda_include = _cuda_include(nvcc)
    cxx = shutil.which("g++") or shutil.which("c++")
    host_obj = os.path.join(tmp, "launchers_host.o")
    if cuda_include and cxx:
        # launchers.h must be usable from host-only C++ (binding.cpp is not nvcc-compiled)
        src = os.path.join(tmp, "launchers_host.cpp")
        with open(src, "w") as f:
            f.write(LAUNCHERS_HOST_CPP)
        jobs[("launchers.h", "host-c++")] = [cxx, "-std=c++17", "-c", "-Wall", "-Wextra",
                                             "-Werror", "-I", CUDA_DIR, "-isystem",
                                             cuda_include, "-o", host_obj, src]
        cmd, _ = _binding_command(cuda_include)
        if cmd:
            jobs[("binding.cpp", "host-c++")] = cmd
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as ex:
        # the slowest (the torch-header syntax check) first
        order = sorted(jobs, key=lambda key: key[0] != "binding.cpp")
        futures = {key: ex.submit(_run, jobs[key]) for key in order}
        results = {key: (jobs[key], *fut.result()) for key, fut in futures.items()}
    print(f"\n{len(jobs)} compiles in {time.perf_counter() - t0:.1f} s wall "
          f"({nvcc}):")
    for config in LINK_CONFIGS:
        link_inputs = [host_obj] + [
            os.path.join(tmp, f"{os.path.splitext(os.path.basename(cu))[0]}.{config}.o")
            for cu in CU_FILES]
        if not all(os.path.isfile(p) for p in link_inputs):
            continue
        # the binding's template calls resolve against the .cu files' explicit
        # instantiations; the program calls every launcher on empty work (no GPU needed)
        prog = os.path.join(tmp, f"launchers_link.{config}")
        cmd = [nvcc, *link_inputs, "-o", prog]
        rc, log, secs = _run(cmd)
        if rc == 0:
            rc, run_log, run_secs = _run([prog])
            log, secs = log + run_log, secs + run_secs
        results[("launchers", f"link-{config}")] = (cmd, rc, log, secs)
    for key, (_, rc, _, secs) in results.items():
        print(f"  {key[0]:>12} {key[1]:<18} rc={rc} {secs:.1f} s")
    return results


def _assert_ok(result):
    cmd, rc, log, _ = result
    assert rc == 0, f"command failed ({rc}):\n{' '.join(cmd)}\n{log}"


def test_cuda_sources_exist():
    names = {os.path.basename(p) for p in CU_FILES}
    assert {"expand.cu", "vote.cu"} <= names
    assert os.path.isfile(os.path.join(CUDA_DIR, "launchers.h"))
    assert os.path.isfile(os.path.join(CUDA_DIR, "binding.cpp"))


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("cu", [os.path.basename(p) for p in CU_FILES])
def test_nvcc_compiles(builds, cu, config):
    _assert_ok(builds[(os.path.splitext(cu)[0], config)])


def test_launchers_header_is_host_cxx(builds):
    if ("launchers.h", "host-c++") not in builds:
        pytest.skip("no host C++ compiler or CUDA include directory")
    _assert_ok(builds[("launchers.h", "host-c++")])


@pytest.mark.parametrize("config", LINK_CONFIGS)
def test_launchers_link(builds, config):
    """Every (type-list) instantiation the binding calls is defined by the .cu files."""
    key = ("launchers", f"link-{config}")
    if key not in builds:
        pytest.skip("no host C++ compiler or CUDA include directory, or a compile failed "
                    "(test_nvcc_compiles / test_launchers_header_is_host_cxx say which)")
    _assert_ok(builds[key])


def test_binding_syntax(builds):
    key = ("binding.cpp", "host-c++")
    if key not in builds:
        nvcc = find_nvcc()
        _, why = _binding_command(_cuda_include(nvcc) or "")
        pytest.skip(f"binding.cpp not checked: {why or 'no CUDA include directory'}")
    _assert_ok(builds[key])


@pytest.mark.parametrize("name", [os.path.basename(p) for p in CU_FILES] + ["launchers.h"])
def test_no_torch_headers(name):
    """The kernels stay compilable by bare nvcc: only CUDA/C headers and the shared math."""
    with open(os.path.join(CUDA_DIR, name)) as f:
        text = f.read()
    includes = re.findall(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', text, flags=re.M)
    assert includes, name
    bad = [i for i in includes if re.match(r"(torch|ATen|c10|caffe2|pybind11)/", i)
           or i in ("Python.h", "torch.h")]
    assert not bad, f"{name} includes torch headers: {bad}"
    assert set(includes) <= ALLOWED_INCLUDES, f"{name}: unexpected {set(includes) - ALLOWED_INCLUDES}"


def test_shared_header_is_self_contained():
    with open(os.path.join(ROOT, "csrc", "dssn_noise.h")) as f:
        includes = re.findall(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', f.read(), flags=re.M)
    assert set(includes) <= {"stdint.h"}, includes
