"""What can be checked of the CUDA build without a GPU (run by scripts/cuda_build_check.py,
with the python of a CUDA build of torch, on a dssn_kernels built with its CUDA kernels).

    python scripts/check_cuda_binding.py --build-dir DIR --arch 7.5

Asserts:
* torch is a CUDA build and ``dssn_kernels`` (with its native extension) imports from DIR;
* every op that csrc/ops.cpp declares is registered, and has a CPU and a CUDA kernel;
  the package's own view agrees (``backends.native_has_cuda_kernels()``, ``auto`` on a
  CUDA device resolves to ``cuda``);
* the extension embeds, for each csrc/cuda/*.cu file, device code (SASS) for exactly the
  requested architectures (read from the .nv.fatbin containers of the .so);
* argument checks: every bad call of a table (wrong dtype, wrong shape, non-contiguous,
  out-of-range integers, mismatched shapes, bad margin) is refused by the CUDA kernel, on
  tensors that claim a CUDA device, with the very message the CPU kernel gives for the
  same call on CPU tensors;
* device checks: the CUDA kernel refuses CPU tensors, meta tensors, a mix of CUDA and CPU
  tensors and a mix of cuda:0 and cuda:1, with a message naming the op and the devices;
* a valid call on tensors that claim cuda:0 passes every check and fails only where the
  CUDA runtime is first needed (no device here), so no check rejects a good call;
* the CPU kernels of this CUDA build certify a small model with the same counts as the
  plain-torch backend.

How a GPU-less machine reaches the CUDA kernel: the kernel registered for the CUDA dispatch
key is called directly, ``torch.ops.dssn.<op>.default.redispatch(DispatchKeySet(CUDA),
...)``, skipping device dispatch. Its tensors are either real CPU / meta tensors, or
placeholders: meta tensors (shape, strides and dtype, no data) wrapped in a tensor
subclass that reports a CUDA device (``Tensor._make_subclass(..., dispatch_device=True,
device_for_backend_keys=cuda:N)``, the mechanism of torch's FakeTensor); the binding's
checks read only shapes, strides, dtypes and devices, so they run as they would on real
CUDA tensors. Any other use of a placeholder (data, a torch op) fails loudly.

Not reachable without a GPU: everything after the checks (the CUDA device guard, the
current stream, ``logits.contiguous()``, the kernel launches and their results, launch
configuration limits, streams), which tests/test_gpu_kernels.py and ``make gpu-check``
cover on a GPU.
"""
from __future__ import annotations

import argparse
import os
import re
import struct
import sys
import time

import torch

OPS_SOURCE = "csrc/ops.cpp"
CUDA_KEYSET = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)


class Checks:
    """Counts checks; each failure is recorded with its message, the run goes on."""

    def __init__(self):
        self.passed = 0
        self.failed: list[str] = []

    def check(self, ok: bool, what: str, detail: str = "") -> bool:
        if ok:
            self.passed += 1
        else:
            detail = detail if len(detail) <= 300 else detail[:300] + "..."
            self.failed.append(f"{what}: {detail}" if detail else what)
            print(f"FAIL {what}" + (f": {detail}" if detail else ""), flush=True)
        return ok


# ---------------------------------------------------------------------------------------
# Tensors that claim a CUDA device without one.

class PlaceholderCUDA(torch.Tensor):
    """A meta tensor that reports a CUDA device; it answers ``.device`` and nothing else."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func is torch.ops.prim.device.default:
            return args[0].claimed_device
        raise AssertionError(f"{func} ran on a placeholder CUDA tensor (only the binding's "
                             "checks may touch it)")


def placeholder(t: torch.Tensor, device="cuda:0") -> torch.Tensor:
    """``t``'s shape, strides and dtype on the meta device, claiming ``device``."""
    meta = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
    device = torch.device(device)
    out = torch.Tensor._make_subclass(PlaceholderCUDA, meta, False, dispatch_device=True,
                                      device_for_backend_keys=device)
    out.claimed_device = device
    return out


def on_meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


def to_device(args, where):
    """args with every tensor moved: where(index_of_tensor, tensor) -> tensor."""
    out, n = [], 0
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(where(n, a))
            n += 1
        else:
            out.append(a)
    return out


def call(fn, args):
    """(None, None) if fn(*args) returns, else (exception type, message)."""
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001 (every error is compared)
        return type(exc), str(exc)
    return None, None


def first_line(msg):
    return (msg or "").splitlines()[0] if msg else repr(msg)


# ---------------------------------------------------------------------------------------
# The call table: a valid call of each op and bad variants of it.

def i64(*shape):
    return torch.zeros(shape, dtype=torch.int64)


def valid_calls():
    """op name -> valid CPU arguments (shapes only matter; values are never read by the
    checks, and the CPU kernel runs on them)."""
    B, C, d, L, q = 2, 3, 5, 8, 255
    logits = torch.randn(B * L, 4)
    return {
        "expand_": (torch.empty(B, C, d), torch.zeros(B, d, dtype=torch.uint8),
                    torch.zeros(d, dtype=torch.int32), L, q, 0),
        "vote_": (i64(B, 4), i64(1), logits, 0, L),
        "vote_margin_": (i64(B, 4), i64(B, 4), i64(1), logits, 0, L, 0.5),
    }


def replace(args, index, value):
    args = list(args)
    args[index] = value
    return tuple(args)


def bad_calls(valid):
    """(op, case name, arguments) the argument checks must refuse (on any device)."""
    e = valid["expand_"]
    out, lv, off = e[0], e[1], e[2]
    cases = [
        ("expand_", "out float64", replace(e, 0, out.double())),
        ("expand_", "out int32", replace(e, 0, out.int())),
        ("expand_", "out 2-D", replace(e, 0, out[:, 0])),
        ("expand_", "out non-contiguous", replace(e, 0, out.transpose(0, 1))),
        ("expand_", "levels float32", replace(e, 1, lv.float())),
        ("expand_", "levels int64", replace(e, 1, lv.long())),
        ("expand_", "levels 1-D", replace(e, 1, lv[0])),
        ("expand_", "levels non-contiguous", replace(e, 1, torch.zeros(5, 2, dtype=torch.uint8).t())),
        ("expand_", "offsets int64", replace(e, 2, off.long())),
        ("expand_", "offsets 2-D", replace(e, 2, off[None])),
        ("expand_", "offsets too short", replace(e, 2, off[:-1])),
        ("expand_", "out batch != levels batch", replace(e, 0, out[:1])),
        ("expand_", "out d != levels d", replace(e, 0, out[:, :, :-1].contiguous())),
        ("expand_", "L = 0", replace(e, 3, 0)),
        ("expand_", "q = 0", replace(e, 4, 0)),
        ("expand_", "q + L > 2^21", replace(replace(e, 3, (1 << 20) + 1), 4, 1 << 20)),
        ("expand_", "start < 0", replace(e, 5, -1)),
        ("expand_", "window past L", replace(e, 5, 6)),
        ("expand_", "float16 out, q = 2000", replace(replace(e, 0, out.half()), 4, 2000)),
        ("expand_", "bfloat16 out, q = 9000",
         replace(replace(e, 0, out.bfloat16()), 4, 9000)),
    ]
    for op in ("vote_", "vote_margin_"):
        v = valid[op]
        m = op == "vote_margin_"
        counts, logits = v[0], v[3 if m else 2]
        li = 3 if m else 2          # index of logits
        ni = 2 if m else 1          # index of nan_rows
        r0, rpi = li + 1, li + 2    # row0, rows_per_image
        cases += [
            (op, "counts int32", replace(v, 0, counts.int())),
            (op, "counts 1-D", replace(v, 0, counts[0])),
            (op, "counts non-contiguous", replace(v, 0, i64(4, 2).t())),
            (op, "nan_rows int32", replace(v, ni, torch.zeros(1, dtype=torch.int32))),
            (op, "nan_rows two elements", replace(v, ni, i64(2))),
            (op, "logits int64", replace(v, li, logits.long())),
            (op, "logits 1-D", replace(v, li, logits[0])),
            (op, "logits K != counts K", replace(v, li, logits[:, :3].contiguous())),
            (op, "rows_per_image = 0", replace(v, rpi, 0)),
            (op, "row0 < 0", replace(v, r0, -1)),
            (op, "rows past the last image", replace(v, r0, 9)),
            (op, "no classes (K = 0)",
             replace(replace(v, 0, i64(2, 0)), li, torch.zeros(16, 0))
             if not m else
             replace(replace(replace(v, 0, i64(2, 0)), 1, i64(2, 0)), li, torch.zeros(16, 0))),
        ]
        if m:
            cases += [
                (op, "ambiguous int32", replace(v, 1, v[1].int())),
                (op, "ambiguous shape != counts", replace(v, 1, i64(2, 3))),
                (op, "ambiguous non-contiguous", replace(v, 1, i64(4, 2).t())),
                (op, "margin < 0", replace(v, 6, -0.5)),
                (op, "margin NaN", replace(v, 6, float("nan"))),
                (op, "margin inf", replace(v, 6, float("inf"))),
                (op, "one class (K = 1)",
                 replace(replace(replace(v, 0, i64(2, 1)), 1, i64(2, 1)), li,
                         torch.zeros(16, 1))),
            ]
    return cases


# ---------------------------------------------------------------------------------------

def declared_ops(root):
    """Names of the ops csrc/ops.cpp declares with m.def("name(...")."""
    with open(os.path.join(root, OPS_SOURCE), encoding="utf-8") as f:
        return sorted(set(re.findall(r'm\.def\(\s*"(\w+)\(', f.read())))


def fatbin_entries(path):
    """[(kind, sm)] per .nv.fatbin container in the shared object ``path``: kind 'sass'
    (an ELF cubin) or 'ptx', sm the architecture number (75 for sm_75)."""
    with open(path, "rb") as f:
        data = f.read()
    magic = struct.pack("<I", 0xBA55ED50)
    containers, i = [], data.find(magic)
    while i != -1:
        _, version, header, size = struct.unpack_from("<IHHQ", data, i)
        if version == 1 and header == 16:
            entries, p, end = [], i + header, i + header + size
            while p + 32 <= end:
                kind, _, entry_header, entry_size = struct.unpack_from("<HHIQ", data, p)
                arch = struct.unpack_from("<I", data, p + 28)[0]
                entries.append(({1: "ptx", 2: "sass"}.get(kind, f"kind{kind}"), arch))
                if entry_header == 0:
                    break
                p += entry_header + entry_size
            containers.append(entries)
            i = data.find(magic, i + 16 + size)
        else:
            i = data.find(magic, i + 1)
    return containers


def check_registration(c: Checks, root: str):
    import dssn_kernels as dk
    from dssn_kernels import backends

    ops = declared_ops(root)
    c.check({"expand_", "vote_", "vote_margin_"} <= set(ops), "csrc/ops.cpp declares the ops",
            f"found {ops}")
    registered = sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names()
                        if n.startswith("dssn::"))
    c.check(registered == ops, "registered dssn:: ops == declared ops",
            f"registered {registered}, declared {ops}")
    for op in ops:
        for key in ("CPU", "CUDA"):
            c.check(torch._C._dispatch_has_kernel_for_dispatch_key(f"dssn::{op}", key),
                    f"dssn::{op} has a {key} kernel")
    c.check(backends.native_has_cuda_kernels(), "backends.native_has_cuda_kernels()")
    # auto on CUDA tensors: compiled triton where it runs (sm_80+), else these CUDA kernels
    triton_ok, why = backends._triton_status(torch.device("cuda"))
    if backends._triton_interpreting():
        triton_ok, why = False, "TRITON_INTERPRET=1: the interpreter is never auto's choice"
    want = "triton" if triton_ok else "cuda"
    auto = backends.resolve_backend("auto", torch.device("cuda"))
    c.check(auto == want, f"resolve_backend('auto', cuda) == {want!r} ({why})", f"got {auto!r}")
    c.check("cpp" in dk.available_backends("cpu"), "available_backends('cpu') has cpp")
    return ops


def check_fatbin(c: Checks, so_path: str, root: str, archs: list[int]):
    cu_files = sorted(f for f in os.listdir(os.path.join(root, "csrc", "cuda"))
                      if f.endswith(".cu"))
    containers = fatbin_entries(so_path)
    c.check(len(containers) == len(cu_files),
            "one device-code container per csrc/cuda/*.cu file",
            f"{len(containers)} containers for {cu_files}")
    for n, entries in enumerate(containers):
        sass = sorted({a for k, a in entries if k == "sass"})
        c.check(sass == sorted(archs), f"container {n} holds SASS for sm_{archs}",
                f"entries {entries}")
    return containers


def check_argument_errors(c: Checks, valid):
    cases = bad_calls(valid)
    for op, name, args in cases:
        overload = getattr(torch.ops.dssn, op).default
        cpu_type, cpu_msg = call(overload, args)     # the CPU kernel, CPU tensors
        ok = c.check(cpu_type is RuntimeError and cpu_msg.startswith(f"dssn::{op}:"),
                     f"{op} [{name}] CPU kernel refuses",
                     f"{cpu_type.__name__ if cpu_type else 'no error'}: {first_line(cpu_msg)}")
        cuda_args = to_device(args, lambda i, t: placeholder(t))
        cuda_type, cuda_msg = call(lambda *a: overload.redispatch(CUDA_KEYSET, *a), cuda_args)
        if ok:
            c.check(cuda_type is RuntimeError and cuda_msg == cpu_msg,
                    f"{op} [{name}] CUDA kernel refuses with the CPU message",
                    f"CPU: {first_line(cpu_msg)} | CUDA: "
                    f"{cuda_type.__name__ if cuda_type else 'no error'}: {first_line(cuda_msg)}")
    return len(cases)


def check_device_errors(c: Checks, valid):
    n = 0
    for op, args in valid.items():
        overload = getattr(torch.ops.dssn, op).default
        redispatch = lambda *a, o=overload: o.redispatch(CUDA_KEYSET, *a)  # noqa: E731
        tensors = sum(isinstance(a, torch.Tensor) for a in args)
        layouts = [("all CPU tensors", to_device(args, lambda i, t: t)),
                   ("all meta tensors", to_device(args, lambda i, t: on_meta(t)))]
        for k in range(tensors):
            layouts.append((f"tensor {k} on the CPU, the others on cuda:0",
                            to_device(args, lambda i, t, k=k: t if i == k else placeholder(t))))
            layouts.append((f"tensor {k} on cuda:1, the others on cuda:0",
                            to_device(args, lambda i, t, k=k:
                                      placeholder(t, "cuda:1" if i == k else "cuda:0"))))
        for name, call_args in layouts:
            kind, msg = call(redispatch, call_args)
            c.check(kind is RuntimeError and msg.startswith(f"dssn::{op}:")
                    and "device" in msg,
                    f"{op} [{name}] CUDA kernel refuses with a device error",
                    f"{kind.__name__ if kind else 'no error'}: {first_line(msg)}")
            n += 1
        # On the CPU kernel, CPU tensors pass (the control: the CUDA refusals above are
        # about devices, not arguments).
        kind, msg = call(overload, args)
        c.check(kind is None, f"{op} valid call runs on the CPU kernel", first_line(msg))
        n += 1
    return n


def check_valid_calls_pass(c: Checks, valid):
    """A valid call on cuda:0 placeholders passes every check of the binding and stops at
    the first use of the CUDA runtime (no device, no driver here)."""
    if torch.cuda.device_count() > 0:   # a real device would run the kernel on no data
        print("valid placeholder calls: skipped (a CUDA device is visible; the GPU tests "
              "cover real calls)")
        return 0
    for op, args in valid.items():
        overload = getattr(torch.ops.dssn, op).default
        kind, msg = call(lambda *a: overload.redispatch(CUDA_KEYSET, *a),
                         to_device(args, lambda i, t: placeholder(t)))
        c.check(kind is not None and issubclass(kind, RuntimeError)
                and not (msg or "").startswith("dssn::")
                and "CUDA" in (msg or ""),
                f"{op} valid call on cuda:0 passes the checks and stops at the CUDA runtime",
                f"{kind.__name__ if kind else 'no error'}: {first_line(msg)}")
    return len(valid)


def check_cpu_certify(c: Checks):
    """The CPU kernels of this build certify like the plain-torch backend."""
    import dssn_kernels as dk
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2 * 4 * 4, 3)).eval()
    x = torch.randint(0, 256, (3, 2, 4, 4), dtype=torch.uint8)
    ref = dk.certify(model, x, sigma=0.25, backend="torch", batch_size=64)
    got = dk.certify(model, x, sigma=0.25, backend="cpp", batch_size=64)
    c.check(torch.equal(ref.counts, got.counts) and int(got.counts.sum()) > 0,
            "certify: cpp counts == torch counts on the CPU",
            f"{got.counts.tolist()} vs {ref.counts.tolist()}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build-dir", required=True,
                        help="the tree dssn_kernels was built in (must be what imports)")
    parser.add_argument("--arch", default="7.5",
                        help="TORCH_CUDA_ARCH_LIST the build used (SASS expected for each)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    c = Checks()
    root = os.path.abspath(args.build_dir)
    archs = [int(a.replace(".", "")) for a in re.split(r"[;\s,]+", args.arch.strip()) if a]

    c.check(bool(torch.version.cuda), "torch is a CUDA build", torch.__version__)
    sys.path.insert(0, root)
    import dssn_kernels as dk
    from dssn_kernels.backends import native_extension_error
    c.check(os.path.abspath(dk.__file__).startswith(root + os.sep),
            "dssn_kernels imports from the build dir", dk.__file__)
    err = native_extension_error()
    if not c.check(err is None, "the native extension imports", str(err)):
        return finish(c, t0)
    from dssn_kernels import _C
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"cuda available: {torch.cuda.is_available()}; extension {_C.__file__}")

    sections = [("registration", lambda: check_registration(c, root)),
                 ("device code", lambda: check_fatbin(c, _C.__file__, root, archs)),
                 ("argument checks", lambda: check_argument_errors(c, valid)),
                 ("device checks", lambda: check_device_errors(c, valid)),
                 ("valid calls", lambda: check_valid_calls_pass(c, valid)),
                 ("CPU certify", lambda: check_cpu_certify(c))]
    valid = valid_calls()
    for name, run in sections:
        before = (c.passed, len(c.failed))
        what = run()
        passed, failed = c.passed - before[0], len(c.failed) - before[1]
        print(f"{name}: {passed} passed, {failed} failed"
              + (f" ({describe(name, what)})" if what is not None else ""), flush=True)
    return finish(c, t0)


def describe(name, what):
    if name == "registration":
        return "ops " + ", ".join(f"dssn::{o}" for o in what)
    if name == "device code":
        return "per .cu file: " + "; ".join(
            ", ".join(f"{k} sm_{a}" for k, a in sorted(set(e))) or "none" for e in what)
    if name == "argument checks":
        return f"{what} bad calls: CUDA kernel message == CPU kernel message"
    if name == "device checks":
        return f"{what} calls"
    if name == "valid calls":
        return f"{what} valid calls on cuda:0 placeholders stop at the CUDA runtime"
    return str(what)


def finish(c: Checks, t0):
    print(f"check_cuda_binding: {c.passed} passed, {len(c.failed)} failed "
          f"({time.perf_counter() - t0:.1f} s)")
    return 1 if c.failed else 0


if __name__ == "__main__":
    sys.exit(main())
