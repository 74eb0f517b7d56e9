"""Analysis of result files: certified accuracy at chosen radii, the best-over-sigma table
in the layout of the paper's Table 1, and plots (certified accuracy against radius; an
image under DSSN noise next to uniform additive noise, the paper's Figure 3).

An image counts as certified at radius R when the smoothed prediction is correct and its
certified radius is >= R (DSSN certificates include the boundary: see docs/DESIGN.md,
"The certificate").
``correct`` is the result file's column: the prediction (the argmax of the votes) equals
the label, whatever the radius; clean accuracy is its mean. Files certified with a margin
(results.py) have rows with a negative radius (-1/q): the prediction is not certified
even at radius 0, so such a row is certified at no radius, 0 included, though it may
still count as correct (clean accuracy).

Monte Carlo result files (``dssn certify --method ssn|uniform``) and the result folders
of the paper's released code (released.py) are read alike; each file's default label
(its row in the best-over-sigma table) is its method and training: "DSSN",
"Independent SSN", "Uniform (Yang et al.)", with ", stability" for stability-trained
models and "(published)" for a released folder.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..spec import lam_from_sigma, sigma_from_lam
from .results import ResultsError, meta_margin, read_results

METHOD_LABELS = {"dssn": "DSSN", "ssn": "Independent SSN", "uniform": "Uniform (Yang et al.)"}
TABLE1_RADII = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0)   # the paper's Table 1 (q = 255)
RADIUS_TOLERANCE = 1e-9  # radii are steps/q; a typed radius may differ in the last bits


@dataclass
class Result:
    """One result file: its run (spec, data set) and per-image radius and correctness."""
    path: str
    label: str
    spec: dict
    dataset: dict
    idx: np.ndarray
    radius: np.ndarray
    correct: np.ndarray
    time: np.ndarray
    margin: float = 0.0

    @property
    def q(self) -> int | None:
        return self.spec.get("q")

    @property
    def L(self) -> int | None:
        return self.spec.get("L")

    @property
    def sigma(self) -> float | None:
        if "sigma" in self.spec:
            return float(self.spec["sigma"])
        if "lam" in self.spec:
            return sigma_from_lam(float(self.spec["lam"]))
        return None

    @property
    def max_radius(self) -> float | None:
        return None if not self.L or not self.q else (self.L // 2) / self.q

    def __len__(self):
        return len(self.idx)

    def clean_accuracy(self) -> float:
        return float(self.correct.mean()) if len(self) else float("nan")

    def certified(self) -> np.ndarray:
        """Bool per image: certified at radius 0 (radius >= 0; a negative radius marks a
        prediction a margin left uncertified)."""
        return self.radius >= 0

    def certified_accuracy(self, radius: float) -> float:
        """Fraction of images correct with certified radius >= ``radius`` (never those of
        negative radius, whatever ``radius``)."""
        if not len(self):
            return float("nan")
        ok = self.correct & self.certified() & (self.radius >= radius - RADIUS_TOLERANCE)
        return float(ok.mean())

    def curve(self):
        """(radii, certified accuracy): the step function's corners, from radius 0."""
        r = np.unique(np.concatenate([[0.0], self.radius[self.correct & self.certified()]]))
        return r, np.array([self.certified_accuracy(x) for x in r])


def sigma_label(res: Result) -> str:
    s = res.sigma
    return "?" if s is None else f"{s:g}"


def default_label(meta: dict) -> str:
    """A result file's row name: its method, and ", stability" for a model trained so
    (the header's ``training``, written for stability or non-DSSN training)."""
    method = meta.get("method", "dssn") if isinstance(meta, dict) else "dssn"
    training = meta.get("training") if isinstance(meta.get("training"), dict) else {}
    return (METHOD_LABELS.get(method, str(method))
            + (", stability" if training.get("stability") else ""))


def load_result(path, label: str | None = None) -> Result:
    """Reads a result file (checked as in results.py), or a result folder of the paper's
    released code (released.py); ``label`` names its row group in the best-over-sigma
    table (default: default_label)."""
    if Path(path).is_dir():
        from .released import load_released

        return Result(**load_released(path, label))
    rf = read_results(path)
    rows = rf.rows
    return Result(
        path=str(path), label=label or default_label(rf.meta),
        spec=rf.meta.get("spec", {}) if isinstance(rf.meta.get("spec"), dict) else {},
        dataset=rf.meta.get("dataset", {}) if isinstance(rf.meta.get("dataset"), dict) else {},
        idx=np.array([r.idx for r in rows], dtype=np.int64),
        radius=np.array([r.radius for r in rows], dtype=np.float64),
        correct=np.array([bool(r.correct) for r in rows], dtype=bool),
        time=np.array([r.time for r in rows], dtype=np.float64),
        margin=meta_margin(rf.meta))


def parse_result_arg(arg: str) -> tuple[str | None, str]:
    """``LABEL=PATH`` -> (LABEL, PATH); a plain path (or one that exists) -> (None, PATH)."""
    if "=" in arg and not Path(arg).exists():
        label, path = arg.split("=", 1)
        if label:
            if not path:
                raise ResultsError(f"{arg}: no file after {label}= (give LABEL=FILE)")
            return label, path
    if not arg:
        raise ResultsError("an empty file name: give a result file")
    return None, arg


def load_results(args) -> list[Result]:
    """The results of ``[LABEL=]PATH`` arguments (parse_result_arg, load_result)."""
    return [load_result(path, label) for label, path in map(parse_result_arg, map(str, args))]


def _nice_step(x: float) -> float:
    """The largest of 1, 2, 2.5, 5 times a power of ten that is <= x."""
    if x <= 0:
        return 0.25
    exp = math.floor(math.log10(x))
    best = 10.0 ** exp
    for m in (2, 2.5, 5):
        if m * 10.0 ** exp <= x * (1 + 1e-12):
            best = m * 10.0 ** exp
    return best


def default_radii(results) -> list[float]:
    """Table 1's radii (0.5..4.0) when every file is at q = 255, else eight evenly spaced
    "nice" radii (step 1, 2, 2.5 or 5 times a power of ten) up to the largest radius any
    file can certify (floor(L/2)/q)."""
    if results and all(r.q == 255 for r in results):
        return list(TABLE1_RADII)
    top = max((r.max_radius or 0.0) for r in results) if results else 1.0
    step = _nice_step(top / 8)
    return [round(step * i, 10) for i in range(1, 9)]


def _pct(x: float, decimals: int) -> str:
    return "n/a" if x != x else f"{100 * x:.{decimals}f}%"


def _markdown(head, rows, align=None) -> str:
    align = align or ["---"] + ["---:"] * (len(head) - 1)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def accuracy_table(results, radii, decimals: int = 1) -> str:
    """Markdown: one row per file (sigma, L, q, images, clean and certified accuracy)."""
    head = ["file", "σ", "L", "q", "images", "clean"] + [f"ρ={r:g}" for r in radii]
    rows = []
    for res in results:
        rows.append([Path(res.path).name, sigma_label(res), str(res.L), str(res.q), str(len(res)),
                     _pct(res.clean_accuracy(), decimals)]
                    + [_pct(res.certified_accuracy(r), decimals) for r in radii])
    return _markdown(head, rows)


def row_groups(results) -> dict:
    """{row name: [results]}: the files grouped by label, data set (name and split) and q,
    so that no best-over-sigma row mixes data sets or quantizations. A row is named by
    its label, followed by what tells apart the groups of one label (data set, split, q)
    when it has several, e.g. "DSSN (cifar10, q=255)"."""
    keyed: dict = {}
    for res in results:
        key = (res.label, res.dataset.get("name"), res.dataset.get("split"), res.q)
        keyed.setdefault(key, []).append(res)
    named = {}
    for key, members in keyed.items():
        siblings = [k for k in keyed if k[0] == key[0]]
        parts = []
        if len({k[1] for k in siblings}) > 1:
            parts.append(str(key[1]))
        if len({k[2] for k in siblings}) > 1:
            parts.append(f"{key[2]} split")
        if len({k[3] for k in siblings}) > 1:
            parts.append(f"q={key[3]}")
        named[f"{key[0]} ({', '.join(parts)})" if parts else key[0]] = members
    return named


def best_over_sigma(results, radii) -> dict:
    """{row name: {radius: (certified accuracy, clean accuracy, sigma, path)}}: for each
    row group (row_groups: one label, data set and q) and radius, the file with the
    highest certified accuracy (ties: higher clean accuracy, then smaller sigma, then the
    earlier file)."""
    groups = row_groups(results)
    table = {}
    for label, members in groups.items():
        table[label] = {}
        for r in radii:
            best = None
            for order, res in enumerate(members):
                key = (res.certified_accuracy(r), res.clean_accuracy(),
                       -(res.sigma if res.sigma is not None else math.inf), -order)
                if best is None or key > best[0]:
                    best = (key, res)
            res = best[1]
            table[label][float(r)] = (res.certified_accuracy(r), res.clean_accuracy(),
                                      res.sigma, res.path)
    return table


def best_table(results, radii=None, decimals: int = 1) -> str:
    """Markdown in the layout of the paper's Table 1: one row per label, one column per
    radius ρ, each cell "best certified accuracy over σ (clean accuracy @ σ=...)"."""
    radii = default_radii(results) if radii is None else radii
    best = best_over_sigma(results, radii)
    head = [""] + [f"ρ = {r:g}" for r in radii]
    rows = []
    for label, cells in best.items():
        row = [label]
        for r in radii:
            cert, clean, sigma, _ = cells[float(r)]
            s = "?" if sigma is None else f"{sigma:g}"
            row.append(f"{_pct(cert, decimals)} ({_pct(clean, decimals)} @ σ={s})")
        rows.append(row)
    return _markdown(head, rows, ["---"] + [":---:"] * len(radii))


def _check_not_empty(results) -> None:
    if not results:
        raise ResultsError("no result files given")
    empty = [r.path for r in results if len(r) == 0]
    if empty:
        raise ResultsError(f"no certified images in {', '.join(empty)}")


def analyze(paths, radii=None, decimals: int = 1) -> str:
    """The report of ``dssn analyze``: per-file accuracies and the best-over-sigma table."""
    if isinstance(decimals, bool) or not isinstance(decimals, int) or decimals < 0:
        raise ResultsError(f"--decimals must be an integer >= 0, got {decimals!r}")
    results = load_results(paths)
    _check_not_empty(results)
    qs = {r.q for r in results}
    radii = default_radii(results) if radii is None else list(radii)
    parts = []
    if len(qs) > 1:
        parts.append(f"_Note: the files differ in q ({sorted(qs)}): radii are all on the [0, 1] "
                     "scale._\n")
    for r in results:
        if r.margin > 0:
            n = int((~r.certified()).sum())
            parts.append(f"_Note: {Path(r.path).name} was certified with margin τ={r.margin:g}: "
                         f"{n} of {len(r)} predictions are not certified even at radius 0 and "
                         "count at no radius (clean accuracy counts every correct "
                         "prediction)._\n")
    parts.append("Certified accuracy (correct and certified L1 radius ≥ ρ, [0, 1] scale):\n")
    parts.append(accuracy_table(results, radii, decimals))
    parts.append("\nBest certified accuracy over σ (clean accuracy and σ of that classifier), "
                 "as in Table 1 of Levine & Feizi (2021):\n")
    parts.append(best_table(results, radii, decimals))
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------- plots

def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ResultsError("plotting needs matplotlib: pip install 'dssn-kernels[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def check_image_path(out) -> Path:
    """``out`` as a Path once it can be written (options.check_output_path) and names an
    image format matplotlib writes (.png, .pdf, .svg, ...); creates nothing."""
    from .options import WorkflowError, check_output_path

    path = check_output_path(out)
    _pyplot()
    from matplotlib.backend_bases import FigureCanvasBase

    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    fmt = path.suffix[1:].lower()
    if fmt not in formats:
        raise WorkflowError(f"--out {out}: unsupported image format "
                            f"{'.' + fmt if fmt else '(no extension)'}; supported: "
                            f"{', '.join('.' + f for f in formats)}")
    return path


def plot_curves(results, out, title: str | None = None, envelope: bool = True) -> Path:
    """Certified accuracy against L1 radius (PNG, or another format by the suffix of
    ``out``), one line per result file, plus the best-over-sigma envelope (dashed) of
    each row group (row_groups) of several files."""
    plt = _pyplot()
    out = check_image_path(out)
    _check_not_empty(results)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    top = 0.0
    only_dssn = all(res.label == "DSSN" for res in results)   # then the label goes unsaid
    for res in results:
        r, acc = res.curve()
        end = max(res.max_radius or r[-1], r[-1])
        top = max(top, end)
        label = f"{'' if only_dssn else res.label + ', '}σ={sigma_label(res)} (L={res.L})"
        # acc(R) is left-continuous: the value at corner r_i holds on (r_{i-1}, r_i]
        xs, ys = (np.append(r, end), np.append(acc, 0.0)) if end > r[-1] else (r, acc)
        ax.step(xs, ys, where="pre", label=label)
    if envelope and len(results) > 1:
        grid = np.unique(np.concatenate([res.curve()[0] for res in results]))
        for label, group in row_groups(results).items():
            if len(group) > 1:
                env = [max(res.certified_accuracy(x) for res in group) for x in grid]
                ax.step(np.append(grid, top), np.append(env, 0.0), where="pre", color="black",
                        linestyle="--", linewidth=1, label=f"best over σ ({label})")
    ax.set_xlabel("L1 radius ρ ([0, 1] pixel scale)")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_xlim(0, top * 1.02 if top > 0 else 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ds = results[0].dataset.get("name") if results else None
    ax.set_title(title or f"Exact DSSN certificates{' on ' + ds if ds else ''}")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def noise_examples(levels: torch.Tensor, q: int, sigma: float, seed: int = 0,
                   noise_seed: int = 0):
    """(clean, DSSN, uniform) float arrays [n, H, W, C] in [0, 1] for uint8 levels
    [n, C, H, W]: one split-noise variant (offsets of ``seed``, a random variant index per
    image) and x + U(-lambda, lambda), lambda = sigma*sqrt(3), rescaled by
    (v + lambda) / (1 + 2 lambda) into [0, 1] for display, as in the paper's Figure 3."""
    from ..certify import variants
    from ..spec import num_variants

    L = num_variants(sigma, q=q)
    g = torch.Generator().manual_seed(noise_seed)
    t = torch.randint(L, (levels.shape[0],), generator=g)
    dssn = torch.stack([variants(levels[i:i + 1], L=L, q=q, seed=seed, start=int(t[i]),
                                 stop=int(t[i]) + 1)[0, 0] for i in range(levels.shape[0])])
    clean = levels.double() / q
    lam = lam_from_sigma(sigma)
    eps = (torch.rand(clean.shape, generator=g, dtype=torch.float64) * 2 - 1) * lam
    uniform = (clean + eps + lam) / (1 + 2 * lam)
    as_img = lambda x: x.double().permute(0, 2, 3, 1).clamp(0, 1).numpy()  # noqa: E731
    return as_img(clean), as_img(dssn), as_img(uniform)


def plot_noise(levels: torch.Tensor, q: int, sigma: float, out, seed: int = 0,
               noise_seed: int = 0, title: str | None = None) -> Path:
    """PNG like the paper's Figure 3: images (top), under DSSN noise (middle), under
    uniform additive noise of the same sigma, rescaled to [0, 1] (bottom)."""
    plt = _pyplot()
    out = check_image_path(out)
    clean, dssn, uniform = noise_examples(levels, q, sigma, seed, noise_seed)
    n = clean.shape[0]
    fig, axes = plt.subplots(3, n, figsize=(1.8 * n + 1.2, 5.8), dpi=120, squeeze=False)
    names = ("clean", f"DSSN, σ={sigma:g}", f"uniform additive,\nσ={sigma:g} (rescaled)")
    for row, (imgs, name) in enumerate(zip((clean, dssn, uniform), names)):
        for i in range(n):
            ax = axes[row][i]
            img = imgs[i]
            if img.shape[-1] == 1:
                ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            else:
                ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(name, fontsize=9)
    fig.suptitle(title or f"DSSN vs uniform additive noise (σ = {sigma:g}, q = {q})", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
