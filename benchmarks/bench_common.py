"""Shared pieces of the benchmark scripts: the benchmark models, test images, the
environment record (device, versions, backend, model), timing, markdown and output files.

The scripts put this folder on sys.path themselves, so each runs as
``python benchmarks/<script>.py`` from anywhere.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch
from torch import nn

import dssn_kernels as dk
from dssn_kernels.backends import resolve_backend

Q = 255
SHAPE = (3, 32, 32)
NUM_CLASSES = 10
FIGURE6_SIGMAS = (0.25, 0.5, 1.0, 2.0, 3.5)
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
MODELS = ("small", "tiny", "smallcnn", "wide", "wrn40-2")
# The paper's Figure 6 reference point (CIFAR-10, WRN-40-2, one RTX 2080 Ti, sigma 3.5).
PAPER_SIGMA35_SECONDS = {"dssn": 0.41, "uniform_mc": 13.44}


class TinyCNN(nn.Module):
    """conv 3->w 3x3, ReLU, max-pool, conv w->2w 3x3, ReLU, max-pool, linear -> 10
    (w = 16: the ``small`` benchmark model; w = 64: ``wide``). Normalization is inside
    the model, after the noise."""

    def __init__(self, in_channels=3, num_classes=NUM_CLASSES, image_size=32, width=16):
        super().__init__()
        side = image_size // 4
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * width * side * side, num_classes))

    def forward(self, x):
        return self.net((x - 0.5) / 0.5)


def build_model(name: str, seed: int = 0, device="cpu") -> nn.Module:
    """The benchmark models (random weights, eval mode; timing does not need training):
    ``small``/``tiny`` TinyCNN (w = 16), ``wide`` TinyCNN (w = 64), ``smallcnn``
    dssn_kernels.workflow.models.SmallCNN, ``wrn40-2`` WideResNet-40-2 behind CIFAR-10
    normalization (the paper's CIFAR-10 base classifier)."""
    torch.manual_seed(seed)
    if name in ("small", "tiny"):
        model = TinyCNN(SHAPE[0], NUM_CLASSES, SHAPE[1])
    elif name == "wide":
        model = TinyCNN(SHAPE[0], NUM_CLASSES, SHAPE[1], width=64)
    elif name == "smallcnn":
        from dssn_kernels.workflow.models import SmallCNN
        model = SmallCNN(SHAPE[0], NUM_CLASSES, SHAPE[1])
    elif name == "wrn40-2":
        from dssn_kernels.workflow.models import CIFAR10_MEAN, CIFAR10_STD, normalized, wrn40_2
        model = normalized(wrn40_2(NUM_CLASSES, SHAPE[0]), CIFAR10_MEAN, CIFAR10_STD)
    else:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return model.eval().to(device)


def model_description(model: nn.Module, name: str) -> str:
    params = sum(p.numel() for p in model.parameters())
    if name == "wrn40-2":
        body = "WideResNet-40-2 (CIFAR-10 normalization inside)"
    else:
        def layer(m):
            if isinstance(m, nn.Conv2d):
                kh, kw = m.kernel_size
                return f"Conv2d({m.in_channels}->{m.out_channels}, {kh}x{kw})"
            if isinstance(m, nn.Linear):
                return f"Linear({m.in_features}->{m.out_features})"
            return type(m).__name__
        body = ", ".join(layer(m) for m in model.modules() if not list(m.children()))
    return (f"{name}: {body}; {params} parameters; input {'x'.join(map(str, SHAPE))}, "
            f"{NUM_CLASSES} classes; eval mode")


def make_images(B: int, seed: int = 0, device="cpu") -> torch.Tensor:
    """B random 8-bit images (uint8 levels 0..q)."""
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, Q + 1, (B, *SHAPE), generator=g, dtype=torch.uint8).to(device)


# --- environment ---------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def triton_version():
    try:
        import triton
    except Exception:  # noqa: BLE001 (absent or broken install)
        return None
    return getattr(triton, "__version__", None)


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, check=False, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def arg_parser(doc: str, quick_help: str, out_help: str | None = None):
    """The argument parser of a benchmark script: its description (the first paragraph
    of doc), --quick, --out (default DEFAULT_OUT), --device and --threads; read it with
    parse_args."""
    import argparse
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=out_help)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    return p


def parse_args(parser, argv=None):
    """parser.parse_args(argv) for a parser of arg_parser: exits if --device is a CUDA
    device this torch cannot see, and applies --threads."""
    args = parser.parse_args(argv)
    device = args.device = str(args.device)
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: this torch ({torch.__version__}) sees no CUDA GPU")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return args


def environment(device, model_name, model, backends, **extra) -> dict:
    """What every result records: the device, the versions, the backends, the model
    (model None: a benchmark of the ops alone)."""
    device = torch.device(device)
    return {
        "device": str(device), "device_name": device_name(device),
        "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "triton": triton_version(), "dssn_kernels": dk.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
        "backends": list(backends), "auto_backend": resolve_backend("auto", device),
        "available_backends": dk.available_backends(device),
        "model_name": model_name,
        "model": None if model is None else model_description(model, model_name),
        "num_classes": NUM_CLASSES, "q": Q, "git_commit": git_commit(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


def describe_environment(env: dict) -> str:
    """One line for the head of a markdown report."""
    threads = f", {env['torch_threads']} torch thread(s)" if env["device"] == "cpu" else ""
    triton = f", triton {env['triton']}" if env.get("triton") else ""
    return (f"{env['device_name']} ({env['device']}{threads}), torch {env['torch']}{triton}, "
            f"backend(s) {', '.join(env['backends'])}. "
            + (f"Model {env['model']}." if env.get("model") else "No model (ops alone)."))


# --- timing --------------------------------------------------------------------------

def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device="cpu") -> float:
    """Wall seconds of fn(), with the device synchronized before and after."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


# --- reports -------------------------------------------------------------------------

def md_table(head, rows) -> list[str]:
    """Markdown table lines; every row must have as many cells as the head."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        if len(row) != len(head):
            raise ValueError(f"table row has {len(row)} cells, head has {len(head)}")
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return lines


def write_report(out: Path, stem: str, result: dict, md: str) -> dict:
    """Writes <stem>.json and <stem>.md into out; returns {kind: path}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md"}
    paths["json"].write_text(json.dumps(result, indent=2) + "\n")
    paths["md"].write_text(md)
    return {k: str(v) for k, v in paths.items()}


def publish(out: Path, stem: str, result: dict, md: str, plot=None) -> dict:
    """The end of a benchmark script: plot(result, <out>/<stem>.png) unless plot is None,
    then <stem>.json and <stem>.md (write_report), the PNG's path added to
    result["files"], and md printed; returns result."""
    Path(out).mkdir(parents=True, exist_ok=True)
    png = None if plot is None else plot(result, Path(out) / f"{stem}.png")
    result["files"] = write_report(out, stem, result, md)
    if png:
        result["files"]["png"] = png
    print(md)
    return result


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: Path, env: dict) -> str:
    """Titles fig with the model and the device of env, writes it to path (100 dpi) and
    closes it; returns str(path)."""
    fig.suptitle(f"{env['model_name']} on {env['device_name']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)
    return str(path)
