"""Shared plumbing of the PTX-compile tests (sm_80 and sm_90) (tests/test_triton_vote.py,
tests/test_vote_margin.py; tests/test_triton_expand.py runs its own probe script through
run_compile_process): compiles a Triton kernel of dssn_kernels.triton ahead of time
for sm_80 or sm_90 (no GPU needed: triton ships ptxas), for every logits dtype, in a fresh process
without TRITON_INTERPRET, and reports which PTX instructions of given kinds it holds.
The calling test is skipped where this triton cannot compile ahead of time.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
LOGIT_TYPES = ("*fp32", "*fp16", "*bf16", "*fp64")
INTS = ["R", "K", "stride_r", "stride_k", "row0", "rows_per_image"]
CONSTEXPRS = ["BLOCK_R", "BLOCK_K", "K_BLOCKS", "IS_FP64"]
ATOMICS = r"\b(?:atom|red)\.[\w.]+"


def ptx_report(module, kernel, pointers, patterns, ones_too=False, capability=80):
    """Runs in the probe process. Compiles dssn_kernels.triton.<module>.<kernel> for
    sm_<capability> (80: the A100 and up; 90: the H100/H200)
    (arguments: ``pointers``, name -> type with None for the logits' type, then INTS, i32,
    then CONSTEXPRS) once per logits type (BLOCK_R=4, BLOCK_K=1024, K_BLOCKS=2, 8 warps); reports per
    type the sorted distinct PTX matches of ``patterns`` (a regex: a list; a dict of
    regexes: a dict of lists). With ones_too, also compiles it with every int argument
    equal to 1 (Triton specializes those into constexprs, which the interpreter never
    does)."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(f"dssn_kernels.triton.{module}"), kernel)
    target = GPUTarget("cuda", capability, 32)

    def found(pattern, ptx):
        return sorted(set(re.findall(pattern, ptx)))

    def signature(lt, ints):
        sig = {k: lt if v is None else v for k, v in pointers.items()}
        return sig | {k: ints for k in INTS} | {k: "constexpr" for k in CONSTEXPRS}

    report = {}
    for lt in LOGIT_TYPES:
        src = ASTSource(fn=fn, signature=signature(lt, "i32"),
                        constexprs={"BLOCK_R": 4, "BLOCK_K": 1024, "K_BLOCKS": 2,
                                    "IS_FP64": lt == "*fp64"})
        ptx = triton.compile(src, target=target, options={"num_warps": 8}).asm["ptx"]
        report[lt] = found(patterns, ptx) if isinstance(patterns, str) else \
            {name: found(p, ptx) for name, p in patterns.items()}
    if ones_too:
        consts = {k: 1 for k in INTS} | {"BLOCK_R": 1, "BLOCK_K": 1, "K_BLOCKS": 1,
                                         "IS_FP64": False}
        triton.compile(ASTSource(fn=fn, signature=signature("*fp32", "constexpr"),
                                 constexprs=consts), target=target, options={"num_warps": 1})
    return report


def run_compile_process(code, *argv, force_fp_fusion=False):
    """Runs the Python ``code`` (sys.argv[1:] = argv, this folder on sys.path) in a process
    without TRITON_INTERPRET, from the repository root, with TRITON_DEFAULT_FP_FUSION=1
    (only where unset, unless ``force_fp_fusion``); returns the JSON its last line of
    output holds. The calling test is skipped where this triton cannot compile ahead of
    time."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"this triton cannot compile ahead of time here ({exc})")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if force_fp_fusion:
        env["TRITON_DEFAULT_FP_FUSION"] = "1"
    else:
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    code = f"import sys; sys.path.append({str(HERE)!r})\n" + code
    proc = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True,
                          text=True, timeout=300, cwd=HERE.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_ptx_probe(module, kernel, pointers, patterns, *, ones_too=False,
                  force_fp_fusion=False, capability=80):
    """ptx_report(...) run in a compile process (run_compile_process)."""
    code = ("import json, sys; import triton_ptx; "
            "print(json.dumps(triton_ptx.ptx_report(*json.loads(sys.argv[1]))))")
    spec = json.dumps([module, kernel, pointers, patterns, ones_too, capability])
    return run_compile_process(code, spec, force_fp_fusion=force_fp_fusion)
