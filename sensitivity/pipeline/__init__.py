"""The scan, as a chain of stages with typed results: calibration -> measurement -> decision -> quant state
-> evaluation -> `ScanData` (`scan`); and the fresh calibration `apply --calib` needs."""

from sensitivity.pipeline.options import DEFAULT_ALPHAS, PhaseProgress, ScanOptions
from sensitivity.pipeline.result import ScanData
from sensitivity.pipeline.scan import scan
from sensitivity.pipeline.state import calibrate_quant_state

__all__ = ["DEFAULT_ALPHAS", "PhaseProgress", "ScanData", "ScanOptions", "calibrate_quant_state", "scan"]
