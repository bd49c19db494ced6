"""OpenPCDet on the command line: `scan --pcdet-cfg` builds the network and its calibration batches from the
config; `pcdet-dump` writes batches for scans without the dataset code."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from sensitivity.cli.app import app
from sensitivity.cli.console import out
from sensitivity.cli.options import given
from sensitivity.errors import SpecError

__all__ = ["PCDET_DEFAULT_BATCHES", "check_no_pcdet_options", "pcdet_dump", "pcdet_inputs"]


def check_no_pcdet_options(ctx: typer.Context, calib: str | None) -> None:
    """Without --pcdet-cfg: --calib is required and --calib-split means nothing."""
    if calib is None:
        raise SpecError(
            "missing option --calib (calibration data); for an OpenPCDet checkpoint pass --pcdet-cfg cfg.yaml"
        )
    if given(ctx, "calib_split"):
        raise SpecError("--calib-split chooses an OpenPCDet dataset split: it needs --pcdet-cfg")


#: calibration batches taken from an OpenPCDet dataset when --batches is not given
PCDET_DEFAULT_BATCHES = 16


def pcdet_inputs(
    ctx: typer.Context, model: Path, cfg: Path, calib: str | None, split: str, arch: str | None,
    arch_kwargs: str | None, trust_pickle: bool, batch_size: int, batches: int | None,
    need_data: bool = True,
) -> tuple[Any, list[Any] | None]:  # fmt: skip
    """(PcdetForward, batches) for `scan|apply MODEL --pcdet-cfg CFG`: the network from the config with the
    checkpoint's weights; batches from the config's dataset (--calib-split, --batches), or from --calib
    (e.g. a folder written by `pcdet-dump`), or None without --calib where `need_data` is False (apply
    with the scan's quant state). --batch-size counts frames per batch here and defaults to 1."""
    from sensitivity.integrations import pcdet

    pcdet.require_pcdet()  # first: the one line that matters where it is missing
    if arch is not None or arch_kwargs is not None:
        raise SpecError("--pcdet-cfg builds the network from the OpenPCDet config: drop --arch/--arch-kwargs")
    if calib is not None and given(ctx, "calib_split"):
        raise SpecError("--calib and --calib-split both choose the calibration data: give one of them")
    if calib is not None or not need_data:
        from sensitivity.data import load_calibration

        net = pcdet.build_model(cfg, model, trust_pickle=trust_pickle)
        if calib is None:
            return net, None
        return net, load_calibration(calib, batch_size=batch_size, max_batches=batches)
    frames_per_batch = batch_size if given(ctx, "batch_size") else 1
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
