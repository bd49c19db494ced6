"""Every input a user can get wrong, through the real command line (`sensitivity.cli.main`).

Each case must end in exactly one red line with the message below and exit code 2: no traceback, and
nothing left behind (no report folder, no `.partial` temp folder, no default `reports/`), except, for a
failure after the calibration pass, its checkpoint (kept for `--resume`, by design). The same errors
at the API level are covered in test_load.py, test_data.py, test_scan.py and policy/test_rules_io.py; the
Ctrl-C case (exit 130) and resume refusals in test_resume.py; the report command in test_report.py.
docs/errors.md lists every message.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from sensitivity.cli import main
from tests.cli_helpers import ARCH, MODELS, _scan
from tests.models import PlantedOutlierNet

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------- loading
def test_missing_model_file(work: Path, refused) -> None:
    argv = ["scan", str(work / "nope.pth"), "--arch", ARCH, "--calib", str(work / "calib.pt"), "--quiet"]
    refused(argv, f"model file not found: {work / 'nope.pth'}")  # and no reports/ folder


def test_truncated_checkpoint(work: Path, refused) -> None:
    raw = (work / "model.pth").read_bytes()
    (work / "cut.pth").write_bytes(raw[: len(raw) // 2])
    refused(
        _scan(work, model="cut.pth"),
        f"cannot read {work / 'cut.pth'}: the zip archive (torch.save format) is truncated or corrupt",
    )


def test_legacy_checkpoint_truncated(work: Path, refused) -> None:
    path = work / "old.pth"
    torch.save(PlantedOutlierNet().state_dict(), path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:-100])
    refused(
        _scan(work, model="old.pth"),
        f"cannot read {path}: the PyTorch checkpoint is truncated or corrupt",
    )


def _flip_weight_bytes(src: Path, dst: Path) -> None:
    """`src` with 8 bytes of its first tensor record overwritten (0xff: NaN floats), sizes unchanged."""
    raw = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as z:
        offset = next(i for i in z.infolist() if "/data/" in i.filename).header_offset
    name_len, extra_len = struct.unpack("<HH", raw[offset + 26 : offset + 30])  # the local header's
    start = offset + 30 + name_len + extra_len  # (torch pads records to 64 bytes in the extra field)
    raw[start : start + 8] = b"\xff" * 8
    dst.write_bytes(bytes(raw))


def test_corrupt_checkpoint_is_caught_by_its_crc(work: Path, refused) -> None:
    """torch.load does not check CRC-32s: without the check this file loads, with NaN weights."""
    _flip_weight_bytes(work / "model.pth", work / "flipped.pth")
    refused(
        _scan(work, model="flipped.pth"),
        f"cannot read {work / 'flipped.pth'}: the zip archive (torch.save format) is truncated or corrupt",
    )


def test_zip_that_is_not_a_checkpoint(work: Path, refused) -> None:
    with zipfile.ZipFile(work / "weights.pth", "w") as z:
        z.writestr("readme.txt", "not weights")
    refused(
        _scan(work, model="weights.pth"),
        f"{work / 'weights.pth'} is a zip archive but not a PyTorch checkpoint or TorchScript archive "
        "(it has no data.pkl)",
    )


@pytest.mark.parametrize(
    ("arch", "message"),
    [
        (
            "no_such_pkg.models:build",
            "--arch 'no_such_pkg.models:build': cannot import no_such_pkg.models (ModuleNotFoundError: No module "
            "named 'no_such_pkg')",
        ),
        (
            f"{MODELS}:build_plantd",
            f"--arch '{MODELS}:build_plantd': {MODELS} has no attribute 'build_plantd'; did you mean build_planted",
        ),
        (
            "build_planted",
            "--arch 'build_planted' is not of the form pkg.module:attr or path/to/file.py:attr",
        ),
    ],
)
def test_wrong_arch(work: Path, refused, arch: str, message: str) -> None:
    refused(_scan(work, arch=arch), message)


def test_state_dict_mismatch_lists_the_first_five_keys(work: Path, refused) -> None:
    sd = PlantedOutlierNet().state_dict()  # 9 entries: gain, then stem/mid/post/head weight and bias
    torch.save({f"backbone.{k}": v for k, v in sd.items()}, work / "renamed.pth")
    refused(
        _scan(work, model="renamed.pth"),
        f"the weights in renamed.pth do not match --arch {ARCH}: "
        "9 missing keys: gain, stem.weight, stem.bias, mid.weight, mid.bias, … (4 more); "
        "9 unexpected keys: backbone.gain, backbone.stem.weight, backbone.stem.bias, backbone.mid.weight, "
        "backbone.mid.bias, … (4 more)",
    )
    sd["head.weight"] = torch.zeros(7, 16)
    torch.save(sd, work / "shape.pth")
    refused(
        _scan(work, model="shape.pth"),
        "1 shape mismatch: head.weight file [7, 16] vs model [5, 16]",
    )


def test_untrusted_pickle_needs_trust_pickle(work: Path, refused) -> None:
    torch.save(PlantedOutlierNet(), work / "whole.pth")  # a pickled module: loading it runs code
    refused(
        _scan(work, model="whole.pth", arch=None),
        f"{work / 'whole.pth'} holds pickled Python objects (tests.models.PlantedOutlierNet), not just "
        "weights; unpickling them can run arbitrary code, so it is refused: pass --trust-pickle only if you "
        "trust the file's source",
    )


# -------------------------------------------------------------------------------------- calibration data
def test_calibration_batches_of_the_wrong_shape(work: Path, refused) -> None:
    torch.save(torch.randn(8, 5, 12, 12), work / "rgba.pt")
    refused(
        _scan(work, calib="rgba.pt"),
        "the model rejected calibration batch 0 (tensor float32[8, 5, 12, 12]): Given groups=1, weight of "
        "size [16, 3, 3, 3], expected input[8, 5, 12, 12] to have 3 channels, but got 5 channels instead",
    )


def test_calibration_batches_of_the_wrong_dtype(work: Path, refused) -> None:
    torch.save(torch.randint(0, 256, (8, 3, 12, 12), dtype=torch.uint8), work / "raw.pt")
    refused(
        _scan(work, calib="raw.pt"),
        "the model rejected calibration batch 0 (tensor uint8[8, 3, 12, 12]): Input type (unsigned char) "
        "and bias type (float) should be the same",
    )


@pytest.mark.parametrize("kind", ["no-batches", "no-samples", "empty-folder"])
def test_empty_calibration_set(work: Path, refused, kind: str) -> None:
    empty = work / ("empty" if kind == "empty-folder" else "empty.pt")
    if kind == "empty-folder":
        empty.mkdir()
    else:  # a list of no batches, or a tensor of no samples
        torch.save([] if kind == "no-batches" else torch.empty(0, 3, 12, 12), empty)
    refused(_scan(work, calib=empty.name), f"calibration set {empty} is empty")


def test_missing_and_corrupt_calibration_files(work: Path, refused) -> None:
    refused(_scan(work, calib="nope.pt"), f"calibration data not found: {work / 'nope.pt'}")
    torch.save(torch.randn(16, 3, 12, 12), work / "c.pt")
    _flip_weight_bytes(work / "c.pt", work / "flipped.pt")
    refused(
        _scan(work, calib="flipped.pt"),
        f"cannot read calibration file {work / 'flipped.pt'}: the zip archive is truncated or corrupt",
    )


@pytest.mark.parametrize(("key", "value"), [("head.bias", float("nan")), ("stem.bias", float("inf"))])
def test_non_finite_fp_outputs_are_an_fp_problem(work: Path, refused, key: str, value: float) -> None:
    sd = PlantedOutlierNet().state_dict()
    sd[key] = torch.full_like(sd[key], value)
    torch.save(sd, work / "broken.pth")
    refused(
        _scan(work, model="broken.pth"),
        "the FP model itself produced 40 NaN/Inf values in output 'output' on batch 0: fix the model or its "
        "inputs before quantizing",
    )


# ------------------------------------------------------------------------------------------------- scan
def test_model_without_quantizable_layers(work: Path, refused) -> None:
    (work / "user").mkdir()  # its __pycache__ appears in there
    (work / "user" / "plain.py").write_text(
        "from torch import nn\n\n\ndef build():\n    return nn.Sequential(nn.BatchNorm2d(3), nn.ReLU())\n"
    )
    torch.save(nn.Sequential(nn.BatchNorm2d(3), nn.ReLU()).state_dict(), work / "plain.pth")
    err = refused(_scan(work, model="plain.pth", arch=f"{work / 'user' / 'plain.py'}:build"))
    assert err == "error: no Conv / Linear / sparse-conv layer to quantize"


def test_eval_function_that_raises(work: Path, refused) -> None:
    """The FP model is evaluated first of all: a broken function fails in seconds, before calibration (so
    no checkpoint is left either)."""
    (work / "user").mkdir()
    (work / "user" / "metric.py").write_text("def top1(model):\n    raise RuntimeError('no /data/val')\n")
    err = refused(_scan(work, "--no-smoothquant", "--eval", f"{work / 'user' / 'metric.py'}:top1"))
    assert err == "error: --eval function raised RuntimeError: no /data/val"


# --------------------------------------------------------------------------------------- spec / options
@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("W1A8", "weight bits must be an integer in 2..16, got 1"),
        ("W8A17", "activation bits must be an integer in 2..16, got 17"),
        ("W8", "cannot parse quantization spec 'W8': expected the form W<bits>A<bits>, e.g. W8A8"),
        ("[bold]W8", "cannot parse quantization spec '[bold]W8'"),  # printed as is, not as rich markup
        ("W" + "9" * 5000 + "A8", "cannot parse quantization spec 'W999"),  # beyond int()'s digit limit
    ],
)
def test_bits_spec_out_of_range(work: Path, refused, spec: str, message: str) -> None:
    refused(_scan(work, "--spec", spec), message)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--alpha-grid", "0:inf:1"],
            "cannot parse alpha grid '0:inf:1': use 0.5, 0.25,0.5,0.75 or 0.1:0.9:0.1",
        ),
        (
            ["--alpha-grid", "0:1:1e-9"],
            "alpha grid '0:1:1e-9' lists more than 1001 values: use a larger step",
        ),
        (["--alpha-grid", "0.5,1.5"], "alpha grid '0.5,1.5' must list values in [0, 1]"),
        (["--act-sign", "unsigned"], "act_sign must be 'signed' or 'auto', got 'unsigned'"),
        (["--sq-mode", "lazy"], "unknown SmoothQuant mode 'lazy'; choose static or dynamic"),
        (
            ["--exclude-budget", "0.01"],
            "--exclude-budget needs --eval pkg.module:function to measure the metric",
        ),
    ],
)
def test_bad_options(work: Path, refused, args: list[str], message: str) -> None:
    refused(_scan(work, *args), message)


def test_bad_exclude_yaml(work: Path, refused) -> None:
    (work / "mine.yaml").write_text("version: 1\nexclude:\n  - layr: mid\n")
    refused(
        _scan(work, "--exclude", str(work / "mine.yaml")),
        f"{work / 'mine.yaml'}: unknown key 'layr' in exclude[0] (allowed: layer, reason, metrics); did you "
        "mean 'layer'? (line 3)",
    )
    refused(
        _scan(work, "--exclude", str(work / "gone.yaml")),
        f"{work / 'gone.yaml'}: file not found",
    )


# ------------------------------------------------------------------------------------------------ output
def test_output_folder_below_a_file(work: Path, refused) -> None:
    """Root ignores permission bits, so "cannot be written" is a folder whose parent is a regular file."""
    (work / "notes.txt").write_text("a file, not a folder\n")
    refused(
        _scan(work, out="notes.txt/report"),
        f"cannot write to {work / 'notes.txt' / 'report'}: {work / 'notes.txt'} is a file, not a folder",
    )
    refused(
        _scan(work, "--overwrite", out="notes.txt"),
        f"output path {work / 'notes.txt'} exists and is not a folder",
    )


# The disk fills up (a per-process file size limit: writes beyond it fail with EFBIG) at one of three
# moments: from the start (the calibration checkpoint, the first file a scan writes, fails), when the
# report folder is made (layers.csv, its first file), or when the final model is saved (model_quant.pt).
_CHILD = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write beyond the limit fails with EFBIG instead
stage, argv = sys.argv[1], sys.argv[2:]

def disk_full():
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))

if stage == "start":
    disk_full()
elif stage == "layers.csv":
    import sensitivity.output as output
    enter = output.atomic_dir.__enter__
    output.atomic_dir.__enter__ = lambda self: (enter(self), disk_full())[0]
else:
    import sensitivity.apply as apply
    save = apply.save_quantized
    apply.save_quantized = lambda *args: (disk_full(), save(*args))[1]
from sensitivity.cli import main
from tests.cli_helpers import ARCH, MODELS, _scan, fails
sys.exit(main(argv))
"""


def test_disk_full_leaves_no_partial_report(work: Path, capsys) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    stages = {
        "start": "cannot write the calibration checkpoint",
        "layers.csv": "failed: File too large",
        "model_quant.pt": "failed: File too large",
    }
    procs = {}
    for stage in stages:  # in parallel: each is a fresh interpreter importing torch
        folder = work / stage
        folder.mkdir()
        argv = _scan(work, "--no-smoothquant", out=folder / "out")
        procs[stage] = subprocess.Popen(
            [sys.executable, "-c", _CHILD, stage, *argv],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    for stage, proc in procs.items():
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 2, (stage, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, (stage, err)
        out = work / stage / "out"
        expected = f"{stages[stage]}" if stage == "start" else f"writing {out} {stages[stage]}"
        assert err.startswith("error: ") and expected in err and "File too large" in err, (stage, err)
        left = sorted(p.name for p in (work / stage).iterdir())
        # no report, no .out.partial-* folder, no checkpoint temp file; the complete calibration checkpoint
        # stays (by design) so that `--resume` can finish once there is space again
        assert left == ([] if stage == "start" else [".out.resume.pt"]), (stage, left)
    # space again: the interrupted report is finished from the checkpoint
    out = work / "layers.csv" / "out"
    assert main([*_scan(work, "--no-smoothquant", out=out), "--resume", str(out)]) == 0
    assert (work / "layers.csv" / "out" / "model_quant.pt").is_file()
    assert sorted(p.name for p in (work / "layers.csv").iterdir()) == ["out"]
    capsys.readouterr()


# ----------------------------------------------------------------------------------------- apply policy
def test_bad_policy_for_apply(work: Path, refused) -> None:
    policy = work / "policy.yaml"
    policy.write_text(
        "version: 1\nrules:\n  - match: mid\n    method: smoothquant\n    alpha: 2\n    granularity: channel\n"
    )
    base = ["apply", str(work / "model.pth"), "--arch", ARCH, "--calib", str(work / "calib.pt")]
    refused(
        [*base, "--policy", str(policy)],
        f"{policy}: rules[0]: alpha must be a number in [0, 1], got 2 (line 5)",
    )
    policy.write_text("version: 1\nrules:\n  - match: mid\n    method: int4\n")
    refused(
        [*base, "--policy", str(policy)],
        f"{policy}: rules[0]: unknown method 'int4'; choose one of fp, naive, smoothquant (line 4)",
    )
    refused([*base, "--policy", str(work / "gone.yaml")], f"{work / 'gone.yaml'}: file not found")
    policy.write_text("version: 1\nrules: []\n")
    refused(
        ["apply", str(work / "model.pth"), "--arch", ARCH, "--policy", str(policy)],
        f"no quant state at {work / 'quant_state.pt'}: pass --quant-state or --calib to recalibrate",
    )
    (work / "notes.txt").write_text("a file\n")
    refused(
        [*base, "--policy", str(policy), "--out", str(work / "notes.txt" / "q")],
        f"cannot write to {work / 'notes.txt' / 'q'}: {work / 'notes.txt'} is a file, not a folder",
    )
