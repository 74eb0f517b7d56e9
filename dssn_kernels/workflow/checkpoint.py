"""Checkpoints: a base classifier's weights with the smoothing spec it was trained for.

A checkpoint is a dict of plain types plus a state_dict, so ``torch.load(path,
weights_only=True)`` reads it (no pickled code runs)::

    {"format": "dssn-checkpoint/1",
     "model": {"arch": "small_cnn" | "wrn40_2" | "resnet50" | "denoised", "kwargs": {...}},
     "spec": {"sigma": 0.5 (or "lam": ...), "q": 16, "seed": 0, "L": 27,
              "input_shape": [1, 8, 8], "num_classes": 10},
     "dataset": {"name": "digits", "split": "train", ...},
     "training": {"epochs": ..., "seconds": ..., ...},
     "state_dict": {...}}

    model, spec = load_checkpoint("model.pt")
    dk.certify(model, x, **spec.certify_kwargs())
"""
from __future__ import annotations

import hashlib
import io
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .results import replaced_atomically
from .models import DnCNN, SmallCNN, denoised, normalized, resnet50, wrn40_2
from ..checks import check_seed
from ..spec import lam_from_sigma, num_variants, sigma_from_lam

FORMAT = "dssn-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the request."""


class SpecMismatchError(CheckpointError):
    """A smoothing parameter given by the user disagrees with the checkpoint's."""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class SmoothingSpec:
    """The smoothed classifier's parameters: q, seed, L (from sigma or lam), the input
    shape and the number of classes."""
    q: int
    seed: int
    L: int
    input_shape: tuple
    num_classes: int
    sigma: float | None = None
    lam: float | None = None

    @classmethod
    def create(cls, *, sigma=None, lam=None, q: int, seed: int = 0, input_shape,
               num_classes: int) -> "SmoothingSpec":
        L = num_variants(sigma, lam=lam, q=q)
        check_seed(seed)
        return cls(q=int(q), seed=int(seed), L=L, input_shape=tuple(int(s) for s in input_shape),
                   num_classes=int(num_classes),
                   sigma=None if sigma is None else float(sigma),
                   lam=None if lam is None else float(lam))

    def to_dict(self) -> dict:
        d = {"sigma": self.sigma} if self.sigma is not None else {"lam": self.lam}
        d.update(q=self.q, seed=self.seed, L=self.L, input_shape=list(self.input_shape),
                 num_classes=self.num_classes)
        return d

    @classmethod
    def from_dict(cls, d) -> "SmoothingSpec":
        if not isinstance(d, dict):
            raise CheckpointError(f"the smoothing spec must be a dict, got {type(d).__name__}")
        missing = [k for k in ("q", "seed", "L", "input_shape", "num_classes") if k not in d]
        if missing or (("sigma" in d) == ("lam" in d)):
            raise CheckpointError(f"the smoothing spec {d} needs q, seed, L, input_shape, "
                                  "num_classes and exactly one of sigma, lam")
        if not (_is_int(d["q"]) and _is_int(d["seed"]) and _is_int(d["L"])
                and _is_int(d["num_classes"]) and isinstance(d["input_shape"], (list, tuple))
                and all(_is_int(s) and s > 0 for s in d["input_shape"])):
            raise CheckpointError(f"malformed smoothing spec {d}")
        try:
            spec = cls.create(sigma=d.get("sigma"), lam=d.get("lam"), q=d["q"], seed=d["seed"],
                              input_shape=d["input_shape"], num_classes=d["num_classes"])
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"invalid smoothing spec {d}: {exc}") from None
        if spec.L != d["L"]:
            raise CheckpointError(f"inconsistent smoothing spec {d}: L = int(2*lambda*q) = {spec.L}")
        return spec

    @property
    def sigma_value(self) -> float:
        return self.sigma if self.sigma is not None else sigma_from_lam(self.lam)

    @property
    def lam_value(self) -> float:
        return self.lam if self.lam is not None else lam_from_sigma(self.sigma)

    def certify_kwargs(self) -> dict:
        """Keyword arguments for ``dk.certify`` / ``dk.training_noise``: L, q, seed."""
        return {"L": self.L, "q": self.q, "seed": self.seed}

    def describe(self) -> str:
        p = f"sigma={self.sigma:g}" if self.sigma is not None else f"lam={self.lam:g}"
        return f"{p} (L={self.L}, q={self.q}, seed={self.seed})"

    def check_agrees(self, *, sigma=None, lam=None, q=None, seed=None) -> None:
        """Raises SpecMismatchError naming both values if a given parameter disagrees."""
        if q is not None and q != self.q:
            raise SpecMismatchError(f"--q {q} disagrees with the checkpoint's q={self.q}")
        if seed is not None and seed != self.seed:
            raise SpecMismatchError(f"--seed {seed} disagrees with the checkpoint's "
                                    f"seed={self.seed}")
        for name, given, have in (("sigma", sigma, self.sigma_value), ("lam", lam, self.lam_value)):
            if given is None:
                continue
            try:
                L = num_variants(**{name: given}, q=self.q)
            except (TypeError, ValueError):
                L = None
            if not math.isclose(float(given), have, rel_tol=1e-9, abs_tol=0.0) or L != self.L:
                raise SpecMismatchError(
                    f"--{name} {_num(given)} disagrees with the checkpoint's {name}={_num(have)} "
                    f"(L={self.L} at q={self.q}; --{name} {_num(given)} gives L={L})")


def _num(v) -> str:
    """Shortest readable form of a number: ``:g`` when that reads back to the same float,
    else the full repr (so two different values never print alike, 0.5000001 vs 0.5)."""
    s = f"{float(v):g}"
    return s if float(s) == float(v) else repr(float(v))


# --------------------------------------------------------------------------- architectures

def _small_cnn(num_classes, in_channels=1, image_size=8, width=32, hidden=128):
    return SmallCNN(in_channels=in_channels, num_classes=num_classes, image_size=image_size,
                    width=width, hidden=hidden)


def _wrn40_2(num_classes, mean, std, in_channels=3):
    return normalized(wrn40_2(num_classes, in_channels=in_channels), mean, std)


def _resnet50(num_classes, mean, std):
    return normalized(resnet50(num_classes), mean, std)


DENOISER_ARCHS = {"dncnn": DnCNN}


def _denoised(denoiser: dict, classifier: dict):
    """A denoiser (``{"arch": "dncnn", "kwargs": {...}}``) in front of a classifier
    (``{"arch": one of ARCHS, "kwargs": {...}}``): ``models.denoised(...)``, state_dict
    keys ``denoiser.*`` and ``classifier.*`` (written by ``dssn train-denoiser``)."""
    parts = []
    for what, entry, table in (("denoiser", denoiser, DENOISER_ARCHS),
                               ("classifier", classifier, ARCHS)):
        if (not isinstance(entry, dict) or not isinstance(entry.get("arch"), str)
                or not isinstance(entry.get("kwargs"), dict)):
            raise TypeError(f"the {what} must be {{'arch': ..., 'kwargs': {{...}}}}, got {entry!r}")
        if entry["arch"] not in table or entry["arch"] == "denoised":
            raise TypeError(f"unknown {what} architecture {entry['arch']!r}")
        parts.append(table[entry["arch"]](**entry["kwargs"]))
    return denoised(*parts)


ARCHS = {"small_cnn": _small_cnn, "wrn40_2": _wrn40_2, "resnet50": _resnet50,
         "denoised": _denoised}


def default_model_kwargs(arch: str, input_shape, num_classes: int, mean, std) -> dict:
    """Plain-type constructor arguments of ``arch`` for inputs of ``input_shape``."""
    c, h = int(input_shape[0]), int(input_shape[1])
    if arch == "small_cnn":
        return {"num_classes": num_classes, "in_channels": c, "image_size": h}
    if arch == "wrn40_2":
        return {"num_classes": num_classes, "in_channels": c, "mean": list(mean), "std": list(std)}
    if arch == "resnet50":
        if c != 3:
            raise CheckpointError(f"resnet50 takes 3-channel images, the data has {c}")
        return {"num_classes": num_classes, "mean": list(mean), "std": list(std)}
    if arch == "denoised":
        raise CheckpointError("a denoised model is trained with `dssn train-denoiser "
                              "CLASSIFIER.pt`, not `dssn train`")
    raise CheckpointError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")


def build_model(arch: str, kwargs: dict) -> torch.nn.Module:
    if arch not in ARCHS:
        raise CheckpointError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    try:
        return ARCHS[arch](**kwargs)
    except TypeError as exc:
        raise CheckpointError(f"bad arguments {kwargs} for architecture {arch!r}: {exc}") from None


# --------------------------------------------------------------------------- save / load

def plain(obj):
    """``obj`` as plain Python types (what ``torch.load(weights_only=True)`` accepts):
    str/int/float subclasses (e.g. torch.__version__) and numpy scalars are converted."""
    if obj is None or type(obj) in (bool, int, float, str):
        return obj
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, str):
        return str(obj)
    if hasattr(obj, "item") and not isinstance(obj, torch.Tensor):  # numpy scalars
        obj = obj.item()
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint's metadata")


def save_checkpoint(path, model: torch.nn.Module, *, arch: str, model_kwargs: dict,
                    spec: SmoothingSpec, dataset: dict, training: dict | None = None) -> Path:
    """Writes the checkpoint atomically (temporary file, then rename)."""
    path = Path(path)
    ckpt = {
        "format": FORMAT,
        "model": {"arch": str(arch), "kwargs": plain(dict(model_kwargs))},
        "spec": plain(spec.to_dict()),
        "dataset": plain(dict(dataset)),
        "training": plain(dict(training or {})),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced_atomically(path, "wb") as f:
        torch.save(ckpt, f)
    return path


def read_checkpoint(path) -> dict:
    """The checkpoint dict, loaded with ``weights_only=True`` and checked; its ``sha256``
    entry is the digest of the bytes loaded (one read of the file: a file replaced while
    it is read cannot give one file's weights and another's digest)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file {path}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        with warnings.catch_warnings():   # e.g. "Detected pickle protocol 4": not ours to show
            warnings.simplefilter("ignore")
            ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (any unreadable file: say which and why)
        # never torch's advice (weights_only=False, add_safe_globals): that would run the
        # file's pickled code; a dssn checkpoint is plain data and weights
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        why = (f"it holds a pickled {found.group(1)} object (a whole model?), which is never "
               "unpickled" if found else "not a file written by torch.save, or a damaged one")
        raise CheckpointError(f"{path} is not a loadable dssn checkpoint ({why}); write one "
                              "with `dssn train` or save_checkpoint") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        fmt = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path} is not a dssn checkpoint (format {fmt!r}, "
                              f"expected {FORMAT!r}); train one with `dssn train`")
    for key in ("model", "spec", "dataset", "state_dict"):
        if key not in ckpt:
            raise CheckpointError(f"checkpoint {path} lacks {key!r}")
    for key, optional in (("dataset", False), ("training", True)):
        if not isinstance(ckpt.get(key), dict) and not (optional and ckpt.get(key) is None):
            raise CheckpointError(f"checkpoint {path}: malformed {key} entry "
                                  f"({type(ckpt[key]).__name__}, not a dict)")
    sd = ckpt["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"checkpoint {path}: malformed state_dict (not a dict of tensors)")
    m = ckpt["model"]
    if not isinstance(m, dict) or not isinstance(m.get("arch"), str) or not isinstance(m.get("kwargs"), dict):
        raise CheckpointError(f"checkpoint {path}: malformed model entry {m!r}")
    try:
        ckpt["spec_obj"] = SmoothingSpec.from_dict(ckpt["spec"])
    except CheckpointError as exc:
        raise CheckpointError(f"checkpoint {path}: {exc}") from None
    ckpt["sha256"] = hashlib.sha256(data).hexdigest()
    return ckpt


def model_from_checkpoint(ckpt: dict, device="cpu") -> torch.nn.Module:
    """The checkpoint's model in eval mode on ``device``, after one forward of a blank
    image of the spec's input shape (check_model_fits): a model that does not take the
    spec's inputs, gives another number of classes or NaN logits is refused here, before
    any training or certification starts."""
    arch = ckpt["model"]["arch"]
    model = build_model(arch, ckpt["model"]["kwargs"])
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as exc:
        why = " ".join(line.strip() for line in str(exc).splitlines()[1:3])
        raise CheckpointError(f"the checkpoint's weights do not fit {arch}: "
                              f"{why[:300] or str(exc).splitlines()[0]}") from None
    model = model.to(device).eval()
    spec = ckpt.get("spec_obj")
    if spec is None:
        spec = SmoothingSpec.from_dict(ckpt["spec"])
    check_model_fits(model, spec, f"the checkpoint's {arch} model")
    return model


def check_model_fits(model: torch.nn.Module, spec: SmoothingSpec, what: str) -> None:
    """One forward of a blank image (all pixels 0, a level of every q) of the spec's input
    shape: CheckpointError unless it gives float logits [1, num_classes] without NaN
    (pipeline.check_logits, and the NaN refusal of certify)."""
    from ..pipeline import check_logits

    device = next(iter(model.parameters()), torch.empty(0)).device
    x = torch.zeros((1, *spec.input_shape), device=device)
    try:
        with torch.no_grad():
            logits = model(x)
        check_logits(logits, 1, spec.num_classes)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{what} does not fit its smoothing spec (images "
                              f"{list(spec.input_shape)}, {spec.num_classes} classes): "
                              f"{first}") from None
    if bool(torch.isnan(logits).any()):
        raise CheckpointError(f"{what} returns NaN logits (damaged weights?)")


def load_checkpoint(path, device="cpu") -> tuple[torch.nn.Module, SmoothingSpec]:
    """(model in eval mode on ``device``, SmoothingSpec) from a checkpoint file."""
    ckpt = read_checkpoint(path)
    return model_from_checkpoint(ckpt, device), ckpt["spec_obj"]


__all__ = ["ARCHS", "CheckpointError", "DENOISER_ARCHS", "FORMAT", "SmoothingSpec",
           "SpecMismatchError", "build_model", "check_model_fits",
           "default_model_kwargs", "load_checkpoint", "model_from_checkpoint",
           "read_checkpoint", "save_checkpoint"]
