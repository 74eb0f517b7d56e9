# make demo   sets everything up (.venv, CPU torch, the C++ extension) and runs the main
#             job on digits: the DSSN workflow, then the paper's comparison in small (DSSN,
#             independent SSN and uniform noise, standard and stability training, the Table 1
#             layout); about a minute on 2 cores
# make compare-demo   the comparison alone
# make denoise-demo   denoised smoothing of a clean classifier (the paper's Appendix D; minutes)
# make test   sets everything up and runs the test suite
# make cuda-build-check   builds the CUDA extension against a CUDA torch in a second venv
#             (cached in ~/.cache/dssn-kernels; no GPU needed) and checks its registration
#             and argument checks (CI runs it)
# make gpu-stack-check   the GPU machines' stack rehearsed here, no GPU needed: a venv with
#             their torch (2.11.0, a CUDA build; downloads ~4.6 GB once, cached in
#             ~/.cache/dssn-kernels), the extension built for sm_90 with gpu-check's build
#             command, the binding checks, the whole test suite and gpu-check's dry run
#             (8 minutes on 2 cores with the venv made; not run by CI)
# make gpu-check   on a GPU machine, with its own python (no venv, no download): builds for
#             the visible GPU, runs the GPU tests, compute-sanitizer and the GPU benchmarks
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The PATH before the venv's bin is put first: gpu-check runs the machine's own python.
SYSTEM_PATH := $(PATH)
export PATH := $(abspath $(VENV))/bin:$(PATH)
CUDA_ARCH ?= 7.5
CUDA_BUILD_CHECK_ARGS ?=
GPU_PYTHON ?= python3
GPU_CHECK_OUT ?= benchmarks/results/gpu_check
GPU_CHECK_ARGS ?=
GPU_STACK_TORCH ?= 2.11.0
GPU_STACK_ARCH ?= 9.0
GPU_STACK_ARGS ?=

NATIVE := setup.py pyproject.toml $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/* csrc/cuda/*)

.PHONY: setup demo compare-demo denoise-demo test bench clean cuda-build-check gpu-check gpu-stack-check
setup: $(VENV)/.installed

$(VENV)/.installed: requirements-dev.txt $(NATIVE)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $@

demo: setup
	$(PY) -m dssn_kernels.workflow.demo
	$(PY) -m dssn_kernels.workflow.compare_demo

compare-demo: setup
	$(PY) -m dssn_kernels.workflow.compare_demo

denoise-demo: setup
	$(PY) -m dssn_kernels.workflow.denoise_demo

test: setup
	$(PY) -m pytest -q -rs

bench: setup
	$(PY) benchmarks/run_all.py

cuda-build-check:
	PATH="$(SYSTEM_PATH)" $(PYTHON) scripts/cuda_build_check.py --arch $(CUDA_ARCH) $(CUDA_BUILD_CHECK_ARGS)

gpu-stack-check:
	PATH="$(SYSTEM_PATH)" $(PYTHON) scripts/gpu_stack_check.py --torch $(GPU_STACK_TORCH) --arch $(GPU_STACK_ARCH) $(GPU_STACK_ARGS)

gpu-check:
	PATH="$(SYSTEM_PATH)" $(GPU_PYTHON) benchmarks/gpu_check.py --out $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)

clean:
	rm -rf build dssn_kernels/*.so *.egg-info
