"""The command line as a user runs it: real subprocess-free invocations of `main()`, exit codes, files."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from sensitivity import ScanOptions
from sensitivity.cli import main
from tests.models import PlantedOutlierNet

MODELS = str(Path(__file__).with_name("models.py"))
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def planted(tmp_path: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    model = tmp_path / "planted.pth"
    torch.save(PlantedOutlierNet().state_dict(), model)
    calib = tmp_path / "calib.pt"
    torch.save(torch.randn(32, 3, 12, 12), calib)
    return model, calib


def _scan(model: Path, calib: Path, out: Path, *extra: str) -> int:
    return main(["scan", str(model), "--arch", f"{MODELS}:build_planted", "--calib", str(calib),
                 "--out", str(out), "--quiet", *extra])  # fmt: skip


def test_scan_writes_the_report_folder(planted: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    model, calib = planted
    out = tmp_path / "report"
    assert _scan(model, calib, out) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        ".sensitivity", "exclude.yaml", "layers.csv", "model_quant.pt", "plots", "policy.yaml", "quant_state.pt",
        "report.html", "scan.json", "stats.npz",
    ]  # fmt: skip
    exclude = yaml.safe_load((out / "exclude.yaml").read_text())
    assert [e["layer"] for e in exclude["exclude"]] == ["mid"]
    info = json.loads((out / "scan.json").read_text())
    assert info["calibration"] == {"batches": 4, "fit_batches": 3, "heldout_batches": 1, "ranks": 1}
    assert [row["config"] for row in info["comparison"]] == ["fp", "naive", "naive+exclusion", "policy"]
    printed = capsys.readouterr().out
    # the policy spends its one FP slot where the exclusion list does
    assert re.search(r"keeps 1 of 4 layers in FP; the policy: \d SmoothQuant, \d naive, 1 FP", printed)
    assert "mid" in printed


def test_existing_folder_needs_overwrite(planted: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    model, calib = planted
    out = tmp_path / "report"
    assert _scan(model, calib, out) == 0
    marker = out / "layers.csv"
    before = marker.read_bytes()
    assert _scan(model, calib, out) == 2
    err = capsys.readouterr().err
    assert "already exists: pass --overwrite" in err
    assert marker.read_bytes() == before
    assert _scan(model, calib, out, "--overwrite", "--batches", "2") == 0
    assert json.loads((out / "scan.json").read_text())["calibration"]["batches"] == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".report")]  # no temp leftovers


def test_user_edited_exclusion_list_is_honoured(planted: tuple[Path, Path], tmp_path: Path) -> None:
    model, calib = planted
    edited = tmp_path / "mine.yaml"
    edited.write_text("version: 1\nspec: W8A8\nexclude:\n  - layer: 'h*'\n    reason: mine\n")
    out = tmp_path / "r"
    assert _scan(model, calib, out, "--exclude", str(edited)) == 0
    exclude = yaml.safe_load((out / "exclude.yaml").read_text())
    assert [e["layer"] for e in exclude["exclude"]] == ["mid", "head"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--spec", "W1A8"], "weight bits must be an integer in 2..16, got 1"),
        (["--spec", "W8A17"], "activation bits must be an integer in 2..16, got 17"),
        (["--calibrator", "magic"], "unknown calibrator 'magic'"),
        (["--only", "nothing"], "no Conv / Linear / sparse-conv layer to quantize after --only/--skip"),
        (["--policy-by", "magic"], "unknown policy 'magic'; choose output or thresholds"),
        (["--probes", "65"], "--probes must be an integer in 0..64, got 65"),
        (["--probes=-1"], "--probes must be an integer in 0..64, got -1"),
        (["--max-fp-layers=-1"], "--max-fp-layers must be a non-negative integer, got -1"),
        (["--max-fp-macs", "1.5"], "--max-fp-macs must be a fraction in [0, 1], got 1.5"),
        (["--max-fp-macs", "nan"], "--max-fp-macs must be a fraction in [0, 1], got nan"),
        (["--stored-mb=-1"], "--stored-mb must be a number of MiB >= 0 (0: whole batches), got -1.0"),
        (["--stored-mb", "nan"], "--stored-mb must be a number of MiB >= 0 (0: whole batches), got nan"),
        (["--stored-mb", "inf"], "--stored-mb must be a number of MiB >= 0 (0: whole batches), got inf"),
    ],
)
def test_bad_options_are_one_red_line(planted, tmp_path: Path, capsys, args: list[str], message: str) -> None:
    model, calib = planted
    assert _scan(model, calib, tmp_path / "r", *args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert len(err.splitlines()) == 1
    assert "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_stored_mb_reaches_the_scan_and_keeps_its_numbers(planted, tmp_path: Path) -> None:
    """`--stored-mb` sets how many MiB of layer outputs a held-out piece stores: recorded in scan.json, the
    library's default when not given, and the isolated / cumulative errors the same whether the held-out
    batches run whole (0) or cut into one-sample pieces (a budget below one sample's outputs), and so are
    the output-referred estimates (the probes' random signs are drawn per sample)."""
    model, calib = planted
    runs = {}
    for mb in (None, "0", "0.0001"):
        out = tmp_path / f"r{mb}"
        assert _scan(model, calib, out, *(["--stored-mb", mb] if mb is not None else [])) == 0
        runs[mb] = (json.loads((out / "scan.json").read_text()), pd.read_csv(out / "layers.csv", index_col=0))
    assert runs[None][0]["options"]["stored_activation_mb"] == ScanOptions().stored_activation_mb
    assert runs["0"][0]["options"]["stored_activation_mb"] == 0.0
    assert runs["0.0001"][0]["options"]["stored_activation_mb"] == 0.0001
    whole, cut = runs["0"][1], runs["0.0001"][1]
    cols = [
        c for c in whole.columns if c.startswith(("iso_naive_", "cum_naive_")) and whole[c].dtype.kind == "f"
    ]
    assert cols
    for c in cols:
        # 1e-4 relative as in the pass tests (convs differ in rounding between batch sizes, and layers.csv
        # keeps 6 significant digits); 1e-6 absolute for errors near zero (outputs here are about 1)
        assert np.allclose(whole[c], cut[c], rtol=1e-4, atol=1e-6, equal_nan=True), c
    estimates = [c for c in whole.columns if c.startswith("out_") and c.endswith("_err")]
    assert "out_naive_err" in estimates and "out_sq_channel_0.5_err" in estimates
    for c in estimates:
        # the same signs per sample leave float rounding, which at a rounding boundary can flip one fake-quant
        # code: a few percent of an error 1e5 times below the largest (per-piece signs moved that one by 38%)
        scale = float(np.nanmax(np.abs(whole[c])))
        assert np.allclose(whole[c], cut[c], rtol=1e-3, atol=1e-3 * scale, equal_nan=True), c
    assert whole["decision"].tolist() == cut["decision"].tolist()
    assert whole["calibrator"].tolist() == cut["calibrator"].tolist()


def test_rejected_batch_and_missing_files(planted, tmp_path: Path, capsys) -> None:
    model, _ = planted
    bad = tmp_path / "bad.pt"
    torch.save(torch.randn(8, 5, 12, 12), bad)
    assert _scan(model, bad, tmp_path / "r") == 2
    err = capsys.readouterr().err
    assert "the model rejected calibration batch 0 (tensor float32[8, 5, 12, 12])" in err
    assert _scan(tmp_path / "nope.pth", bad, tmp_path / "r") == 2
    assert "nope.pth" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_demo_end_to_end(trained_digits, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    _, cache, _ = trained_digits
    monkeypatch.setenv("SENSITIVITY_CACHE", str(cache))
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "top-1 accuracy on 1000" in printed
    assert "W4A8" in printed and "policy (sensitivity" in printed
    assert (tmp_path / "demo-w4a8" / "layers.csv").exists()
    assert (out / "layers.csv").exists()
    rows = (out / "layers.csv").read_text().splitlines()
    assert len(rows) == 1 + 7  # header + the CNN's 6 convs and its classifier


def test_scan_of_a_batchnorm_model_through_the_cli(tmp_path: Path) -> None:
    # BN buffers include 0-d integer tensors (num_batches_tracked): the resume fingerprint must hash them
    torch.manual_seed(0)
    from tests.models import TinyConvNet

    torch.save(TinyConvNet().state_dict(), tmp_path / "tiny.pth")
    torch.save(torch.randn(16, 3, 12, 12), tmp_path / "calib.pt")
    args = [
        "scan",
        str(tmp_path / "tiny.pth"),
        "--arch",
        f"{MODELS}:build_tiny",
        "--calib",
        str(tmp_path / "calib.pt"),
    ]
    assert main([*args, "--out", str(tmp_path / "r"), "-q"]) == 0
    assert json.loads((tmp_path / "r" / "scan.json").read_text())["folded_bn"] == {
        "stem.0": "stem.1",
        "conv1": "bn1",
    }


def test_piped_output_keeps_tables_whole_and_shows_the_eval_metric(
    planted: tuple[Path, Path], tmp_path: Path
) -> None:
    """Piped (no terminal, no COLUMNS): tables are not wrapped at 80 columns, and `--eval`'s metric is a
    column of the console's comparison table, not only in scan.json."""
    model, calib = planted
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, "-m", "sensitivity", "scan", str(model), "--arch", f"{MODELS}:build_planted",
         "--calib", str(calib), "--out", str(tmp_path / "r"), "--eval", f"{MODELS}:planted_confidence"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    header = next(line for line in proc.stdout.splitlines() if "config" in line and "out rel MSE" in line)
    assert "confidence" in header and len(header) > 80
    rows = [line for line in proc.stdout.splitlines() if line.startswith("│ naive ")]
    assert rows and all(line.rstrip().endswith("│") for line in rows)  # one line per row: not wrapped


class _InterruptOnImport:
    """A meta-path finder that turns `import <name>` into a Ctrl-C, as if the user pressed it while the
    command imported its lazy dependencies."""

    def __init__(self, name: str) -> None:
        self.name = name

    def find_spec(self, fullname: str, path: object, target: object = None) -> None:
        if fullname == self.name or fullname.startswith(self.name + "."):
            raise KeyboardInterrupt
        return None


def test_ctrl_c_while_apply_imports_onnx_is_an_interrupt(
    planted: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Ctrl-C during `apply --onnx`'s start-up (importing onnx) ends it like any Ctrl-C: exit 130, one line,
    and no model files (a Ctrl-C inside an import must not pass for a missing package, nor exit 0)."""
    model, calib = planted
    out = tmp_path / "report"
    assert _scan(model, calib, out) == 0
    capsys.readouterr()
    before = sorted(p.name for p in out.iterdir())
    for name in [m for m in sys.modules if m == "onnx" or m.startswith("onnx.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_InterruptOnImport("onnx"), *sys.meta_path])
    argv = [
        "apply",
        str(model),
        "--arch",
        f"{MODELS}:build_planted",
        "--policy",
        str(out / "policy.yaml"),
        "--onnx",
    ]
    assert main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["interrupted: no model was written"]
    assert sorted(p.name for p in out.iterdir()) == before
