"""pytest configuration of the micro-benchmarks (``pytest benchmarks/ --benchmark-only``).

Unlike tests/conftest.py this does not set TRITON_INTERPRET: interpreted Triton is no
benchmark. The scripts in this folder (overhead.py, vs_monte_carlo.py, run_all.py) are not
tests and are not collected (only test_*.py files are)."""
import os

import torch

# Same thread count as the timing scripts' default, unless asked otherwise.
if os.environ.get("DSSN_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["DSSN_BENCH_THREADS"]))
