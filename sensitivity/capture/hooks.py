"""Hooks in context managers, so they are always removed (even when a batch raises)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

__all__ = ["forward_hooks", "pre_hooks"]


@contextmanager
def forward_hooks(
    model: nn.Module, names: list[str], hook: Callable[[str, nn.Module, tuple, Any], Any]
) -> Iterator[None]:
    """Call `hook(name, module, args, output)` after each named module runs."""
    handles = []
    try:
        for name in names:
            mod = model.get_submodule(name)
            handles.append(mod.register_forward_hook(lambda m, a, o, _n=name: hook(_n, m, a, o)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def pre_hooks(
    model: nn.Module, names: list[str], hook: Callable[[str, nn.Module, tuple], Any]
) -> Iterator[None]:
    """Call `hook(name, module, args)` before each named module runs."""
    handles = []
    try:
        for name in names:
            mod = model.get_submodule(name)
            handles.append(mod.register_forward_pre_hook(lambda m, a, _n=name: hook(_n, m, a)))
        yield
    finally:
        for h in handles:
            h.remove()
