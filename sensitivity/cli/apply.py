"""`sensitivity apply`: the final quantized model from a policy (and ONNX / pytorch-quantization exports)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from sensitivity.cli.app import app
from sensitivity.cli.console import RichProgress, console, out
from sensitivity.cli.options import given
from sensitivity.errors import ConfigError, SpecError
from sensitivity.files import check_output_files, staged_files

__all__ = ["apply_cmd"]


@app.command("apply")
def apply_cmd(
    ctx: typer.Context,
    model: Annotated[Path, typer.Argument(help="The FP model the scan saw (same options as scan).")],
    policy: Annotated[Path, typer.Option("--policy", help="policy.yaml (from a scan; may be edited).")],
    pcdet_cfg: Annotated[
        Path | None,
        typer.Option(
            "--pcdet-cfg",
            help="OpenPCDet model config (needs pcdet): build the network from it and load MODEL into it, "
            "as scan --pcdet-cfg does.",
        ),
    ] = None,
    calib_split: Annotated[
        str, typer.Option("--calib-split", help="With --pcdet-cfg: recalibrate on this dataset split.")
    ] = "val",
    arch: Annotated[str | None, typer.Option("--arch", help="Model factory pkg.module:function.")] = None,
    arch_kwargs: Annotated[str | None, typer.Option("--arch-kwargs", help="JSON kwargs for --arch.")] = None,
    trust_pickle: Annotated[
        bool, typer.Option("--trust-pickle", help="Allow unpickling (runs code!).")
    ] = False,
    quant_state: Annotated[
        Path | None,
        typer.Option("--quant-state", help="Calibrated state (default: quant_state.pt beside the policy)."),
    ] = None,
    calib: Annotated[str | None, typer.Option("--calib", help="Recalibrate on this data instead.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 8,
    batches: Annotated[int | None, typer.Option("--batches")] = None,
    onnx: Annotated[
        bool, typer.Option("--onnx", help="Also export model_quant.onnx (Q/DQ) and verify it.")
    ] = False,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset (>= 13).")] = 17,
    fmt: Annotated[
        str,
        typer.Option(
            "--format", help="native (model_quant.pt) or pytorch-quantization (also its amax layout)."
        ),
    ] = "native",
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Folder (default: the policy's folder).")
    ] = None,
) -> None:
    """Build the final quantized model from a policy: FP / naive / SmoothQuant per layer."""
    from sensitivity.apply import apply_policy, load_quant_state
    from sensitivity.policy import load_policy

    if fmt not in ("native", "pytorch-quantization"):
        raise ConfigError(f"--format must be native or pytorch-quantization, got {fmt!r}")
    if onnx:
        from sensitivity.export import check_opset

        check_opset(opset)
    folder = out_dir or policy.parent
    outputs = ["model_quant.pt"]
    if onnx:
        outputs += ["model_quant.onnx", "export.json", "sparse_scales.json"]
    if fmt == "pytorch-quantization":
        outputs += ["model_quant_pytorch_quantization.pt", "model_quant_pytorch_quantization.json"]
    inputs = [model, policy, quant_state or policy.with_name("quant_state.pt"), calib, pcdet_cfg]
    folder = check_output_files(folder, outputs, inputs)  # no input overwritten, no user file replaced
    out.print(f"applying [bold]{policy}[/bold] to [bold]{model}[/bold]", soft_wrap=True)
    net, data = _model_and_data(ctx, model, pcdet_cfg, calib, calib_split, arch, arch_kwargs, trust_pickle,
                                batch_size, batches)  # fmt: skip
    if data is not None:
        from sensitivity.pipeline import calibrate_quant_state
        from sensitivity.spec import QuantSpec

        pol = load_policy(policy)
        state = calibrate_quant_state(net, data, pol, QuantSpec.parse(pol.spec), progress=RichProgress())
    else:
        state = load_quant_state(quant_state or policy.with_name("quant_state.pt"))
        pol = load_policy(policy, layers=list(state.layers))
    qmodel = apply_policy(net, pol, state)
    _write_applied(qmodel, state, folder, fmt, onnx, opset)


def _model_and_data(
    ctx: typer.Context, model: Path, pcdet_cfg: Path | None, calib: str | None, calib_split: str,
    arch: str | None, arch_kwargs: str | None, trust_pickle: bool, batch_size: int, batches: int | None,
) -> tuple[Any, list[Any] | None]:  # fmt: skip
    """The FP network (from the model file, or an OpenPCDet config) and the data to recalibrate on (None:
    use the scan's quant state)."""
    if pcdet_cfg is not None:
        from sensitivity.cli.pcdet import pcdet_inputs

        recalibrate = calib is not None or given(ctx, "calib_split")
        return pcdet_inputs(ctx, model, pcdet_cfg, calib, calib_split, arch, arch_kwargs, trust_pickle,
                            batch_size, batches, need_data=recalibrate)  # fmt: skip
    if given(ctx, "calib_split"):
        raise SpecError("--calib-split chooses an OpenPCDet dataset split: it needs --pcdet-cfg")
    from sensitivity.data import load_calibration
    from sensitivity.integrations import activate
    from sensitivity.load import load_model

    net = activate(load_model(model, arch=arch, arch_kwargs=arch_kwargs, trust_pickle=trust_pickle))
    data = None if calib is None else load_calibration(calib, batch_size=batch_size, max_batches=batches)
    return net, data


def _write_applied(qmodel: Any, state: Any, folder: Path, fmt: str, onnx: bool, opset: int) -> None:
    """apply's outputs, staged and moved into `folder` together (an interrupt leaves all or none); an ONNX
    export that fails keeps model_quant.pt and export.json (which records the failure), then says why."""
    from sensitivity.apply import save_quantized
    from sensitivity.export import ExportError

    failed: ExportError | None = None
    check: dict[str, Any] = {}
    with staged_files(folder) as tmp:
        if fmt == "pytorch-quantization":
            # first: a layer that layout cannot express refuses before anything is written
            from sensitivity.integrations.pytorch_quantization import save_amax_state_dict

            save_amax_state_dict(qmodel, tmp / "model_quant_pytorch_quantization.pt")
        save_quantized(qmodel, tmp / "model_quant.pt")
        if onnx:
            from sensitivity.export import export_and_verify

            try:
                check = export_and_verify(qmodel, state.example_input, tmp, opset)
            except ExportError as exc:
                failed = exc
    if fmt == "pytorch-quantization":
        out.print(f"wrote [bold]{folder / 'model_quant_pytorch_quantization.pt'}[/bold] and its .json sidecar "
                  "(pytorch-quantization _amax layout)", soft_wrap=True)  # fmt: skip
    out.print(f"wrote [bold]{folder / 'model_quant.pt'}[/bold]", soft_wrap=True)
    if failed is not None:
        raise failed
    if onnx:
        from sensitivity.export import tensorrt_warnings

        if "sparse_scales" in check:
            out.print(f"wrote [bold]{folder / 'sparse_scales.json'}[/bold] (the sparse layers' int8 scales)",
                      soft_wrap=True)  # fmt: skip
        kernels = (
            "with ORT's int8 kernels"
            if check["int8_kernel_nodes"]
            else "with ORT's optimisations (it fused no int8 kernels here)"
        )
        out.print(
            f"wrote [bold]{folder / 'model_quant.onnx'}[/bold]: ONNX Runtime vs torch max |diff| "
            f"{check['max_abs_diff_qdq_reference']:.3g} (Q/DQ as written; outputs up to {check['output_absmax']:.3g}), "
            f"{check['max_abs_diff_int8_kernels']:.3g} {kernels}",
            soft_wrap=True,
        )
        color = "green" if check["verdict"] == "ok" else "red"
        out.print(
            f"parity [{color}]{check['verdict']}[/{color}]: {escape(check['verdict_reason'])}", soft_wrap=True
        )
        for warning in tensorrt_warnings(qmodel):
            console.print(f"[yellow]warning:[/yellow] {warning}", soft_wrap=True)
