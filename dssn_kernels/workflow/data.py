"""Data sets as integer pixel levels, the form DSSN certifies exactly.

Every data set yields ``uint8`` levels k in 0..q shaped [C, H, W] and int labels; the
model sees k/q. Nothing here downloads anything.

* ``digits``: scikit-learn's bundled 8x8 digits (pixels are integers 0..16, so q = 16),
  split into train/test (70/30, stratified, ``random_state=0``).
* ``cifar10``: the standard local ``cifar-10-batches-py`` pickle folder, read with numpy
  (no torchvision); q = 255. ``root`` is that folder or its parent.
* ``imagenet``: a local ImageNet folder (``root/train/<wnid>/*.JPEG``, ``root/val/...``),
  read like ``torchvision.datasets.ImageFolder`` (sorted class folders, sorted files),
  resized (shorter side 256, bilinear) and center-cropped to 224x224 RGB uint8; q = 255.
  Uses torchvision's ImageFolder and transforms when installed, else the same steps with
  PIL directly.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

DATASETS = ("digits", "cifar10", "imagenet")
SPLITS = ("train", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DatasetError(ValueError):
    """A data set cannot be found or read (a user error: the message says what to fix)."""


# (q, input shape, number of classes, default architecture, normalization mean/std)
INFO = {
    "digits": dict(q=16, input_shape=(1, 8, 8), num_classes=10, arch="small_cnn",
                   mean=(0.5,), std=(0.5,)),
    "cifar10": dict(q=255, input_shape=(3, 32, 32), num_classes=10, arch="wrn40_2",
                    mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010)),
    "imagenet": dict(q=255, input_shape=(3, 224, 224), num_classes=1000, arch="resnet50",
                     mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
}


@dataclass
class LevelDataset:
    """A split of a data set as integer levels. ``get(indices)`` -> (uint8 [n, C, H, W],
    int64 [n]); ``labels`` holds every label (int64 [N]). ``identity`` is the JSON-able
    description recorded in checkpoints and result files."""
    name: str
    split: str
    q: int
    input_shape: tuple
    num_classes: int
    labels: torch.Tensor
    images: torch.Tensor | None = None          # uint8 [N, C, H, W] when held in memory
    loader: object = None                        # callable(i) -> uint8 [C, H, W] otherwise
    identity: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def get(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        if self.images is not None:
            return self.images[idx], self.labels[idx]
        images = torch.stack([self.loader(int(i)) for i in idx]) if len(idx) else \
            torch.empty((0, *self.input_shape), dtype=torch.uint8)
        return images, self.labels[idx]

    def __getitem__(self, i):
        x, y = self.get([i])
        return x[0], int(y[0])


def load_dataset(name: str, split: str = "test", root=None) -> LevelDataset:
    """The ``split`` ("train" or "test"; ImageNet's "test" is its "val" folder) of data set
    ``name`` as uint8 levels. ``root``: the local folder (cifar10, imagenet)."""
    if name not in DATASETS:
        raise DatasetError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if name == "digits":
        if root is not None:   # never silently ignored
            raise DatasetError(f"--data-root {root} applies to cifar10 and imagenet; digits "
                               "ships with scikit-learn and is read from there")
        return load_digits(split)
    if root is None:
        raise DatasetError(f"data set {name!r} is read from a local folder: give --data-root "
                           "(nothing is downloaded)")
    if name == "cifar10":
        return load_cifar10(root, split)
    return load_imagenet(root, split)


# --------------------------------------------------------------------------- digits

DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.3


def digits_levels(seed: int = DIGITS_SPLIT_SEED, test_fraction: float = DIGITS_TEST_FRACTION):
    """(x_train, y_train, x_test, y_test): uint8 levels 0..16 shaped [N, 1, 8, 8] and int64
    labels, split stratified with ``seed``."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise DatasetError("the digits data set needs scikit-learn: "
                           "pip install 'dssn-kernels[demo]'") from exc
    digits = sk_load_digits()
    levels = digits.images.astype(np.uint8)[:, None]  # exact: the values are integers 0..16
    assert levels.max() <= 16 and np.array_equal(levels[:, 0], digits.images)
    xtr, xte, ytr, yte = train_test_split(levels, digits.target, test_size=test_fraction,
                                          random_state=seed, stratify=digits.target)
    return (torch.from_numpy(xtr), torch.from_numpy(ytr).long(),
            torch.from_numpy(xte), torch.from_numpy(yte).long())


def load_digits(split: str) -> LevelDataset:
    xtr, ytr, xte, yte = digits_levels()
    x, y = (xtr, ytr) if split == "train" else (xte, yte)
    info = INFO["digits"]
    return LevelDataset("digits", split, info["q"], info["input_shape"], info["num_classes"],
                        labels=y, images=x.contiguous(),
                        identity={"name": "digits", "split": split,
                                  "split_seed": DIGITS_SPLIT_SEED,
                                  "test_fraction": DIGITS_TEST_FRACTION})


# --------------------------------------------------------------------------- CIFAR-10

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def _cifar_folder(root) -> Path:
    root = Path(root)
    for cand in (root, root / CIFAR10_FOLDER):
        if (cand / CIFAR10_FILES["test"][0]).is_file() or (cand / CIFAR10_FILES["train"][0]).is_file():
            return cand
    raise DatasetError(f"no CIFAR-10 batches under {root}: expected {root}/{CIFAR10_FOLDER}/"
                       "data_batch_1..5 and test_batch (the python version of CIFAR-10)")


def read_cifar_batch(path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch file -> (uint8 [n, 3, 32, 32], int64 [n])."""
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except FileNotFoundError:
        raise DatasetError(f"CIFAR-10 batch {path} is missing") from None
    except Exception as exc:  # noqa: BLE001  (pickle/format errors: name the file)
        raise DatasetError(f"cannot read CIFAR-10 batch {path}: {exc}") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise DatasetError(f"CIFAR-10 batch {path} has data of shape {data.shape} and "
                           f"{len(labels)} labels; expected [n, 3072] and n labels")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(root, split: str) -> LevelDataset:
    folder = _cifar_folder(root)
    parts = [read_cifar_batch(folder / name) for name in CIFAR10_FILES[split]]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    if y.size and (y.min() < 0 or y.max() > 9):
        raise DatasetError(f"CIFAR-10 labels must be 0..9, found {y.min()}..{y.max()} in {folder}")
    info = INFO["cifar10"]
    return LevelDataset("cifar10", split, info["q"], info["input_shape"], info["num_classes"],
                        labels=torch.from_numpy(y), images=torch.from_numpy(np.ascontiguousarray(x)),
                        identity={"name": "cifar10", "split": split})


# --------------------------------------------------------------------------- ImageNet

def _find_images(folder: Path):
    """ImageFolder's listing: sorted class folders, files walked in sorted order."""
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if not classes:
        raise DatasetError(f"no class folders in {folder} (expected {folder}/<class>/<image>)")
    samples = []
    for ci, cls in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(folder / cls, followlinks=True)):
            for fname in sorted(files):
                if fname.lower().endswith(IMAGE_EXTENSIONS):
                    samples.append((os.path.join(dirpath, fname), ci))
    if not samples:
        raise DatasetError(f"no images in the class folders of {folder}")
    return classes, samples


def _pil_levels(img) -> torch.Tensor:
    """An RGB PIL image -> uint8 [3, H, W]."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy())


def resize_center_crop(img, resize: int = 256, crop: int = 224) -> torch.Tensor:
    """PIL image -> uint8 [3, crop, crop]: shorter side to ``resize`` (bilinear, as
    torchvision.transforms.Resize on PIL images), then the center ``crop`` (as CenterCrop)."""
    from PIL import Image

    img = img.convert("RGB")
    w, h = img.size
    if w <= h:
        new_w, new_h = resize, int(resize * h / w)
    else:
        new_w, new_h = int(resize * w / h), resize
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.BILINEAR)
    top = int(round((new_h - crop) / 2.0))
    left = int(round((new_w - crop) / 2.0))
    if top < 0 or left < 0:
        raise DatasetError(f"cannot center-crop {crop}x{crop} from {new_w}x{new_h}")
    return _pil_levels(img.crop((left, top, left + crop, top + crop)))


def load_imagenet(root, split: str, resize: int = 256, crop: int = 224) -> LevelDataset:
    folder = Path(root) / ("train" if split == "train" else "val")
    if not folder.is_dir():
        raise DatasetError(f"no ImageNet folder {folder} (expected {root}/train and {root}/val, "
                           "one subfolder per class)")
    try:
        from torchvision.datasets import ImageFolder
        from torchvision import transforms
    except ImportError:
        ImageFolder = None
    try:
        from PIL import Image
    except ImportError:
        if ImageFolder is None:
            raise DatasetError("reading ImageNet needs torchvision (pip install "
                               "'dssn-kernels[vision]') or at least pillow") from None
        Image = None

    if ImageFolder is not None:
        try:
            tv = ImageFolder(str(folder))
        except OSError as exc:   # no class folder, no image
            raise DatasetError(f"{folder}: {exc}") from None
        classes, samples = tv.classes, tv.samples
        tf = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(crop)])

        def read(i):
            return _pil_levels(tf(tv.loader(samples[i][0]).convert("RGB")))
    else:
        classes, samples = _find_images(folder)

        def read(i):
            with open(samples[i][0], "rb") as f:
                return resize_center_crop(Image.open(f), resize, crop)

    def checked_loader(i):
        try:
            return read(i)
        except (OSError, ValueError) as exc:   # a damaged or truncated image, not a picture
            raise DatasetError(f"cannot read image {samples[i][0]}: "
                               f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                               ) from None

    labels = torch.tensor([c for _, c in samples], dtype=torch.long)
    info = INFO["imagenet"]
    return LevelDataset("imagenet", split, info["q"], (3, crop, crop), len(classes),
                        labels=labels, loader=checked_loader,
                        identity={"name": "imagenet", "split": split, "num_images": len(samples),
                                  "resize": resize, "crop": crop})


def cohen_indices(n: int, skip: int = 1, max_index: int | None = None) -> list[int]:
    """The indices Cohen et al.'s certify.py visits: every ``skip``-th index i of 0..n-1,
    stopping before i == ``max_index``."""
    if skip < 1:
        raise DatasetError(f"--skip must be >= 1, got {skip}")
    stop = n if max_index is None or max_index < 0 else min(n, max_index)
    return list(range(0, stop, skip))
