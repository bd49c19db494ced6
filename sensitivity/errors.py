"""User-fixable errors: the CLI turns each into one red line and exit code 2."""

from __future__ import annotations

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
