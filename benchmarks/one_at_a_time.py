"""The one-at-a-time baseline other tools use (pytorch-quantization's / CenterPoint's
`build_sensitivity_profile`, AIMET's QuantAnalyzer): quantize one layer, run the whole model over the
data, compare the outputs with FP, for every layer. Calibration (max) takes one FP pass first.

Usage: python benchmarks/one_at_a_time.py MODEL.pth ARCH CALIB.pt BATCH_SIZE [OUTPUT_KEY]
Prints one line per layer (name, output relative L1) to stdout. Works for tensor and dict outputs
(OUTPUT_KEY picks one, e.g. pred_dicts) and for spconv layers (run with one thread, as the scan does).
"""

from __future__ import annotations

import copy
import sys

import torch
from torch import nn

from sensitivity.capture.outputs import as_tensor, flatten_outputs
from sensitivity.data import load_calibration
from sensitivity.io.batches import run_model
from sensitivity.load import load_model
from sensitivity.quant.registry import quant_class_for
from sensitivity.spec import QuantSpec


def main() -> None:
    path, arch, calib, batch_size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    keys = sys.argv[5:6] or None
    model = load_model(path, arch=arch).eval()
    batches = load_calibration(calib, batch_size=batch_size)
    targets = [n for n, m in model.named_modules() if n and quant_class_for(m) is not None]
    amax: dict[str, float] = {}

    def hook(name: str):
        def fn(_m: nn.Module, args: tuple, _o: torch.Tensor) -> None:
            x = as_tensor(args[0])
            amax[name] = max(amax.get(name, 0.0), float(x.abs().max()))

        return fn

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in targets]
    with torch.no_grad():
        reference = [flatten_outputs(run_model(model, b), keys) for b in batches]  # FP outputs + calibration
    for h in handles:
        h.remove()
    spec = QuantSpec()
    for name in targets:
        trial = copy.deepcopy(model)
        parent, _, attr = name.rpartition(".")
        layer = trial.get_submodule(name)
        q = quant_class_for(layer).from_float(layer, spec)  # type: ignore[union-attr]
        q.input_quantizer.set_amax(amax[name])
        setattr(trial.get_submodule(parent) if parent else trial, attr, q)
        err = ref_sum = 0.0
        with torch.no_grad():
            for b, ref in zip(batches, reference, strict=True):
                out = flatten_outputs(run_model(trial, b), keys)
                for k, r in ref.items():
                    err += float((out[k] - r).abs().sum())
                    ref_sum += float(r.abs().sum())
        print(f"{name}\t{err / ref_sum:.6g}")


if __name__ == "__main__":
    main()
