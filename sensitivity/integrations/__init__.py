"""Optional integrations (spconv, OpenPCDet, pytorch-quantization), each imported lazily.

`activate(model)` loads the layer families a model needs (spconv's sparse convs register themselves into
`sensitivity.quant.registry` when their module is imported); the public API and the CLI call it for every
model they are given, so nothing below them imports an integration."""

from __future__ import annotations

import importlib

from torch import nn

from sensitivity.quant.registry import PLUGINS

__all__ = ["activate"]


def activate(model: nn.Module) -> nn.Module:
    """Import the integration of every third-party layer package `model` holds (spconv); returns `model`."""
    packages = {type(m).__module__.split(".", 1)[0] for m in model.modules()}
    for package in sorted(packages & set(PLUGINS)):
        importlib.import_module(PLUGINS[package])
    return model
