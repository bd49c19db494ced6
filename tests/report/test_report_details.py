"""The report's small promises (issue 14, items 20-22): an alpha sweep drawn on the whole α range however
few alphas were swept, "(BN-folded)" only on layers a BatchNorm was folded into, layers that never ran
named in the report, and a warning when decisions rest on few held-out samples."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sensitivity import ScanOptions, scan
from sensitivity.pipeline.options import ScanOptions as _Options
from sensitivity.pipeline.result import MIN_HELDOUT_SAMPLES
from sensitivity.report import render_report
from sensitivity.report.data import load_report_data
from sensitivity.report.plots.smoothquant import plot_alpha_sweeps, plot_histograms
from tests.report.test_report import write_synthetic_report

ROOT = Path(__file__).resolve().parents[2]


def _titles(fig) -> list[str]:  # type: ignore[no-untyped-def]
    return [ax.get_title(loc="left") for ax in fig.axes if ax.get_visible()]


def test_one_alpha_is_drawn_on_the_whole_alpha_range(tmp_path: Path) -> None:
    folder = write_synthetic_report(tmp_path / "r", n_layers=12)
    stats = dict(np.load(folder / "stats.npz"))
    for key in [k for k in stats if k.startswith("alpha_sweep/")]:
        stats[key] = stats[key][5:6]  # the default grid: one alpha (0.5)
    np.savez_compressed(folder / "stats.npz", **stats)
    fig = plot_alpha_sweeps(load_report_data(folder))
    assert fig is not None
    limits = [ax.get_xlim() for ax in fig.axes if ax.get_visible() and ax.get_title(loc="left")]
    assert limits and all(lo < 0.0 and hi > 1.0 for lo, hi in limits)  # not a 0.48..0.52 axis


def test_the_readme_states_the_default_alpha_grid() -> None:
    assert _Options().alphas == (0.5,)
    assert "`--alpha-grid 0.5` (default: one alpha" in (ROOT / "README.md").read_text()


def test_weight_histograms_say_bn_folded_only_where_a_batchnorm_was_folded(tmp_path: Path) -> None:
    folder = write_synthetic_report(tmp_path / "r", n_layers=12)
    info = json.loads((folder / "scan.json").read_text())
    table = load_report_data(folder).table
    folded = {str(n): f"{n}.bn" for n in table["name"][::2]}  # every other layer
    info["folded_bn"] = folded
    (folder / "scan.json").write_text(json.dumps(info))
    fig = plot_histograms(load_report_data(folder), k=12)
    assert fig is not None
    weights = [t for t in _titles(fig) if "· weights" in t]
    assert weights
    for title in weights:
        name = title.split(" · ")[0]
        layer = next(str(n) for n in table["name"] if str(n).endswith(name.lstrip("…")))
        assert ("(BN-folded)" in title) == (layer in folded), title


class HalfUsed(nn.Module):
    """`spare` is a conv the forward never calls: the report must name it, not drop it silently."""

    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Conv2d(3, 4, 3)
        self.spare = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


def test_layers_that_never_ran_are_named_in_the_report(tmp_path: Path) -> None:
    result = scan(HalfUsed(), [torch.randn(16, 3, 8, 8) for _ in range(4)], ScanOptions(alphas=()))
    assert "spare" in result.unscanned and "never ran" in result.unscanned["spare"]
    folder = Path(result.save(str(tmp_path / "report")))
    page = render_report(folder).read_text()
    assert "spare" in page and "never ran" in page


def test_few_held_out_samples_are_flagged_many_are_not() -> None:
    few = scan(HalfUsed(), [torch.randn(2, 3, 8, 8) for _ in range(4)], ScanOptions(alphas=()))
    assert any("held-out samples" in w for w in few.warnings)
    enough = [torch.randn(MIN_HELDOUT_SAMPLES, 3, 8, 8) for _ in range(4)]
    many = scan(HalfUsed(), enough, ScanOptions(alphas=()))
    assert not any("held-out samples" in w for w in many.warnings)


class SoftmaxWithoutDim(nn.Module):
    """A model whose own forward triggers a torch warning (softmax without dim)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).mean(dim=(2, 3))
        return F.softmax(self.fc(h))  # noqa: the implicit dim is the point


def test_a_warning_from_the_models_forward_points_at_the_model() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scan(SoftmaxWithoutDim(), [torch.randn(8, 3, 8, 8) for _ in range(4)], ScanOptions(alphas=()))
    ours = [w for w in caught if "Implicit dimension choice for softmax" in str(w.message)]
    assert ours and all(w.filename == __file__ for w in ours), {w.filename for w in ours}
