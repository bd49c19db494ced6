"""Option types and parsing helpers shared by the commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from sensitivity.errors import SpecError

__all__ = ["CalibOpt", "PercOpt", "SignOpt", "SpecOpt", "check_device", "given", "outputs_option", "split"]


def split(values: list[str] | None) -> tuple[str, ...]:
    """Repeated options and comma-separated values as one tuple: `--only a,b --only c` -> (a, b, c)."""
    items: list[str] = []
    for v in values or []:
        items.extend(p.strip() for p in v.split(",") if p.strip())
    return tuple(items)


def check_device(device: str) -> str:
    """`cpu` / `cuda` / `cuda:N`, refused in one line when this machine cannot run it."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise SpecError(f"--device {device!r} is not a device (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SpecError(f"--device {device}: no CUDA device is available on this machine (use --device cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SpecError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    if dev.type not in ("cpu", "cuda"):
        raise SpecError(f"--device {device}: only cpu and cuda are supported")
    return device


SpecOpt = Annotated[str, typer.Option("--spec", help="Bit widths, e.g. W8A8, W4A8, W8A16.")]
CalibOpt = Annotated[
    str, typer.Option("--calibrator", help="Activation calibrator: max | percentile | entropy | mse.")
]
PercOpt = Annotated[float, typer.Option("--percentile", help="Percentile for the percentile calibrator.")]
SignOpt = Annotated[
    str,
    typer.Option(
        "--act-sign", help="signed (TensorRT) or auto (unsigned where the input is never negative)."
    ),
]


def outputs_option(values: list[str] | None) -> tuple[tuple[str, ...], Any]:
    """--outputs: dict keys (`pred_dicts,boxes`), or one `pkg.module:function` / `file.py:function` that maps
    the model's output to named tensors."""
    keys = split(values)
    specs = [k for k in keys if ":" in k]
    if not specs:
        return keys, None
    if len(keys) > 1:
        raise SpecError("--outputs takes dict keys or one pkg.module:function, not both")
    from sensitivity.io.callables import resolve_callable

    return (), resolve_callable(specs[0], "--outputs", error=SpecError)


def given(ctx: typer.Context, name: str) -> bool:
    """Whether the option `name` was given on the command line (not left at its default)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


# ------------------------------------------------------------------------------------------ scan options
Opt = typer.Option
ModelArg = Annotated[
    Path,
    typer.Argument(
        help="State dict (.pth/.pt/.safetensors), TorchScript, or pickled module; with --pcdet-cfg, the OpenPCDet "
        "checkpoint."
    ),
]
CalibDataOpt = Annotated[
    str | None,
    Opt(
        "--calib",
        help="Calibration data: .pt/.npz file, folder, or pkg.mod:fn (not needed with --pcdet-cfg).",
    ),
]
PcdetCfgOpt = Annotated[
    Path | None,
    Opt(
        "--pcdet-cfg",
        help="OpenPCDet model config (needs pcdet): build the network from it, load MODEL into it, calibrate on "
        "--batches (default 16) of its dataset's frames, --batch-size (default 1) per batch; --outputs defaults to "
        "pred_dicts (the head outputs, before box decoding and NMS).",
    ),
]
CalibSplitOpt = Annotated[
    str, Opt("--calib-split", help="With --pcdet-cfg: the dataset split to calibrate on.")
]
ArchOpt = Annotated[str | None, Opt("--arch", help="Model factory pkg.module:function.")]
ArchKwargsOpt = Annotated[str | None, Opt("--arch-kwargs", help="JSON kwargs for --arch.")]
TrustOpt = Annotated[bool, Opt("--trust-pickle", help="Allow unpickling (runs code!).")]
BatchSizeOpt = Annotated[int, Opt("--batch-size", help="Samples per batch for tensor data.")]
BatchesOpt = Annotated[int | None, Opt("--batches", help="Use at most N calibration batches.")]
OnlyOpt = Annotated[list[str] | None, Opt("--only", help="Glob(s) of layers to scan.")]
SkipOpt = Annotated[list[str] | None, Opt("--skip", help="Glob(s) of layers to leave alone.")]
FoldOpt = Annotated[bool, Opt("--fold-bn/--no-fold-bn", help="Fold BatchNorm into convs.")]
ExcludeOpt = Annotated[Path | None, Opt("--exclude", help="A (user-edited) exclude.yaml to honour.")]
OutputsOpt = Annotated[
    list[str] | None,
    Opt("--outputs", help="Output dict keys that count, or pkg.module:function -> {name: tensor}."),
]
MaxRelOpt = Annotated[float | None, Opt("--max-rel-l1", help="Exclude above this.")]
MinSqnrOpt = Annotated[float | None, Opt("--min-sqnr-db", help="Exclude below this.")]
HoldoutOpt = Annotated[float, Opt("--holdout", help="Fraction of batches held out.")]
DeviceOpt = Annotated[str, Opt("--device", help="cpu, cuda or cuda:N (under torchrun: cuda = LOCAL_RANK).")]
AlphaOpt = Annotated[str, Opt("--alpha-grid", help="SmoothQuant alphas: 0.5 | 0.25,0.5,0.75 | 0.1:0.9:0.1.")]
SqOpt = Annotated[bool, Opt("--smoothquant/--no-smoothquant", help="Score SmoothQuant per layer.")]
SqGranOpt = Annotated[
    str, Opt("--sq-granularity", help="channel (deployable) and/or im2col (research), comma-separated.")
]
SqModeOpt = Annotated[str, Opt("--sq-mode", help="static (deployable) or dynamic (research).")]
SqMarginOpt = Annotated[
    float, Opt("--sq-margin", help="SmoothQuant must cut isolated rel. L1 to this x naive.")
]
EvalOpt = Annotated[
    str | None, Opt("--eval", help="pkg.module:function, model -> {metric: value} (higher is better).")
]
EvalMetricOpt = Annotated[str | None, Opt("--eval-metric", help="Metric key for the budget.")]
BudgetOpt = Annotated[
    float | None, Opt("--exclude-budget", help="Exclude layers until the metric is within this of FP.")
]
SeedOpt = Annotated[int, Opt("--seed")]
PolicyOpt = Annotated[
    str,
    Opt(
        "--policy-by",
        help="output: least predicted output error per layer, FP budget where it removes the most, verified "
        "(default); thresholds: the isolated-error thresholds of earlier versions.",
    ),
]
MaxFpLayersOpt = Annotated[
    int | None,
    Opt(
        "--max-fp-layers", help="FP budget: at most N layers in FP (default: 10% of the layers, at least 1)."
    ),
]
MaxFpMacsOpt = Annotated[
    float | None, Opt("--max-fp-macs", help="FP budget: at most this fraction of the model's MACs in FP.")
]
ProbesOpt = Annotated[
    int | None,
    Opt(
        "--probes",
        help=(
            "Output probes per held-out batch (default: about 4 probe-samples, 1-4 a batch, 1 where a "
            "sample is too large for more; 0: off)."
        ),
    ),
]
StoredMbOpt = Annotated[
    float,
    Opt(
        "--stored-mb",
        help=(
            "MiB of layer outputs one piece of a held-out batch may store (0: whole batches). More scans "
            "faster and holds more memory."
        ),
    ),
]
CalChoiceOpt = Annotated[
    bool,
    Opt(
        "--calibrator-choice/--no-calibrator-choice",
        help="Offer each layer max / p99.9 / p99.99 / p99.999 / mse ranges (one histogram per layer).",
    ),
]
OutOpt = Annotated[Path | None, Opt("--out", help="Report folder (default reports/<model>).")]
OverwriteOpt = Annotated[bool, Opt("--overwrite", help="Replace an existing report folder.")]
ResumeOpt = Annotated[
    Path | None,
    Opt("--resume", help="Report folder of an interrupted scan: reuse its calibration (same inputs)."),
]
QuietOpt = Annotated[bool, Opt("--quiet", "-q", help="No progress bars.")]
