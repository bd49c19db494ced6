"""`sensitivity scan`: parse the options, load model and data, run the pipeline, write the report folder."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import typer

from sensitivity.cli.app import app
from sensitivity.cli.console import RichProgress
from sensitivity.cli.options import (
    AlphaOpt,
    ArchKwargsOpt,
    ArchOpt,
    BatchesOpt,
    BatchSizeOpt,
    BudgetOpt,
    CalChoiceOpt,
    CalibDataOpt,
    CalibOpt,
    CalibSplitOpt,
    DeviceOpt,
    EvalMetricOpt,
    EvalOpt,
    ExcludeOpt,
    FoldOpt,
    HoldoutOpt,
    MaxFpLayersOpt,
    MaxFpMacsOpt,
    MaxRelOpt,
    MinSqnrOpt,
    ModelArg,
    OnlyOpt,
    OutOpt,
    OutputsOpt,
    OverwriteOpt,
    PcdetCfgOpt,
    PercOpt,
    PolicyOpt,
    ProbesOpt,
    QuietOpt,
    ResumeOpt,
    SeedOpt,
    SignOpt,
    SkipOpt,
    SpecOpt,
    SqGranOpt,
    SqMarginOpt,
    SqModeOpt,
    SqOpt,
    StoredMbOpt,
    TrustOpt,
    check_device,
    outputs_option,
    split,
)  # fmt: skip
from sensitivity.cli.summary import print_summary
from sensitivity.errors import SpecError
from sensitivity.files import check_output_dir, default_report_name

__all__ = ["scan"]


@dataclass(frozen=True)
class ScanArgs:
    """The scan command's options, as given."""

    model: Path
    calib: str | None
    pcdet_cfg: Path | None
    calib_split: str
    arch: str | None
    arch_kwargs: str | None
    trust_pickle: bool
    batch_size: int
    batches: int | None
    spec: str
    calibrator: str
    percentile: float
    act_sign: str
    only: list[str] | None
    skip: list[str] | None
    fold_bn: bool
    exclude: Path | None
    outputs: list[str] | None
    max_rel_l1: float | None
    min_sqnr_db: float | None
    holdout: float
    device: str
    alpha_grid: str
    smoothquant: bool
    sq_granularity: str
    sq_mode: str
    sq_margin: float
    eval_fn: str | None
    eval_metric: str | None
    exclude_budget: float | None
    policy_by: str
    max_fp_layers: int | None
    max_fp_macs: float | None
    probes: int | None
    calibrator_choice: bool
    stored_mb: float
    seed: int
    out_dir: Path | None
    overwrite: bool
    resume: Path | None
    quiet: bool


@app.command()
def scan(
    ctx: typer.Context, model: ModelArg, calib: CalibDataOpt = None, pcdet_cfg: PcdetCfgOpt = None,
    calib_split: CalibSplitOpt = "val", arch: ArchOpt = None, arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustOpt = False, batch_size: BatchSizeOpt = 8, batches: BatchesOpt = None,
    spec: SpecOpt = "W8A8", calibrator: CalibOpt = "max", percentile: PercOpt = 99.99, act_sign: SignOpt = "signed",
    only: OnlyOpt = None, skip: SkipOpt = None, fold_bn: FoldOpt = True, exclude: ExcludeOpt = None,
    outputs: OutputsOpt = None, max_rel_l1: MaxRelOpt = None, min_sqnr_db: MinSqnrOpt = None,
    holdout: HoldoutOpt = 0.25, device: DeviceOpt = "cpu", alpha_grid: AlphaOpt = "0.5", smoothquant: SqOpt = True,
    sq_granularity: SqGranOpt = "channel", sq_mode: SqModeOpt = "static", sq_margin: SqMarginOpt = 0.5,
    eval_fn: EvalOpt = None, eval_metric: EvalMetricOpt = None, exclude_budget: BudgetOpt = None,
    policy_by: PolicyOpt = "output", max_fp_layers: MaxFpLayersOpt = None, max_fp_macs: MaxFpMacsOpt = None,
    probes: ProbesOpt = None, calibrator_choice: CalChoiceOpt = True, stored_mb: StoredMbOpt = 128.0,
    seed: SeedOpt = 0,
    out_dir: OutOpt = None, overwrite: OverwriteOpt = False, resume: ResumeOpt = None, quiet: QuietOpt = False,
) -> None:  # fmt: skip
    """Scan a model: each layer's error alone and in the whole model, its effect at the outputs, the policy
    (per layer: FP, naive with a calibrator range, or SmoothQuant) and the exclusion list, the report."""
    args = ScanArgs(**{k: v for k, v in locals().items() if k != "ctx"})
    run_scan_command(ctx, args)


def run_scan_command(ctx: typer.Context, args: ScanArgs) -> None:
    from sensitivity import distributed
    from sensitivity.integrations import activate
    from sensitivity.output import write_scan
    from sensitivity.pipeline import scan as run_scan
    from sensitivity.resume import resume_path

    options = _options(args)  # every option error before any work
    device = check_device(args.device)
    evaluate = _evaluate(args)
    if args.resume is not None and args.out_dir is not None and args.resume != args.out_dir:
        raise SpecError("--resume DIR writes the report into DIR: drop --out or give the same folder")
    target = args.resume or args.out_dir or Path("reports") / default_report_name(args.model)
    inputs = [args.model, args.calib, args.exclude, args.pcdet_cfg]
    with distributed.session(device) as device:  # torchrun: each rank scans its shard
        if distributed.is_main():  # before any work: a folder that may not be written or replaced
            check_output_dir(target, args.overwrite, inputs)
        net, data, default_outputs = _inputs(ctx, args)
        options = replace(options, device=device, outputs=options.outputs or default_outputs)
        checkpoint = resume_path(target)
        progress = RichProgress(not args.quiet and distributed.is_main())
        result = run_scan(
            activate(net), data, options, model_name=args.model.stem, progress=progress, evaluate=evaluate,
            resume_file=checkpoint, resume=args.resume is not None,
        )  # fmt: skip
        if distributed.is_main():  # one report, written by rank 0
            result.calibration["ranks"] = distributed.world_size()
            written = write_scan(result, target, overwrite=args.overwrite, inputs=inputs)
            checkpoint.unlink(missing_ok=True)  # the report is complete: nothing left to resume
            print_summary(result, written)


def _inputs(ctx: typer.Context, args: ScanArgs) -> tuple[Any, list[Any], tuple[str, ...]]:
    """(model, batches, the outputs that count unless --outputs says): from an OpenPCDet config (its head
    outputs), or from the model file and --calib (every output)."""
    if args.pcdet_cfg is not None:
        from sensitivity.cli.pcdet import pcdet_inputs
        from sensitivity.integrations.pcdet import DEFAULT_OUTPUTS

        net, data = pcdet_inputs(ctx, args.model, args.pcdet_cfg, args.calib, args.calib_split, args.arch,
                                 args.arch_kwargs, args.trust_pickle, args.batch_size, args.batches)  # fmt: skip
        return net, data, tuple(DEFAULT_OUTPUTS)
    from sensitivity.cli.pcdet import check_no_pcdet_options
    from sensitivity.data import load_calibration
    from sensitivity.load import load_model

    check_no_pcdet_options(ctx, args.calib)
    net = load_model(args.model, arch=args.arch, arch_kwargs=args.arch_kwargs, trust_pickle=args.trust_pickle)
    return net, load_calibration(args.calib or "", batch_size=args.batch_size, max_batches=args.batches), ()


def _options(args: ScanArgs) -> Any:
    from sensitivity.methods.smoothquant import parse_alpha_grid
    from sensitivity.pipeline import ScanOptions
    from sensitivity.policy import Thresholds, load_exclude
    from sensitivity.spec import QuantSpec

    spec = QuantSpec.parse(
        args.spec, calibrator=args.calibrator, percentile=args.percentile, act_sign=args.act_sign
    )
    limits = {"max_rel_l1": args.max_rel_l1, "min_sqnr_db": args.min_sqnr_db}
    thresholds = replace(Thresholds(), **{k: v for k, v in limits.items() if v is not None})
    output_keys, output_fn = outputs_option(args.outputs)
    return ScanOptions(
        spec=spec, only=split(args.only), skip=split(args.skip), fold_bn=args.fold_bn, holdout=args.holdout,
        thresholds=thresholds, exclude=tuple(load_exclude(args.exclude)) if args.exclude is not None else (),
        outputs=output_keys, output_fn=output_fn, seed=args.seed,  # a function wins over pcdet's default keys
        alphas=parse_alpha_grid(args.alpha_grid) if args.smoothquant else (),
        granularities=split([args.sq_granularity]), sq_mode=args.sq_mode, sq_margin=args.sq_margin,
        eval_metric=args.eval_metric, exclude_budget=args.exclude_budget, device=args.device,
        policy=args.policy_by, max_fp_layers=args.max_fp_layers, max_fp_macs=args.max_fp_macs,
        probes=args.probes, calibrator_choices=args.calibrator_choice, stored_activation_mb=args.stored_mb,
    )  # fmt: skip


def _evaluate(args: ScanArgs) -> Any:
    if args.eval_fn is not None:
        from sensitivity.io.callables import resolve_callable

        return resolve_callable(args.eval_fn, "--eval", error=SpecError)
    if args.exclude_budget is not None:
        raise SpecError("--exclude-budget needs --eval pkg.module:function to measure the metric")
    return None
