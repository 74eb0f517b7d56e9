"""Helpers shared by the test files: tiny deterministic base classifiers, a tiny
checkpoint for the command-line tests, random images, bit views for exactness checks,
the literal vote loop the vote kernels are checked against, and a build-and-run of C++
harnesses.

IntegerLinear reads each noised pixel back as its integer m = 4q * x~ (exact: x~ is the
float32 nearest m/(4q)) and scores classes with integer weights in float64, so every
logit is an exact integer: the argmax does not depend on batch size, chunking or BLAS.
"""
import math
import shutil
import subprocess

import pytest
import torch


class IntegerLinear(torch.nn.Module):
    def __init__(self, dim, num_classes, q, seed=0, bias_scale=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.q = q
        self.register_buffer("weight", torch.randint(-3, 4, (dim, num_classes), generator=g).double())
        self.register_buffer("bias", torch.randint(-bias_scale * q, bias_scale * q + 1,
                                                   (num_classes,), generator=g).double())
        self.calls = []
        self.eval()

    def forward(self, x):
        self.calls.append(x.shape[0])
        m = torch.round(x.reshape(x.shape[0], -1).double() * (4 * self.q))
        return m @ self.weight + self.bias


class Constant(torch.nn.Module):
    """Always votes for class c (K classes), whatever the input."""

    def __init__(self, c, K=3):
        super().__init__()
        self.c, self.K = c, K

    def forward(self, x):
        out = torch.zeros(x.shape[0], self.K)
        out[:, self.c] = 1.0
        return out


def images(B, shape=(3, 4, 4), q=255, seed=0):
    """B random images of levels 0..q (uint8, int32 for q > 255); shape: an int d or a
    tuple."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, q + 1, (B, *shape), generator=g,
                         dtype=torch.uint8 if q <= 255 else torch.int32)


def bits(t):
    """The int32 bit pattern of a float32 tensor, for bit-exact comparisons."""
    return t.contiguous().view(torch.int32)


def literal_votes(counts, nan_rows, logits, row0, rows_per_image):
    """What vote_ must add to (counts, nan_rows), by a literal loop: a row with a NaN is
    counted apart and votes for nobody; otherwise the first index of the largest logit
    wins (ties, -0.0 == +0.0, all -inf: the first) and row r votes for image
    (row0 + r) // rows_per_image."""
    counts, nan_rows = counts.clone(), nan_rows.clone()
    for r, row in enumerate(logits.cpu().double().tolist()):    # exact for every dtype
        if any(math.isnan(v) for v in row):
            nan_rows += 1
            continue
        best = 0
        for c in range(1, len(row)):
            if row[c] > row[best]:
                best = c
        counts[(row0 + r) // rows_per_image, best] += 1
    return counts, nan_rows


def tiny_checkpoint(path, init_seed=0, sigma=0.5):
    """A freshly initialised small CNN on digits (no training needed for format tests)."""
    from dssn_kernels.workflow.checkpoint import SmoothingSpec, build_model, save_checkpoint

    torch.manual_seed(init_seed)
    kwargs = {"num_classes": 10, "in_channels": 1, "image_size": 8, "width": 4, "hidden": 16}
    spec = SmoothingSpec.create(sigma=sigma, q=16, seed=0, input_shape=(1, 8, 8), num_classes=10)
    return save_checkpoint(path, build_model("small_cnn", kwargs), arch="small_cnn",
                           model_kwargs=kwargs, spec=spec,
                           dataset={"name": "digits", "split": "train"})


def rows_without_time(path):
    """The lines of a results TSV with the time column (the 6th) dropped from each row."""
    lines = path.read_text().splitlines()
    return lines[:2] + ["\t".join(c[:5] + c[6:]) for c in (ln.split("\t") for ln in lines[2:])]


def build_and_run(tmp_path, source, flags, timeout):
    """Compiles the C++ program ``source`` with the host compiler (g++, c++ or clang++;
    the test is skipped without one) and ``flags``, runs it; asserts that both succeed
    and returns what it printed."""
    cxx = next(filter(None, map(shutil.which, ("g++", "c++", "clang++"))), None)
    if cxx is None:
        pytest.skip("no C++ compiler (g++, c++ or clang++) on PATH")
    src, exe = tmp_path / "harness.cpp", tmp_path / "harness"
    src.write_text(source)
    cmd = [cxx, *flags, "-o", str(exe), str(src)]
    build = subprocess.run(cmd, capture_output=True, text=True)
    assert build.returncode == 0, f"{' '.join(cmd)}\n{build.stdout}\n{build.stderr}"
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=timeout)
    print(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


def run_cli(argv, capsys):
    """``dssn argv`` in this process: (exit code, stdout, stderr)."""
    from dssn_kernels.workflow import cli

    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def saved(path, key):
    """One field of a saved checkpoint or training state (``state_dict``, ``training``,
    ``epoch``, ...)."""
    return torch.load(path, weights_only=True)[key]


def interrupt_after_epoch(n):
    """An ``_after_epoch`` hook for the trainers that stops the training after epoch n,
    as Ctrl-C would."""
    def hook(epoch):
        if epoch == n:
            raise KeyboardInterrupt
    return hook


def interrupted_on_call(func, n):
    """``func``, but its n-th call raises KeyboardInterrupt (as Ctrl-C would) instead."""
    calls = {"n": 0}

    def wrapper(*a, **kw):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return func(*a, **kw)
    return wrapper


def assert_refused(code, err, *patterns):
    """A refusal of the command line: exit code 2 and one line on stderr, no traceback,
    naming every one of ``patterns``."""
    assert code == 2, (code, err)
    msg = err.strip()
    assert "\n" not in msg and "Traceback" not in msg, msg
    for p in patterns:
        assert p in msg, (p, msg)
