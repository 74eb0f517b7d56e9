#!/usr/bin/env python
"""Early exit against the full certificate: variants evaluated and time of
``dk.certify_at`` / ``dk.predict`` versus ``dk.certify`` (which always runs all L).

    python benchmarks/early_exit.py [--quick] [--out benchmarks/results] [--device cpu|cuda]
                                    [--repeats N] [--backend auto|torch|cpp|cuda|triton]

Two models:

* ``digits``: the demo's SmallCNN on scikit-learn's 8x8 digits (q = 16), trained here
  under DSSN training noise with ``dssn_kernels.workflow.train`` (deterministic: train
  seed 0; a few seconds), certified on the held-out images;
* ``cifar-shaped``: a SmallCNN on 3x32x32 inputs (q = 255, sigma = 0.25, L = 220) with
  random weights (seed 0), on smooth random images (8x8 random levels upsampled, random
  per-image brightness), plus a small planted preference (+0.05 on the logit of class
  floor(10 * mean brightness)) so that several classes win. Its certified radii spread
  from a few steps to the maximum L/2: a stand-in with CIFAR's shape and cost per
  forward, not a trained classifier.

For each model the full certificate is computed once; the radii are the median of its
certified radii (about half the images certified, ties at the median aside) and the
first quartile and zero. For each radius: ``certify_at`` (the default, which also
settles every prediction; and ``settle_prediction=False``, "is it robust?" only), and
``predict``. Every early-exit answer is checked against the full certificate. Reported:
mean variants evaluated / L (all images, certified ones, the others), the variant saving
L / mean evaluated, and the wall time of the full certificate over that of the early
exit (median over ``--repeats`` interleaved runs). Writes ``early_exit.json`` and
``early_exit.md`` into ``--out`` and prints the markdown.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import torch
from torch import nn

import dssn_kernels as dk
from dssn_kernels import workflow
from dssn_kernels.backends import resolve_backend
from dssn_kernels.workflow.data import digits_levels
from dssn_kernels.workflow.models import SmallCNN

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


class BrightnessBiased(nn.Module):
    """SmallCNN(3x32x32, random weights) plus a planted preference: + ``strength`` on the
    logit of class floor(10 * mean brightness). Bright or dark images are confident
    (their class wins most variants), mid-range ones are contested."""

    def __init__(self, strength: float = 0.05, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = SmallCNN(in_channels=3, num_classes=10, image_size=32, width=16, hidden=64)
        self.strength = strength
        self.eval()

    def forward(self, x):
        logits = self.net(x)
        bucket = (x.mean(dim=(1, 2, 3)) * 10).long().clamp(0, 9)
        return logits + self.strength * nn.functional.one_hot(bucket, 10).to(logits.dtype)


def cifar_images(n: int, seed: int = 0) -> torch.Tensor:
    """Smooth random uint8 images [n, 3, 32, 32]: 8x8 random levels upsampled, scaled by a
    per-image brightness."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=g)
    bright = torch.rand(n, 1, 1, 1, generator=g)
    img = nn.functional.interpolate(low, size=32, mode="bilinear", align_corners=False)
    img = (0.5 * img + bright * 0.75).clamp(0, 1)
    return torch.round(img * 255).to(torch.uint8)


def digits_setup(quick: bool, device: str):
    sigma = 0.5 if quick else 1.0
    epochs = 3 if quick else 15
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        trained = workflow.train(Path(tmp) / "digits.pt", dataset="digits", sigma=sigma,
                                 epochs=epochs, train_seed=0, device="cpu")
        train_s = time.perf_counter() - t0
    model = trained["model"].to(device).eval()
    _, _, xte, yte = digits_levels()
    n = 120 if quick else len(xte)
    info = {"dataset": "sklearn digits (held-out split)", "shape": [1, 8, 8], "q": 16,
            "sigma": sigma, "arch": "SmallCNN (dssn_kernels.workflow.models)",
            "training": f"workflow.train, {epochs} epochs, train_seed 0, {train_s:.1f}s",
            "images": n}
    return model, xte[:n].to(device), yte[:n].to(device), dict(sigma=sigma, q=16), info


def cifar_setup(quick: bool, device: str):
    sigma = 0.25
    n = 12 if quick else 64
    model = BrightnessBiased().to(device)
    x = cifar_images(n).to(device)
    info = {"dataset": "smooth random images (8x8 levels upsampled, random brightness)",
            "shape": [3, 32, 32], "q": 255, "sigma": sigma,
            "arch": "SmallCNN(3x32x32, width 16, hidden 64), random weights (seed 0), "
                    "+0.05 on the logit of class floor(10 * mean brightness)",
            "training": "none (random weights with a planted brightness preference)",
            "images": n}
    return model, x, None, dict(sigma=sigma, q=255), info


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def summarize(evaluated, certified, L, unanimous):
    ev = evaluated.double().cpu()
    row = {"mean_evaluated": float(ev.mean()), "fraction_of_L": float(ev.mean() / L),
           "variant_saving": float(L / ev.mean()) if ev.mean() > 0 else float("inf"),
           "fraction_of_L_unanimous": float(ev[unanimous].mean() / L) if unanimous.any()
           else None}
    if certified is not None:
        c = certified.cpu()
        row["certified_fraction"] = float(c.double().mean())
        row["fraction_of_L_certified"] = float(ev[c].mean() / L) if c.any() else None
        row["fraction_of_L_not_certified"] = float(ev[~c].mean() / L) if (~c).any() else None
    return row


def bench_model(name, model, x, y, spec, info, *, backend, batch_size, repeats, device):
    full, _ = timed(lambda: dk.certify(model, x, backend=backend, batch_size=batch_size,
                                       **spec), device)
    L, q = full.num_variants, full.q
    steps = full.steps.cpu()
    unanimous = (full.counts.max(dim=1).values == L).cpu()   # every variant votes alike
    med = int(steps.double().median().floor())
    quart = int(torch.quantile(steps.double(), 0.25).floor())
    radii = sorted({0, quart, med})
    runs = {"certify (full)": lambda: dk.certify(model, x, backend=backend,
                                                 batch_size=batch_size, **spec)}
    for s in radii:
        r = Fraction(s, q)
        runs[f"certify_at r={s}/{q}"] = (
            lambda r=r: dk.certify_at(model, x, r, backend=backend, batch_size=batch_size,
                                      **spec))
        runs[f"certify_at r={s}/{q} robust-only"] = (
            lambda r=r: dk.certify_at(model, x, r, backend=backend, batch_size=batch_size,
                                      settle_prediction=False, **spec))
    runs["predict"] = lambda: dk.predict(model, x, backend=backend, batch_size=batch_size,
                                         **spec)
    times = {k: [] for k in runs}
    outs = {}
    for _ in range(repeats):          # interleaved, so machine noise hits every run alike
        for k, fn in runs.items():
            outs[k], t = timed(fn, device)
            times[k].append(t)
    t_full = statistics.median(times["certify (full)"])
    rows = []
    for k, out in outs.items():
        if k == "certify (full)":
            rows.append({"run": k, "radius_steps": None, "mean_evaluated": float(L),
                         "fraction_of_L": 1.0, "variant_saving": 1.0,
                         "fraction_of_L_unanimous": 1.0 if unanimous.any() else None,
                         "certified_fraction": None, "seconds": t_full, "speedup": 1.0,
                         "seconds_all": times[k]})
            continue
        if isinstance(out, dk.Decision):
            s = out.steps_required
            want = full.steps >= s
            assert torch.equal(out.certified, want), k
            known = out.prediction >= 0
            assert torch.equal(out.prediction[known], full.prediction[known]), k
            row = summarize(out.evaluated, out.certified, L, unanimous)
            row["radius_steps"] = s
            row["radius"] = s / q
            # the fewest variants any exact rule needs on a unanimous image at this radius
            # (certified once N_A - (L - N_A) - [A > 0] >= 2s; A = 0 taken)
            row["bound_unanimous"] = min(L, -(-(L + 2 * s) // 2)) / L
        else:
            assert torch.equal(out.prediction, full.prediction), k
            row = summarize(out.evaluated, None, L, unanimous)
            row["radius_steps"] = None
            row["bound_unanimous"] = -(-L // 2) / L
        t = statistics.median(times[k])
        row.update({"run": k, "seconds": t, "speedup": t_full / t, "seconds_all": times[k]})
        rows.append(row)
    return {"model": name, "L": L, "q": q, "info": info, "num_images": int(x.shape[0]),
            "median_steps": med, "quartile_steps": quart, "batch_size": batch_size,
            "unanimous_images": int(unanimous.sum()),
            "full_certified_fraction_at_median": float((steps >= med).double().mean()),
            "rows": rows,
            "clean_accuracy": None if y is None else float((full.prediction == y).double().mean())}


def to_markdown(result) -> str:
    env = result["environment"]
    lines = ["# Early exit vs the full certificate", "",
             f"device: {env['device']} ({env['device_name']}); torch {env['torch']}; triton {env.get('triton')}; "
             f"backend {env['backend']}; {env['threads']} threads; batch_size "
             f"{env['batch_size']}; repeats {env['repeats']} (median); command: "
             f"`{env['command']}`", ""]
    for m in result["models"]:
        i = m["info"]
        lines += [f"## {m['model']}: L = {m['L']}, q = {m['q']}, sigma = {i['sigma']}, "
                  f"{m['num_images']} images", "",
                  f"{i['arch']}; {i['training']}; data: {i['dataset']}.", "",
                  f"Full certificate: median radius {m['median_steps']}/{m['q']} "
                  f"({100 * m['full_certified_fraction_at_median']:.0f}% certified there), "
                  f"first quartile {m['quartile_steps']}/{m['q']}."
                  + ("" if m["clean_accuracy"] is None else
                     f" Clean accuracy of the smoothed classifier: "
                     f"{100 * m['clean_accuracy']:.1f}%."), "",
                  f"{m['unanimous_images']} of the images are unanimous (all L variants vote "
                  f"alike); 'bound' is the fewest variants an exact early exit can use on "
                  f"such an image (ceil((L + 2r)/2) / L at radius r steps).", "",
                  "| run | certified | evaluated / L | certified: ev/L | others: ev/L "
                  "| unanimous: ev/L (bound) | variant saving | time (s) | speedup |",
                  "|---|---|---|---|---|---|---|---|---|"]

        def pct(v):
            return "" if v is None else f"{100 * v:.1f}%"
        for r in m["rows"]:
            lines.append(f"| {r['run']} | {pct(r.get('certified_fraction'))} | "
                         f"{100 * r['fraction_of_L']:.1f}% | "
                         f"{pct(r.get('fraction_of_L_certified'))} | "
                         f"{pct(r.get('fraction_of_L_not_certified'))} | "
                         f"{pct(r.get('fraction_of_L_unanimous'))}"
                         f"{'' if r.get('bound_unanimous') is None else ' (' + pct(r['bound_unanimous']) + ')'} | "
                         f"{r['variant_saving']:.2f}x | {r['seconds']:.3f} | "
                         f"{r['speedup']:.2f}x |")
        lines.append("")
    lines += ["Every early-exit answer was checked equal to the full certificate's "
              "(certified = steps >= required steps; prediction).",
              "`robust-only` = `settle_prediction=False` (uncertified images stop as soon as "
              "that is known; their prediction may be -1).", ""]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few seconds: few images, small L")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="auto")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=None, help="default 1 (--quick) or 3")
    p.add_argument("--models", nargs="+", default=["digits", "cifar-shaped"],
                   choices=["digits", "cifar-shaped"])
    args = p.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    device = args.device
    backend = resolve_backend(args.backend, torch.device(device))
    models = []
    for name in args.models:
        setup = digits_setup if name == "digits" else cifar_setup
        model, x, y, spec, info = setup(args.quick, device)
        models.append(bench_model(name, model, x, y, spec, info, backend=backend,
                                  batch_size=args.batch_size, repeats=repeats, device=device))
    dev = torch.device(device)
    env = bc.environment(dev, "digits SmallCNN / CIFAR-shaped SmallCNN", None, [backend],
                         batch_size=args.batch_size, repeats=repeats,
                         command="python benchmarks/early_exit.py " + " ".join(
                             sys.argv[1:] if argv is None else argv))
    env.update(backend=backend, threads=torch.get_num_threads())
    result = {"environment": env,
        "models": models}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "early_exit.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    md = to_markdown(result)
    (args.out / "early_exit.md").write_text(md, encoding="utf-8")
    print(md)
    return result


if __name__ == "__main__":
    main()
