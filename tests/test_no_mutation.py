"""The user's model is never modified, and a scan is reproducible.

- through the Python API, the FP model object (parameters, buffers, requires_grad, train/eval mode, hooks,
  module types) is the same after `scan`, `ScanResult.save`, `quantized_model` and `apply_policy`, for
  models whose BatchNorm is folded and whose SmoothQuant division is folded into the producer conv;
- through the CLI, the checkpoint (and calibration, policy, quant state) files' bytes are the same after
  `scan` and `apply`;
- two CLI scans with the same inputs and `--seed` write byte-identical layers.csv, exclude.yaml and
  policy.yaml, and the same scan.json apart from its timings, whatever the global RNG state.

(test_scan.py checks a planted model's weights after an API scan and the API's report determinism; test_resume.py
that a resumed scan writes the same files as a fresh one.)
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from sensitivity import ScanOptions, apply_policy, scan
from sensitivity.cli import main
from tests.models import FoldableOutliers, PlantedOutlierNet, TinyConvNet

MODELS = str(Path(__file__).resolve().with_name("models.py"))
ARCH = ["--arch", f"{MODELS}:build_planted"]


def _batches(n: int = 4, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 12, 12, generator=g) for _ in range(n)]


def _snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything about the model object a scan could change: tensors bitwise, flags, hooks, structure."""
    tensors = {f"param:{n}": p.detach().clone() for n, p in model.named_parameters()}
    tensors |= {f"buffer:{n}": b.clone() for n, b in model.named_buffers()}
    return {
        "tensors": tensors,
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "types": {n: type(m) for n, m in model.named_modules()},
        "hooks": sum(
            len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
            for m in model.modules()
        ),
        "attrs": sorted(vars(model)),
    }


def _assert_same(before: dict[str, Any], model: nn.Module, after_what: str) -> None:
    now = _snapshot(model)
    assert now["tensors"].keys() == before["tensors"].keys(), after_what
    for key, t in before["tensors"].items():
        assert torch.equal(now["tensors"][key], t), f"{key} changed by {after_what}"
    for field in ("requires_grad", "training", "types", "hooks", "attrs"):
        assert now[field] == before[field], f"{field} changed by {after_what}"


@pytest.mark.parametrize("train_mode", [False, True])
@pytest.mark.parametrize(
    "factory",
    [TinyConvNet, FoldableOutliers],  # BN folded into the convs; SmoothQuant's 1/s folded into `a`
    ids=["bn-fold", "smoothquant-fold"],
)
def test_api_leaves_the_fp_model_untouched(
    factory: type[nn.Module], train_mode: bool, tmp_path: Path
) -> None:
    model = factory().train(train_mode)
    if not train_mode:
        for p in model.parameters():
            p.requires_grad_(False)  # a frozen model stays frozen; a trainable one trainable
    before, reference = _snapshot(model), copy.deepcopy(model)
    # no FP slot: SmoothQuant repairs FoldableOutliers' `b` (the default's one slot would keep it in FP)
    result = scan(model, _batches(), ScanOptions(alphas=(0.5,), max_fp_layers=0))
    _assert_same(before, model, "scan")
    if factory is FoldableOutliers:  # the folding this model is here for did happen (on copies)
        assert result.policy.method_for("b") == "smoothquant" and result.quant_state.sq_fold["b"] == "a"
    else:
        assert result.folded_bn
    result.save(str(tmp_path / "report"), report=False)  # builds model_quant.pt from the scan's model
    result.quantized_model()
    _assert_same(before, model, "ScanResult.save / quantized_model")
    qmodel = apply_policy(model, result.policy, result.quant_state)
    _assert_same(before, model, "apply_policy")
    with torch.no_grad():  # and the FP model still computes what it computed before
        x = _batches(1, seed=5)[0]
        assert torch.equal(model.eval()(x), reference.eval()(x))
        assert not torch.equal(qmodel(x), model(x))  # the quantized copy is a different model


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def two_scans(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two CLI scans of the same files with `--seed 7`, the global RNG seeded differently before each."""
    work = tmp_path_factory.mktemp("no-mutation")
    torch.save(PlantedOutlierNet().state_dict(), work / "model.pth")
    torch.save(torch.randn(32, 3, 12, 12, generator=torch.Generator().manual_seed(0)), work / "calib.pt")
    inputs = {name: _sha256(work / name) for name in ("model.pth", "calib.pt")}
    mtimes = {name: (work / name).stat().st_mtime_ns for name in inputs}
    reports = []
    for i, global_seed in enumerate((1, 12345)):
        torch.manual_seed(global_seed)
        out = work / f"report{i}"
        argv = ["scan", str(work / "model.pth"), *ARCH, "--calib", str(work / "calib.pt")]
        assert main([*argv, "--alpha-grid", "0.25,0.5,0.75", "--seed", "7", "--out", str(out), "-q"]) == 0
        reports.append(out)
    return {"work": work, "inputs": inputs, "mtimes": mtimes, "reports": reports}


def test_cli_scan_and_apply_leave_the_files_untouched(two_scans: dict[str, Any], capsys) -> None:
    work, report = two_scans["work"], two_scans["reports"][0]
    assert {name: _sha256(work / name) for name in two_scans["inputs"]} == two_scans["inputs"]
    assert {name: (work / name).stat().st_mtime_ns for name in two_scans["mtimes"]} == two_scans["mtimes"]
    kept = {name: _sha256(report / name) for name in ("policy.yaml", "quant_state.pt", "layers.csv")}
    policy = ["--policy", str(report / "policy.yaml")]
    assert main(["apply", str(work / "model.pth"), *ARCH, *policy]) == 0  # with the scan's quant_state.pt
    recalibrate = ["--calib", str(work / "calib.pt"), "--out", str(work / "recalibrated")]
    assert main(["apply", str(work / "model.pth"), *ARCH, *policy, *recalibrate]) == 0
    torch.save(PlantedOutlierNet(), work / "pickled.pth")  # a whole pickled module, trusted by its owner
    pickled = _sha256(work / "pickled.pth")
    trusted = ["--trust-pickle", "--out", str(work / "from-pickle")]
    assert main(["apply", str(work / "pickled.pth"), *policy, *trusted]) == 0
    assert _sha256(work / "pickled.pth") == pickled
    assert {name: _sha256(work / name) for name in two_scans["inputs"]} == two_scans["inputs"]
    assert {
        name: _sha256(report / name) for name in kept
    } == kept  # apply reads the report, never rewrites it
    assert (report / "model_quant.pt").is_file() and (work / "recalibrated" / "model_quant.pt").is_file()
    capsys.readouterr()


def test_cli_scans_with_the_same_seed_are_byte_identical(two_scans: dict[str, Any]) -> None:
    first, second = two_scans["reports"]
    for name in ("layers.csv", "exclude.yaml", "policy.yaml"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    infos = [json.loads((report / "scan.json").read_text()) for report in (first, second)]
    assert infos[0]["timings"] != {}  # the timings are the only part allowed to differ
    for info in infos:
        info.pop("timings")
    assert infos[0] == infos[1]
    assert infos[0]["seed"] == 7
