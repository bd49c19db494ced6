"""Output folders: nothing the user owns is deleted or overwritten, whatever the flags (classes of cases)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sensitivity.errors import OutputDirError
from sensitivity.files import MARKER, atomic_dir, check_output_dir, check_output_files, default_report_name
from sensitivity.files.folders import clean_stale


def _tool_folder(path: Path, content: str = "old") -> Path:
    path.mkdir(parents=True)
    (path / MARKER).write_text("{}")
    (path / "layers.csv").write_text(content)
    return path


@pytest.fixture()
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    "out", [".", "", "./", "..", "/"], ids=["dot", "empty", "dot-slash", "parent", "root"]
)
def test_the_current_directory_or_a_folder_holding_it_is_refused(here: Path, out: str) -> None:
    with pytest.raises(OutputDirError, match=r"current directory|empty"):
        check_output_dir(out, overwrite=True)


@pytest.mark.parametrize(
    ("out", "inputs", "fragment"),
    [
        ("d", ["d/model.pth"], "holds the input"),  # the folder of the model
        ("d/model.pth", ["d/model.pth"], "holds the input"),  # the model file itself
        ("calib/rep", ["calib"], "inside the input folder"),  # would be read back as batches
        ("calib/sub/rep", ["calib"], "inside the input folder"),
        ("a", ["a/b/c/policy.yaml"], "holds the input"),
    ],
)
def test_a_folder_that_is_holds_or_lies_inside_an_input_is_refused(
    here: Path, out: str, inputs: list[str], fragment: str
) -> None:
    for item in inputs:
        (here / item).parent.mkdir(parents=True, exist_ok=True)
        (here / item).write_text("x") if "." in Path(item).name else (here / item).mkdir(exist_ok=True)
    for overwrite in (False, True):
        with pytest.raises(OutputDirError, match=fragment):
            check_output_dir(out, overwrite=overwrite, inputs=inputs)


def test_a_folder_the_tool_did_not_write_is_never_replaced(here: Path) -> None:
    user = here / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("precious")
    with pytest.raises(OutputDirError, match="not written by sensitivity"):
        check_output_dir(user, overwrite=True)
    with pytest.raises(OutputDirError, match="already exists"):
        check_output_dir(user, overwrite=False)
    assert (user / "notes.txt").read_text() == "precious"


def test_marked_and_legacy_report_folders_are_replaceable(here: Path) -> None:
    assert check_output_dir(_tool_folder(here / "new"), overwrite=True) == (here / "new").resolve()
    legacy = here / "legacy"
    legacy.mkdir()
    (legacy / "scan.json").write_text(json.dumps({"format": "sensitivity-scan"}))
    check_output_dir(legacy, overwrite=True)


@pytest.mark.parametrize("model", ["..pth", "...pt", " .pth", "model.pth", "dir/x.y.pth"])
def test_default_report_names_never_climb_out_of_reports(model: str) -> None:
    name = default_report_name(model)
    assert name.strip(".") and "/" not in name and name != ".."


def test_atomic_dir_replaces_only_with_overwrite_and_leaves_nothing_behind(here: Path) -> None:
    target = _tool_folder(here / "rep")
    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "layers.csv").write_text("new")
    assert (target / "layers.csv").read_text() == "new" and (target / MARKER).is_file()
    assert sorted(p.name for p in here.iterdir()) == ["rep"]


def test_a_folder_that_appears_during_the_run_is_not_replaced(here: Path) -> None:
    target = here / "rep"
    with pytest.raises(OutputDirError, match="appeared while this run"), atomic_dir(target) as tmp:
        (tmp / "layers.csv").write_text("mine")
        _tool_folder(target, "the other run's")  # another scan finished first
    assert (target / "layers.csv").read_text() == "the other run's"
    assert sorted(p.name for p in here.iterdir()) == ["rep"]


def test_a_symlinked_output_writes_the_folder_it_points_to(here: Path) -> None:
    real = _tool_folder(here / "real")
    (here / "link").symlink_to(real)
    with atomic_dir(here / "link", overwrite=True) as tmp:
        (tmp / "layers.csv").write_text("new")
    assert (here / "link").is_symlink() and (real / "layers.csv").read_text() == "new"
    assert sorted(p.name for p in here.iterdir()) == ["link", "real"]


def test_failure_inside_removes_the_temp_folder_and_keeps_the_old_report(here: Path) -> None:
    target = _tool_folder(here / "rep")
    with pytest.raises(RuntimeError), atomic_dir(target, overwrite=True) as tmp:
        (tmp / "layers.csv").write_text("half")
        raise RuntimeError("boom")
    assert (target / "layers.csv").read_text() == "old"
    assert sorted(p.name for p in here.iterdir()) == ["rep"]


def test_stale_leftovers_of_killed_runs_are_cleaned_and_a_moved_report_restored(here: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(dead.stdout)
    (here / f".rep.partial-{pid}-abc").mkdir()
    old = _tool_folder(here / f".rep.old-{pid}", "the previous report")
    alive = here / f".rep.partial-{os.getpid()}-xyz"
    alive.mkdir()
    clean_stale(here, "rep")
    assert (here / "rep" / "layers.csv").read_text() == "the previous report" and not old.exists()
    assert alive.exists()  # a running process's temp folder is left alone
    assert not (here / f".rep.partial-{pid}-abc").exists()


def test_apply_outputs_never_overwrite_inputs_or_user_files(here: Path) -> None:
    report = _tool_folder(here / "rep")
    (report / "model_quant.pt").write_text("input model")
    with pytest.raises(OutputDirError, match="is an input"):
        check_output_files(report, ["model_quant.pt"], inputs=[report / "model_quant.pt"])
    user = here / "user"
    user.mkdir()
    (user / "model_quant.onnx").write_text("theirs")
    with pytest.raises(OutputDirError, match="did not write"):
        check_output_files(user, ["model_quant.pt", "model_quant.onnx"])
    check_output_files(user, ["model_quant.pt"])  # new files in the user's folder are fine
    check_output_files(report, ["model_quant.onnx"], inputs=[report / "model_quant.pt"])
