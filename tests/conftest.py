"""Shared fixtures: deterministic seeds, one torch thread (spconv's CPU race; stable timings)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from sensitivity.demo import digits
from tests.cli_helpers import fails
from tests.models import PlantedOutlierNet


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def trained_digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path, float]:
    """The default demo model, trained once per session (~25-50 s) into a temporary SENSITIVITY_CACHE.

    Returns the model, the cache folder and the training seconds.
    """
    cache = tmp_path_factory.mktemp("sensitivity-cache")
    with pytest.MonkeyPatch.context() as mp:  # only while training: nothing leaks into other tests
        mp.setenv(digits.CACHE_ENV, str(cache))
        start = time.perf_counter()
        model = digits.train_digits_cnn()
        seconds = time.perf_counter() - start
    return model, cache, seconds


@pytest.fixture()
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder holding a good model (`model.pth`, PlantedOutlierNet) and calibration set (`calib.pt`);
    also the working directory, so a default `reports/` folder would show up in it."""
    monkeypatch.chdir(tmp_path)
    torch.save(PlantedOutlierNet().state_dict(), tmp_path / "model.pth")
    torch.save(torch.randn(16, 3, 12, 12, generator=torch.Generator().manual_seed(0)), tmp_path / "calib.pt")
    return tmp_path


@pytest.fixture()
def refused(work: Path, capsys: pytest.CaptureFixture[str]) -> Callable[..., str]:
    """`refused(argv, *fragments)`: runs the CLI and checks the refusal (see `fails`)."""
    return lambda argv, *fragments: fails(work, capsys, argv, *fragments)
