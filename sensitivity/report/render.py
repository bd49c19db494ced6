"""`render_report(dir)`: one self-contained report.html (plots inlined as base64 PNG) plus plots/*.png.

Every file is written to a temporary name beside its target and moved into place with os.replace, so a
browser (or `sensitivity view`'s server) never reads half a page, and a failed render leaves the previous
report intact.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from sensitivity.files import atomic_write
from sensitivity.report.data import ReportData, ReportDataError, load_report_data
from sensitivity.report.plots import PLOTS, render_plots
from sensitivity.report.tables import comparison_table, format_number, layer_table, output_table

__all__ = ["render_html", "render_report"]

TEMPLATES = Path(__file__).with_name("templates")


def _environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=select_autoescape(["html", "j2"]),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = format_number
    return env


def _data_uri(text: str | bytes, mime: str) -> str:
    raw = text.encode("utf-8") if isinstance(text, str) else text
    return f"data:{mime};base64,{base64.b64encode(raw).decode('ascii')}"


def _seconds(value: Any) -> str:
    try:
        s = float(value)
    except (TypeError, ValueError):
        return "–"
    return f"{s:.2f} s" if s < 60 else f"{int(s // 60)} min {s % 60:.0f} s"


def _summary(data: ReportData) -> dict[str, Any]:
    scan = data.scan
    spec = scan.get("spec") or {}
    calib = scan.get("calibration") or {}
    calibrator = str(spec.get("calibrator", "?"))
    if calibrator == "percentile" and spec.get("percentile") is not None:
        calibrator += f" {spec['percentile']}"
    timings = scan.get("timings") or {}
    return {
        "model": scan.get("model", data.folder.name),
        "spec": spec.get("spec", "?"),
        "calibrator": calibrator,
        "act_sign": spec.get("act_sign", "signed"),
        "batches": calib.get("batches"),
        "fit_batches": calib.get("fit_batches"),
        "heldout_batches": calib.get("heldout_batches"),
        "layers": len(data.table),
        "excluded": len(data.scan.get("excluded") or []),  # exclude.yaml; the policy's FP count is beside it
        "decisions": data.table["decision"].value_counts().to_dict() if "decision" in data.table else {},
        "nonfinite_layers": len(data.nonfinite_layers()),
        "scan_time": _seconds(timings.get("total_s")),
        "timings": {k.removesuffix("_s"): _seconds(v) for k, v in timings.items()},
        "first_nonfinite": scan.get("first_nonfinite"),
        "policy_first_nonfinite": scan.get("policy_first_nonfinite"),
        "thresholds": (scan.get("options") or {}).get("thresholds") or {},
        "warnings": [str(w) for w in scan.get("warnings") or []],
        "unscanned": {str(k): str(v) for k, v in (scan.get("unscanned") or {}).items()},
    }


def _details(data: ReportData) -> list[tuple[str, str]]:
    """Key facts of scan.json for the collapsible details section (flat key -> text)."""
    scan = data.scan
    rows: list[tuple[str, str]] = []
    for key, value in (scan.get("spec") or {}).items():
        rows.append((f"spec.{key}", str(value)))
    for key, value in (scan.get("options") or {}).items():
        if isinstance(value, dict):
            rows += [(f"{key}.{k}", str(v)) for k, v in value.items()]
        else:
            rows.append((key, ", ".join(map(str, value)) if isinstance(value, list) else str(value)))
    rows.append(("seed", str(scan.get("seed"))))
    for key, value in (scan.get("timings") or {}).items():
        rows.append((f"time.{key}", _seconds(value)))
    for key, value in (scan.get("versions") or {}).items():
        rows.append((f"version.{key}", str(value)))
    folded = scan.get("folded_bn") or {}
    if folded:
        rows.append(("folded BN", f"{len(folded)} BatchNorm layers folded into their convs"))
    return rows


def render_html(data: ReportData, pngs: dict[str, bytes]) -> str:
    """The page as one string: CSS, JS, plots and YAML downloads all inline (no network at all)."""
    env = _environment()
    plots = [
        {"key": p.key, "title": p.title, "caption": p.caption, "src": _data_uri(pngs[p.key], "image/png")}
        for p in PLOTS
        if p.key in pngs
    ]
    files = []
    for name, text, mime in (
        ("exclude.yaml", data.exclude_yaml, "application/x-yaml"),
        ("policy.yaml", data.policy_yaml, "application/x-yaml"),
    ):
        files.append(
            {"name": name, "text": text, "href": _data_uri(text, mime) if text is not None else None}
        )
    csv_path = data.folder / "layers.csv"
    csv_href = _data_uri(csv_path.read_bytes(), "text/csv") if csv_path.is_file() else None
    return env.get_template("report.html.j2").render(
        title=f"{data.scan.get('model', data.folder.name)} · quantization sensitivity",
        summary=_summary(data),
        comparison=comparison_table(data),
        outputs=output_table(data),
        layers=layer_table(data),
        plots=plots,
        files=files,
        csv_href=csv_href,
        details=_details(data),
        css=Markup((TEMPLATES / "report.css").read_text(encoding="utf-8")),
        js=Markup((TEMPLATES / "report.js").read_text(encoding="utf-8")),
    )


def _write_atomic(path: Path, payload: bytes) -> None:
    atomic_write(path, lambda fh: fh.write(payload))


def render_report(report_dir: str | os.PathLike[str]) -> Path:
    """Re-render report.html and plots/*.png from a scan folder's files; returns report.html's path."""
    folder = Path(report_dir)
    data = load_report_data(folder)
    pngs = render_plots(data)
    page = render_html(data, pngs).encode("utf-8")
    try:
        plots_dir = folder / "plots"
        plots_dir.mkdir(exist_ok=True)
        for key, png in pngs.items():
            _write_atomic(plots_dir / f"{key}.png", png)
        for plot in PLOTS:  # a plot whose data is gone (e.g. a re-scan without sweeps) must not linger
            if plot.key not in pngs:
                (plots_dir / f"{plot.key}.png").unlink(missing_ok=True)
        target = folder / "report.html"
        _write_atomic(target, page)
    except OSError as exc:
        raise ReportDataError(f"cannot write the report into {folder}: {exc.strerror or exc}") from exc
    return target
