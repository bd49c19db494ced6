"""Command line: parses options and delegates. User errors become one red line and exit code 2."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from sensitivity.errors import SensitivityError, SpecError
from sensitivity.files import (
    InterruptHandlers,
    Terminated,
    check_output_dir,
    check_output_files,
    default_report_name,
    staged_files,
)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Find the layers that quantization breaks, and decide per layer: FP, naive W8A8, or SmoothQuant.",
    pretty_exceptions_enable=False,
)
def _console(stderr: bool = False) -> Console:
    """A rich console; when not writing to a terminal (piped, redirected) tables are not squeezed into 80
    columns, so layer names stay on one line."""
    probe = Console(stderr=stderr)
    return probe if probe.is_terminal else Console(stderr=stderr, width=max(probe.width, 200))


console = _console(stderr=True)
out = _console()


class RichProgress:
    """A rich progress bar per scan phase (the library only calls phase()/note())."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    @contextmanager
    def phase(self, name: str, total: int) -> Iterator[Callable[[], None]]:
        if not self.enabled:
            yield lambda: None
            return
        with Progress(
            TextColumn("[bold blue]{task.description:<18}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        ) as bar:
            task = bar.add_task(name, total=total)
            yield lambda: bar.advance(task)

    def note(self, message: str) -> None:
        console.print(f"[dim]{message}[/dim]")


def _split(values: list[str] | None) -> tuple[str, ...]:
    items: list[str] = []
    for v in values or []:
        items.extend(p.strip() for p in v.split(",") if p.strip())
    return tuple(items)


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        if value != value:
            return "-"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return f"{value:.{digits}g}"
    return str(value)


def print_summary(result: Any, out_dir: Path | None, top: int = 10) -> None:
    """The comparison table (with the user metric when there is one) and the worst layers."""
    comp = Table(
        title=f"{result.model_name}: {result.spec.name} ({result.spec.calibrator}) on held-out batches"
    )
    evals = [c for c in result.comparison.columns if str(c).startswith("eval_")]
    cols = ("config", "quantized", "FP", "SQ", "out rel L1", "out SQNR dB", "cosine", "non-finite")
    for col in (*cols, *(c.removeprefix("eval_") for c in evals)):
        comp.add_column(col, justify="right" if col != "config" else "left", no_wrap=True)
    for row in result.comparison.to_dict(orient="records"):
        comp.add_row(
            row["config"],
            str(row["quantized_layers"]),
            str(row["fp_layers"]),
            str(row.get("smoothquant_layers", 0)),
            _fmt(row["out_rel_l1"]),
            _fmt(row["out_sqnr_db"]),
            _fmt(row["out_cosine"], 6),
            _fmt(int(row["out_nonfinite"])),
            *(_fmt(row[c]) for c in evals),
        )
    out.print(comp)
    per_output = result.output_comparison
    if len(per_output) and per_output["output"].nunique() > 1:
        t = Table(title="per model output (held-out batches)")
        for col in ("config", "output", "rel L1", "SQNR dB", "cosine", "max |err|", "non-finite"):
            t.add_column(col, justify="left" if col in ("config", "output") else "right", no_wrap=True)
        for r in per_output.to_dict(orient="records"):
            cells = (_fmt(r["out_rel_l1"]), _fmt(r["out_sqnr_db"]), _fmt(r["out_cosine"], 6), _fmt(r["out_max_abs"]))
            t.add_row(r["config"], r["output"], *cells, _fmt(int(r["out_nonfinite"])))
        out.print(t)
    table = result.table
    worst = table.sort_values("iso_naive_rel_l1", ascending=False, na_position="first").head(top)
    t = Table(title=f"worst {len(worst)} of {len(table)} layers (isolated error)")
    for col in ("#", "layer", "type", "iso rel L1", "iso SQNR dB", "cum rel L1", "non-finite", "decision"):
        t.add_column(col, justify="left" if col in ("layer", "type", "decision") else "right", no_wrap=True)
    for name, row in worst.iterrows():
        decision = row["decision"]
        style = "red" if decision == "fp" else None
        t.add_row(
            str(row["order"]),
            str(name),
            row["type"],
            _fmt(row["iso_naive_rel_l1"]),
            _fmt(row["iso_naive_sqnr_db"]),
            _fmt(row["cum_naive_rel_l1"]),
            _fmt(int(row["iso_naive_nonfinite"] + row["cum_naive_nonfinite"])),
            decision,
            style=style,
        )
    out.print(t)
    if result.first_nonfinite:
        out.print(
            f"[red]first non-finite values in the quantized model at: {escape(result.first_nonfinite)}[/red]",
            soft_wrap=True,
        )
    decisions = table["decision"].value_counts()
    out.print(
        f"naive+exclusion keeps {len(result.excluded)} of {len(table)} layers in FP; the policy: "
        f"{decisions.get('smoothquant', 0)} SmoothQuant, {decisions.get('naive', 0)} naive, "
        f"{decisions.get('fp', 0)} FP",
        soft_wrap=True,
    )
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}", soft_wrap=True, highlight=False)
    if out_dir is not None:
        out.print(f"report written to [bold]{escape(str(out_dir))}[/bold]", soft_wrap=True)


def _check_device(device: str) -> str:
    """`cpu` / `cuda` / `cuda:N`, refused in one line when this machine cannot run it."""
    import torch

    from sensitivity.errors import SpecError

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


@app.command()
def scan(
    ctx: typer.Context,
    model: Annotated[
        Path,
        typer.Argument(
            help="State dict (.pth/.pt/.safetensors), TorchScript, or pickled module; with --pcdet-cfg, "
            "the OpenPCDet checkpoint."
        ),
    ],
    calib: Annotated[
        str | None,
        typer.Option(
            "--calib",
            help="Calibration data: .pt/.npz file, folder, or pkg.mod:fn (not needed with --pcdet-cfg).",
        ),
    ] = None,
    pcdet_cfg: Annotated[
        Path | None,
        typer.Option(
            "--pcdet-cfg",
            help="OpenPCDet model config (needs pcdet): build the network from it, load MODEL into it, "
            "calibrate on --batches (default 16) of its dataset's frames, --batch-size (default 1) per batch; "
            "--outputs defaults to pred_dicts (the head outputs, before box decoding and NMS).",
        ),
    ] = None,
    calib_split: Annotated[
        str, typer.Option("--calib-split", help="With --pcdet-cfg: the dataset split to calibrate on.")
    ] = "val",
    arch: Annotated[str | None, typer.Option("--arch", help="Model factory pkg.module:function.")] = None,
    arch_kwargs: Annotated[str | None, typer.Option("--arch-kwargs", help="JSON kwargs for --arch.")] = None,
    trust_pickle: Annotated[
        bool, typer.Option("--trust-pickle", help="Allow unpickling (runs code!).")
    ] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Samples per batch for tensor data.")] = 8,
    batches: Annotated[
        int | None, typer.Option("--batches", help="Use at most N calibration batches.")
    ] = None,
    spec: SpecOpt = "W8A8",
    calibrator: CalibOpt = "max",
    percentile: PercOpt = 99.99,
    act_sign: SignOpt = "signed",
    only: Annotated[list[str] | None, typer.Option("--only", help="Glob(s) of layers to scan.")] = None,
    skip: Annotated[
        list[str] | None, typer.Option("--skip", help="Glob(s) of layers to leave alone.")
    ] = None,
    fold_bn: Annotated[
        bool, typer.Option("--fold-bn/--no-fold-bn", help="Fold BatchNorm into convs.")
    ] = True,
    exclude: Annotated[
        Path | None, typer.Option("--exclude", help="A (user-edited) exclude.yaml to honour.")
    ] = None,
    outputs: Annotated[
        list[str] | None,
        typer.Option("--outputs", help="Output dict keys that count, or pkg.module:function -> {name: tensor}."),
    ] = None,
    max_rel_l1: Annotated[float | None, typer.Option("--max-rel-l1", help="Exclude above this.")] = None,
    min_sqnr_db: Annotated[float | None, typer.Option("--min-sqnr-db", help="Exclude below this.")] = None,
    holdout: Annotated[float, typer.Option("--holdout", help="Fraction of batches held out.")] = 0.25,
    device: Annotated[
        str, typer.Option("--device", help="cpu, cuda or cuda:N (under torchrun: cuda = LOCAL_RANK).")
    ] = "cpu",
    alpha_grid: Annotated[
        str, typer.Option("--alpha-grid", help="SmoothQuant alphas: 0.5 | 0.25,0.5,0.75 | 0.1:0.9:0.1.")
    ] = "0.5",
    smoothquant: Annotated[
        bool, typer.Option("--smoothquant/--no-smoothquant", help="Score SmoothQuant per layer.")
    ] = True,
    sq_granularity: Annotated[
        str,
        typer.Option(
            "--sq-granularity", help="channel (deployable) and/or im2col (research), comma-separated."
        ),
    ] = "channel",
    sq_mode: Annotated[
        str, typer.Option("--sq-mode", help="static (deployable) or dynamic (research).")
    ] = "static",
    sq_margin: Annotated[
        float, typer.Option("--sq-margin", help="SmoothQuant must cut isolated rel. L1 to this x naive.")
    ] = 0.5,
    eval_fn: Annotated[
        str | None,
        typer.Option("--eval", help="pkg.module:function, model -> {metric: value} (higher is better)."),
    ] = None,
    eval_metric: Annotated[
        str | None, typer.Option("--eval-metric", help="Metric key for the budget.")
    ] = None,
    exclude_budget: Annotated[
        float | None,
        typer.Option("--exclude-budget", help="Exclude layers until the metric is within this of FP."),
    ] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Report folder (default reports/<model>).")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing report folder.")
    ] = False,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume", help="Report folder of an interrupted scan: reuse its calibration (same inputs)."
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Scan a model: per-layer isolated and cumulative error, exclusions, report folder."""
    from sensitivity import distributed
    from sensitivity.data import load_calibration
    from sensitivity.load import load_model
    from sensitivity.policy import Thresholds, load_exclude
    from sensitivity.quant.spec import QuantSpec
    from sensitivity.scan import ScanOptions
    from sensitivity.scan import scan as run_scan
    from sensitivity.smoothquant import parse_alpha_grid

    qspec = QuantSpec.parse(spec, calibrator=calibrator, percentile=percentile, act_sign=act_sign)
    if resume is not None and out_dir is not None and resume != out_dir:
        from sensitivity.errors import SpecError

        raise SpecError("--resume DIR writes the report into DIR: drop --out or give the same folder")
    target = resume or out_dir or Path("reports") / default_report_name(model)
    inputs = [model, calib, exclude, pcdet_cfg]
    device = _check_device(device)
    distributed.init_from_env(device)  # under torchrun: join the group; each rank scans its shard
    if device == "cuda" and distributed.is_distributed():
        import os

        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    main_rank = distributed.is_main()
    if main_rank:  # before any work: a folder that may not be written or replaced (files/folders.py)
        check_output_dir(target, overwrite, inputs)
    if pcdet_cfg is not None:
        net, data = _pcdet_inputs(ctx, model, pcdet_cfg, calib, calib_split, arch, arch_kwargs, trust_pickle,
                                  batch_size, batches)  # fmt: skip
        if not outputs:
            from sensitivity.integrations.pcdet import DEFAULT_OUTPUTS

            outputs = list(DEFAULT_OUTPUTS)
    else:
        _check_no_pcdet_options(ctx, calib)
        net = load_model(model, arch=arch, arch_kwargs=arch_kwargs, trust_pickle=trust_pickle)
        data = load_calibration(calib, batch_size=batch_size, max_batches=batches)
    thresholds = Thresholds()
    changes = {}
    if max_rel_l1 is not None:
        changes["max_rel_l1"] = max_rel_l1
    if min_sqnr_db is not None:
        changes["min_sqnr_db"] = min_sqnr_db
    if changes:
        from dataclasses import replace

        thresholds = replace(thresholds, **changes)
    user_exclude: tuple[str, ...] = tuple(load_exclude(exclude)) if exclude is not None else ()
    output_keys, output_fn = _outputs_option(outputs)
    options = ScanOptions(
        spec=qspec,
        only=_split(only),
        skip=_split(skip),
        fold_bn=fold_bn,
        holdout=holdout,
        thresholds=thresholds,
        exclude=user_exclude,
        outputs=output_keys,
        output_fn=output_fn,
        seed=seed,
        alphas=parse_alpha_grid(alpha_grid) if smoothquant else (),
        granularities=_split([sq_granularity]),
        sq_mode=sq_mode,
        sq_margin=sq_margin,
        eval_metric=eval_metric,
        exclude_budget=exclude_budget,
        device=device,
    )
    evaluate = None
    if eval_fn is not None:
        from sensitivity.errors import SpecError
        from sensitivity.load import resolve_callable

        evaluate = resolve_callable(eval_fn, "--eval", error=SpecError)
    elif exclude_budget is not None:
        from sensitivity.errors import SpecError

        raise SpecError("--exclude-budget needs --eval pkg.module:function to measure the metric")
    from sensitivity.resume import resume_path

    checkpoint = resume_path(target)
    result = run_scan(
        net, data, options, model_name=model.stem, progress=RichProgress(not quiet and main_rank), evaluate=evaluate,
        resume_file=checkpoint, resume=resume is not None,
    )  # fmt: skip
    if main_rank:  # one report, written by rank 0
        result.calibration["ranks"] = distributed.world_size()
        written = result.save(str(target), overwrite=overwrite, inputs=inputs)
        checkpoint.unlink(missing_ok=True)  # the report is complete: nothing left to resume
        print_summary(result, written)
    if distributed.is_distributed():
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


def _outputs_option(values: list[str] | None) -> tuple[tuple[str, ...], Any]:
    """--outputs: dict keys (`pred_dicts,boxes`), or one `pkg.module:function` / `file.py:function` that maps
    the model's output to named tensors."""
    keys = _split(values)
    specs = [k for k in keys if ":" in k]
    if not specs:
        return keys, None
    if len(keys) > 1:
        raise SpecError("--outputs takes dict keys or one pkg.module:function, not both")
    from sensitivity.load import resolve_callable

    return (), resolve_callable(specs[0], "--outputs", error=SpecError)


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether the option `name` was given on the command line (not left at its default)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def _check_no_pcdet_options(ctx: typer.Context, calib: str | None) -> None:
    """Without --pcdet-cfg: --calib is required and --calib-split means nothing."""
    from sensitivity.errors import SpecError

    if calib is None:
        raise SpecError(
            "missing option --calib (calibration data); for an OpenPCDet checkpoint pass --pcdet-cfg cfg.yaml"
        )
    if _given(ctx, "calib_split"):
        raise SpecError("--calib-split chooses an OpenPCDet dataset split: it needs --pcdet-cfg")


#: calibration batches taken from an OpenPCDet dataset when --batches is not given
PCDET_DEFAULT_BATCHES = 16


def _pcdet_inputs(
    ctx: typer.Context, model: Path, cfg: Path, calib: str | None, split: str, arch: str | None,
    arch_kwargs: str | None, trust_pickle: bool, batch_size: int, batches: int | None,
    need_data: bool = True,
) -> tuple[Any, list[Any] | None]:  # fmt: skip
    """(PcdetForward, batches) for `scan|apply MODEL --pcdet-cfg CFG`: the network from the config with the
    checkpoint's weights; batches from the config's dataset (--calib-split, --batches), or from --calib
    (e.g. a folder written by `pcdet-dump`), or None without --calib where `need_data` is False (apply
    with the scan's quant state). --batch-size counts frames per batch here and defaults to 1."""
    from sensitivity.errors import SpecError
    from sensitivity.integrations import pcdet

    pcdet.require_pcdet()  # first: the one line that matters where it is missing
    if arch is not None or arch_kwargs is not None:
        raise SpecError("--pcdet-cfg builds the network from the OpenPCDet config: drop --arch/--arch-kwargs")
    if calib is not None and _given(ctx, "calib_split"):
        raise SpecError("--calib and --calib-split both choose the calibration data: give one of them")
    if calib is not None or not need_data:
        from sensitivity.data import load_calibration

        net = pcdet.build_model(cfg, model, trust_pickle=trust_pickle)
        if calib is None:
            return net, None
        return net, load_calibration(calib, batch_size=batch_size, max_batches=batches)
    frames_per_batch = batch_size if _given(ctx, "batch_size") else 1
    n = batches if batches is not None else PCDET_DEFAULT_BATCHES
    net, loader = pcdet.build_from_config(cfg, model, split=split, batch_size=frames_per_batch,
                                          max_batches=n, trust_pickle=trust_pickle)  # fmt: skip
    return net, pcdet.calibration_batches(loader, n)


@app.command("pcdet-dump")
def pcdet_dump(
    cfg: Annotated[Path, typer.Option("--cfg", help="OpenPCDet model config (its DATA_CONFIG is used).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for batch_NNNNN.pt and pcdet_dump.json.")],
    split: Annotated[str, typer.Option("--split", help="Dataset split (a DATA_SPLIT name).")] = "val",
    batches: Annotated[
        int, typer.Option("--batches", help="Batches to write (frames evenly spaced over the split).")
    ] = PCDET_DEFAULT_BATCHES,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Frames per batch.")] = 1,
    workers: Annotated[int, typer.Option("--workers", help="DataLoader worker processes.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing folder.")] = False,
) -> None:
    """Write calibration batch_dicts from an OpenPCDet dataset to .pt files (needs pcdet): scan them later
    with --calib DIR, without the dataset code."""
    from sensitivity.integrations.pcdet import dump_batches

    written = dump_batches(cfg, split=split, n=batches, out_dir=out_dir, batch_size=batch_size,
                           workers=workers, overwrite=overwrite)  # fmt: skip
    out.print(
        f"wrote {len(written)} batches of the {split} split to [bold]{escape(str(out_dir))}[/bold]: scan them "
        f"with --calib {escape(str(out_dir))} (and --pcdet-cfg {escape(str(cfg))}, or --arch)",
        soft_wrap=True,
    )


@app.command()
def demo(
    out_dir: Annotated[Path | None, typer.Option("--out", help="Report folder.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing report folder.")] = True,
    spec: SpecOpt = "W8A8",
    lidar: Annotated[
        bool,
        typer.Option(
            "--lidar", help="CenterPoint-shaped LiDAR model on real point clouds (needs the lidar extra)."
        ),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Train (once, cached) a real model on real data, scan it, and compare FP / naive / policy results."""
    if lidar:
        from sensitivity.demo.lidar import run_lidar_demo

        run_lidar_demo(out_dir=out_dir or Path("reports/demo-centerpoint"), overwrite=overwrite, spec=spec,
                       progress=RichProgress(not quiet), console=out)  # fmt: skip
        return
    from sensitivity.demo.run import run_demo

    run_demo(out_dir=out_dir or Path("reports/demo-digits"), overwrite=overwrite,
             specs=(spec, "W4A8") if spec != "W4A8" else (spec,), progress=RichProgress(not quiet),
             console=out)  # fmt: skip


ReportDirArg = Annotated[
    Path, typer.Argument(help="A report folder written by scan (layers.csv, scan.json, stats.npz).")
]


@app.command()
def report(report_dir: ReportDirArg) -> None:
    """Re-render report.html and plots/ from a report folder's files (no model needed)."""
    from sensitivity.report import render_report

    written = render_report(report_dir)
    out.print(f"report written to [bold]{written}[/bold]")


@app.command()
def view(
    report_dir: ReportDirArg,
    no_browser: Annotated[
        bool, typer.Option("--no-browser", help="Do not open a browser: serve the folder on 127.0.0.1.")
    ] = False,
    port: Annotated[int, typer.Option("--port", help="Port to serve on (0: a free one).")] = 0,
) -> None:
    """Open report.html in a browser; where none can open (headless), serve it on 127.0.0.1."""
    from sensitivity.report import render_report
    from sensitivity.report.serve import make_server, open_in_browser

    html = report_dir / "report.html"
    if not html.is_file():
        html = render_report(report_dir)
    if not no_browser and open_in_browser(html):
        out.print(f"opened [bold]{html}[/bold] in the browser")
        return
    server = make_server(report_dir, port=port)
    out.print(f"serving {report_dir} at [bold]{server.url}[/bold]  (Ctrl-C to stop)", soft_wrap=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        console.print("stopped serving")
    finally:
        server.server_close()


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
    from sensitivity.errors import ConfigError
    from sensitivity.load import load_model
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
    if pcdet_cfg is not None:
        recalibrate = calib is not None or _given(ctx, "calib_split")
        net, data = _pcdet_inputs(ctx, model, pcdet_cfg, calib, calib_split, arch, arch_kwargs, trust_pickle,
                                  batch_size, batches, need_data=recalibrate)  # fmt: skip
    else:
        if _given(ctx, "calib_split"):
            raise SpecError("--calib-split chooses an OpenPCDet dataset split: it needs --pcdet-cfg")
        from sensitivity.data import load_calibration

        net = load_model(model, arch=arch, arch_kwargs=arch_kwargs, trust_pickle=trust_pickle)
        data = None if calib is None else load_calibration(calib, batch_size=batch_size, max_batches=batches)
    if data is not None:
        from sensitivity.quant.spec import QuantSpec
        from sensitivity.scan import calibrate_quant_state

        pol = load_policy(policy)
        state = calibrate_quant_state(net, data, pol, QuantSpec.parse(pol.spec), progress=RichProgress())
    else:
        state = load_quant_state(quant_state or policy.with_name("quant_state.pt"))
        pol = load_policy(policy, layers=list(state["layers"]))
    qmodel = apply_policy(net, pol, state)
    _write_applied(qmodel, state, folder, fmt, onnx, opset)


def _write_applied(qmodel: Any, state: dict[str, Any], folder: Path, fmt: str, onnx: bool, opset: int) -> None:
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
                check = export_and_verify(qmodel, state.get("example_input"), tmp, opset)
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


def _quiet_exit(message: str, code: int) -> int:
    console.print(f"[bold red]{message}[/bold red]: no report was written")
    return code


def main(argv: list[str] | None = None, *, restore_signals: bool = True) -> int:
    """Entry point: SensitivityError -> one red line + exit 2; Ctrl-C -> exit 130 and SIGTERM -> exit 143,
    nothing half-written (temp folders are removed on the way out). Signals that arrive once the command
    is done are ignored; `restore_signals=False` (the process entry points) keeps it so until exit."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    handlers = InterruptHandlers().install()
    try:
        return _main(argv, handlers)
    finally:
        handlers.done()
        if restore_signals:
            handlers.restore()
        else:
            handlers.ignore()


def run() -> int:
    """The `sensitivity` console script and `python -m sensitivity`."""
    return main(restore_signals=False)


def _main(argv: list[str] | None, handlers: InterruptHandlers) -> int:
    try:
        rv = app(args=argv, standalone_mode=False)
        if rv == 130:  # typer turns Ctrl-C into an exit code of 130 in non-standalone mode
            raise KeyboardInterrupt
        if isinstance(rv, int) and not isinstance(rv, bool) and rv != 0:
            return rv
    except SensitivityError as exc:
        # escaped: the message quotes user input (a spec, a path), which may look like rich markup
        console.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        handlers.done()  # a second Ctrl-C while saying so is ignored (no traceback)
        return _quiet_exit("interrupted", 130)
    except Terminated:
        handlers.done()
        return _quiet_exit("terminated", 143)
    except typer.Exit as exc:
        return int(exc.exit_code or 0)
    except typer.Abort:
        handlers.done()
        return _quiet_exit("interrupted", 130)
    except Exception as exc:  # usage errors (typer's click, vendored or not) show themselves
        if callable(getattr(exc, "show", None)) and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            return exc.exit_code
        if type(exc).__name__ == "Abort":  # click's own Abort where typer re-exports another class
            handlers.done()
            return _quiet_exit("interrupted", 130)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(run())
