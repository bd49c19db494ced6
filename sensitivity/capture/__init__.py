"""Hook-based capture: calibration, FP/isolated and quantized/cumulative passes."""
