"""Result folders of the paper's released code, read next to ``dssn certify`` files by
``dssn analyze`` and ``dssn plot curves``.

One folder per experiment, named ``<dataset>_<noise>_<sigma>[_stabilized]`` with noise
``split_derandomized`` (DSSN), ``split`` (independent SSN) or ``uniform`` (Yang et al.),
e.g. ``cifar_split_derandomized_0.5``. It holds numpy arrays:

* DSSN: ``preds.npy`` (float [N, K], each row the vote counts divided by L),
  ``predicted_labels.npy``, ``labels.npy``, ``radius_l1.npy`` (the radius in steps
  divided by 255, float32) and ``time_per.npy`` (a scalar, seconds per image);
* Monte Carlo: ``preds.npy`` (the fractions of the n0 = 64 selection votes: the
  prediction is their argmax, lowest index on ties), ``prob_lb.npy``, ``radius_l1.npy``
  = 2*lambda*(prob_lb - 1/2) (negative: not certified), ``labels.npy``, ``time_per.npy``.

``args.pkl`` is a pickle and is never read: sigma, noise and training come from the
folder name. Counts are recovered as round(preds * L) (n0 for Monte Carlo) and must be
whole numbers summing to L (n0); a folder that does not fit is refused naming why. An
image counts as certified at R when prediction == label and radius >= R; an image of
negative radius (Monte Carlo, not certified) is certified at no radius, and counts as
correct (clean accuracy) only when certified, as in Cohen et al.'s files.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..spec import num_variants
from .results import ResultsError

NOISE_METHODS = {"split_derandomized": "dssn", "split": "ssn", "uniform": "uniform"}
DATASET_NAMES = {"cifar": "cifar10", "cifar10": "cifar10", "imagenet": "imagenet"}
FOLDER_RE = re.compile(r"^(?P<dataset>.+?)_(?P<noise>split_derandomized|split|uniform)_"
                       r"(?P<sigma>[0-9]*\.?[0-9]+(?:e-?[0-9]+)?)(?P<stab>_stabilized)?$")
N0 = 64
Q = 255


def parse_folder_name(name: str) -> dict:
    """{"dataset", "method", "sigma", "stability"} from ``<dataset>_<noise>_<sigma>[_stabilized]``."""
    m = FOLDER_RE.match(name)
    if m is None:
        raise ResultsError(f"{name}: not a result folder of the paper's released code (its name "
                           "must be <dataset>_<noise>_<sigma>[_stabilized] with noise "
                           "split_derandomized, split or uniform, e.g. cifar_split_derandomized_0.5)")
    return {"dataset": DATASET_NAMES.get(m["dataset"], m["dataset"]),
            "method": NOISE_METHODS[m["noise"]], "sigma": float(m["sigma"]),
            "stability": m["stab"] is not None}


def _load(folder: Path, name: str) -> np.ndarray:
    path = folder / name
    if not path.is_file():
        raise ResultsError(f"{folder}: no {name} (a folder of the paper's released code holds "
                           "preds.npy, labels.npy, radius_l1.npy, time_per.npy and "
                           "predicted_labels.npy (DSSN) or prob_lb.npy (Monte Carlo))")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise ResultsError(f"{path}: not a readable numpy array ({exc})") from None


def _counts(preds: np.ndarray, total: int, folder: Path) -> np.ndarray:
    scaled = preds.astype(np.float64) * total
    counts = np.rint(scaled)
    if not np.all(np.abs(scaled - counts) < 1e-3) or not np.all(counts.sum(1) == total):
        raise ResultsError(f"{folder}: preds.npy rows are not vote counts divided by {total} "
                           "(the folder name's sigma or method does not fit its files?)")
    return counts.astype(np.int64)


def load_released(folder, label: str | None = None) -> dict:
    """The fields of an analysis.Result for a released result folder (label default:
    the method, ", stability" when stabilized, and "(published)")."""
    folder = Path(folder)
    name = folder.name if folder.name not in ("", "..") else folder.resolve().name  # ".", ".."
    try:
        info = parse_folder_name(name)
    except ResultsError as exc:   # named as the user wrote it
        shown = str(folder) if name == folder.name else f"{folder} ({name})"
        raise ResultsError(f"{shown}{str(exc)[len(name):]}") from None
    method = info["method"]
    labels = _load(folder, "labels.npy")
    preds = _load(folder, "preds.npy")
    radius = _load(folder, "radius_l1.npy").astype(np.float64)
    time_per = _load(folder, "time_per.npy")
    n = labels.shape[0] if labels.ndim == 1 else -1
    if n < 0 or preds.ndim != 2 or preds.shape[0] != n or radius.shape != (n,) \
            or np.size(time_per) != 1:
        raise ResultsError(f"{folder}: the arrays do not fit one another (labels {labels.shape}, "
                           f"preds {preds.shape}, radius_l1 {radius.shape}, time_per "
                           f"{np.shape(time_per)})")
    if not np.all(np.isfinite(radius)) or not np.all(labels == np.rint(labels)):
        raise ResultsError(f"{folder}: labels or radii are not numbers of the released format")
    labels = labels.astype(np.int64)
    spec = {"sigma": info["sigma"], "q": Q}
    if method == "dssn":
        L = num_variants(info["sigma"], q=Q)
        _counts(preds, L, folder)
        predicted = _load(folder, "predicted_labels.npy")
        if predicted.shape != (n,):
            raise ResultsError(f"{folder}: predicted_labels.npy has shape {predicted.shape}, "
                               f"expected ({n},)")
        prediction = predicted.astype(np.int64)
        certified = radius >= 0
        spec["L"] = L
    else:
        _counts(preds, N0, folder)
        prob_lb = _load(folder, "prob_lb.npy")
        if prob_lb.shape != (n,):
            raise ResultsError(f"{folder}: prob_lb.npy has shape {prob_lb.shape}, expected ({n},)")
        prediction = preds.argmax(axis=1).astype(np.int64)   # lowest index on ties
        certified = radius > 0
        radius = np.where(certified, radius, -1.0)
        spec["L"] = num_variants(info["sigma"], q=Q)   # the DSSN L of this sigma (max radius)
    correct = (prediction == labels) & certified if method != "dssn" else prediction == labels
    from .analysis import METHOD_LABELS

    default = METHOD_LABELS[method] + (", stability" if info["stability"] else "") + " (published)"
    return dict(path=str(folder), label=label or default, spec=spec,
                dataset={"name": info["dataset"], "split": "test"},
                idx=np.arange(n, dtype=np.int64), radius=radius, correct=correct,
                time=np.full(n, float(np.asarray(time_per).reshape(())), dtype=np.float64))
