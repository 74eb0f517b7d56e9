"""setup.py's build gating: the CUDA kernels are built exactly when torch is a CUDA build
and a CUDA toolkit is found (torch.version.cuda and CUDA_HOME), never by asking for a
visible GPU, and TORCH_CUDA_ARCH_LIST is honoured (default 7.5;8.0;8.6;8.9;9.0).

setup.py is executed as pip's build backend runs it (as __main__), with setuptools.setup
replaced by a recorder, so nothing is compiled."""
import os
import runpy

import pytest
import setuptools
import torch
import torch.utils.cpp_extension as cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_ARCHS = "7.5;8.0;8.6;8.9;9.0"


def run_setup(monkeypatch, *, cuda_version, cuda_home, arch_list=None, no_cuda=None):
    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
    monkeypatch.setattr(torch.version, "cuda", cuda_version)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", cuda_home)

    def no_gpu_query(*args, **kwargs):
        raise AssertionError("setup.py must not gate the build on a visible GPU")

    monkeypatch.setattr(torch.cuda, "is_available", no_gpu_query)
    monkeypatch.setattr(torch.cuda, "device_count", no_gpu_query)
    for name, value in (("TORCH_CUDA_ARCH_LIST", arch_list), ("DSSN_NO_CUDA", no_cuda)):
        monkeypatch.setenv(name, "placeholder")   # restored (or removed) after the test,
        if value is None:                          # whatever setup.py writes meanwhile
            monkeypatch.delenv(name)
        else:
            monkeypatch.setenv(name, value)
    monkeypatch.chdir(ROOT)
    runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="__main__")
    (ext,) = captured["ext_modules"]
    return ext


def cuda_sources(ext):
    return [s for s in ext.sources if s.startswith(os.path.join("csrc", "cuda"))]


@pytest.mark.parametrize("cuda_version,cuda_home", [(None, None), (None, "/usr/local/cuda"),
                                                    ("12.8", None)])
def test_cpu_only_without_cuda_torch_and_toolkit(monkeypatch, cuda_version, cuda_home):
    ext = run_setup(monkeypatch, cuda_version=cuda_version, cuda_home=cuda_home)
    assert ext.name == "dssn_kernels._C"
    assert cuda_sources(ext) == []
    assert os.path.join("csrc", "ops.cpp") in ext.sources
    assert any(s.startswith(os.path.join("csrc", "cpu")) for s in ext.sources)
    flags = ext.extra_compile_args
    cxx = flags["cxx"] if isinstance(flags, dict) else flags
    assert "-ffp-contract=off" in cxx and "-DDSSN_WITH_CUDA" not in cxx


def test_cuda_kernels_with_cuda_torch_and_toolkit_and_no_gpu(monkeypatch):
    ext = run_setup(monkeypatch, cuda_version="12.8", cuda_home="/usr/local/cuda")
    expected = sorted(os.listdir(os.path.join(ROOT, "csrc", "cuda")))
    built = sorted(os.path.basename(s) for s in cuda_sources(ext))
    assert built == [f for f in expected if f.endswith((".cu", ".cpp"))]
    assert any(s.endswith(".cu") for s in built) and "binding.cpp" in built
    assert "-DDSSN_WITH_CUDA" in ext.extra_compile_args["cxx"]
    assert "--fmad=false" in ext.extra_compile_args["nvcc"]   # no fma contraction
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == DEFAULT_ARCHS


def test_torch_cuda_arch_list_is_honoured(monkeypatch):
    run_setup(monkeypatch, cuda_version="12.8", cuda_home="/usr/local/cuda", arch_list="7.5")
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "7.5"


def test_dssn_no_cuda_opts_out(monkeypatch):
    ext = run_setup(monkeypatch, cuda_version="12.8", cuda_home="/usr/local/cuda", no_cuda="1")
    assert cuda_sources(ext) == []
