"""Shared fixtures: deterministic seeds, one torch thread (spconv's CPU race; stable timings)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from torch import nn

from sensitivity.demo import digits


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
