# make demo   sets everything up (.venv, CPU torch, the C++ extension) and runs the demo
# make test   sets everything up and runs the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)

NATIVE := setup.py pyproject.toml $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/* csrc/cuda/*)

.PHONY: setup demo test bench clean
setup: $(VENV)/.installed

$(VENV)/.installed: requirements-dev.txt $(NATIVE)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $@

demo: setup
	$(PY) -m dssn_kernels.workflow.demo

test: setup
	$(PY) -m pytest -q -rs

bench: setup
	$(PY) benchmarks/run_all.py

clean:
	rm -rf build dssn_kernels/*.so *.egg-info
