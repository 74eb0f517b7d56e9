"""Builds dssn_kernels and its native extension.

The CPU kernels (csrc/ops.cpp, csrc/cpu/*.cpp) are always built. The CUDA kernels
(csrc/cuda/*.cu) are added when torch is a CUDA build and a CUDA toolkit is found
(torch.version.cuda and CUDA_HOME), never gated on a visible GPU, so GPU-less build
machines still build them. Install with an existing torch:

    pip install --no-build-isolation -e .
"""
import glob
import os
import sys

import setuptools
from setuptools import setup

# One line saying what to do, instead of a traceback buried in pip's output.
INSTALL_FIX = ("install torch first (CPU: pip install torch==2.13.0) and run "
               "pip install --no-build-isolation .")

if int(setuptools.__version__.split(".")[0]) < 77:   # SPDX `license` in pyproject.toml
    sys.exit(f"dssn-kernels needs setuptools>=77 to build (found {setuptools.__version__}): "
             f"pip install 'setuptools>=77', then pip install --no-build-isolation .")

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ModuleNotFoundError as err:
    if err.name != "torch":
        raise
    # pip's default build isolation hides the installed torch (torch is deliberately not a
    # build requirement: that would download a multi-GB CUDA build).
    sys.exit("no torch in this build environment; dssn-kernels builds against your "
             f"installed torch: {INSTALL_FIX}")

HERE = os.path.dirname(os.path.abspath(__file__))


def _rel(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def native_extension():
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-fast-math"]
    sources = ["csrc/ops.cpp"] + _rel("csrc/cpu/*.cpp")
    cuda_sources = _rel("csrc/cuda/*.cu") + _rel("csrc/cuda/*.cpp")
    with_cuda = bool(torch.version.cuda) and CUDA_HOME is not None and cuda_sources
    if os.environ.get("DSSN_NO_CUDA") == "1":
        with_cuda = False
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "7.5;8.0;8.6;8.9;9.0")
        return CUDAExtension(
            "dssn_kernels._C",
            sources + cuda_sources,
            extra_compile_args={"cxx": cxx + ["-DDSSN_WITH_CUDA"], "nvcc": ["-O3", "--fmad=false"]},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension("dssn_kernels._C", sources, extra_compile_args=cxx,
                        extra_link_args=["-fopenmp"])


setup(
    ext_modules=[native_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
