"""Where the demos keep what they train (once per machine), and how they train it reproducibly."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from sensitivity.files import atomic_torch_save

__all__ = ["CACHE_ENV", "atomic_save", "resolve_cache_dir", "single_thread"]

CACHE_ENV = "SENSITIVITY_CACHE"


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``cache_dir`` if given, else ``$SENSITIVITY_CACHE``, else the platform's user cache dir."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("sensitivity"))


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Train on one intra-op thread: float reductions then give the same weights on any machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def atomic_save(obj: object, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(obj, path)
