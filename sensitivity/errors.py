"""User-fixable errors: the CLI turns each into one red line and exit code 2."""

from __future__ import annotations

import re

__all__ = [
    "CalibrationDataError",
    "ConfigError",
    "FPModelError",
    "ModelLoadError",
    "NoQuantizableLayersError",
    "OutputDirError",
    "SensitivityError",
    "SpecError",
    "UntrustedPickleError",
    "describe_exception",
    "one_line",
    "short_repr",
]


class SensitivityError(Exception):
    """Base class: a problem the user can fix. Its message is one line, shown as is."""


class SpecError(SensitivityError, ValueError):
    """A quantization spec (e.g. `W8A17`) or option out of range."""


class ModelLoadError(SensitivityError):
    """Missing, corrupt or mismatching model file or `--arch` factory."""


class UntrustedPickleError(ModelLoadError):
    """The file holds pickled objects that would run code when loaded."""


class CalibrationDataError(SensitivityError):
    """Calibration data missing, empty, unreadable, or rejected by the model."""


class ConfigError(SensitivityError):
    """A policy / exclusion YAML that does not follow the schema."""


class NoQuantizableLayersError(SensitivityError):
    """The model (after --only/--skip) has no Conv / Linear / sparse-conv layer."""


class FPModelError(SensitivityError):
    """The floating-point model itself misbehaves (e.g. NaN outputs): not a quantization problem."""


class OutputDirError(SensitivityError):
    """The output folder exists (without --overwrite) or cannot be written."""


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def one_line(text: object, limit: int | None = 300) -> str:
    """Text as one short line for a message: ANSI codes removed, whitespace collapsed, cut at `limit`."""
    line = " ".join(_ANSI.sub("", str(text)).split())
    return line if limit is None or len(line) <= limit else line[: limit - 1] + "…"


def describe_exception(e: BaseException) -> str:
    """`TypeError: message` on one line (just the type name when the message is empty)."""
    msg = one_line(e)
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def short_repr(value: object, limit: int = 60) -> str:
    """repr() cut to a readable length: user values end up in one-line error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
