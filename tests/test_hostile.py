"""What a hostile tester broke (issue 14), one test per class of input, through the real command line.

Each refusal is one red line and exit 2 with nothing left behind (`fails` from test_errors.py); each silent
wrong result is now either right or said. The chaos test (signals at random points) is test_chaos.py; the
output-folder rules are unit-tested in files/test_folders.py.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import torch
import yaml

from sensitivity.cli import main
from tests import hostile
from tests.cli_helpers import ARCH, _scan

H = hostile.FILE


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _ok(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "Traceback" not in captured.err
    return captured.out + captured.err


@pytest.fixture()
def report(work: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    _ok(_scan(work, "--no-smoothquant", out="rep"), capsys)
    return work / "rep"


# -------------------------------------------------------------------------------- silent wrong results
@pytest.mark.parametrize("spec", ["W4A8", "W8A4", "W8A16"])
def test_policy_spec_other_than_the_quant_states_is_refused(
    work: Path, report: Path, refused, spec: str
) -> None:
    policy = report / "policy.yaml"
    policy.write_text(policy.read_text().replace("spec: W8A8", f"spec: {spec}"))
    before = _digest(report)
    refused(
        ["apply", str(work / "model.pth"), "--arch", ARCH, "--policy", str(policy)],
        f"the policy is for {spec} but the quant state was calibrated for W8A8",
    )
    assert _digest(report) == before


@pytest.mark.parametrize("fn", ["eval_nan", "eval_inf"])
def test_non_finite_fp_metric_is_refused(work: Path, refused, fn: str) -> None:
    refused(
        _scan(work, "--eval", f"{H}:{fn}", "--exclude-budget", "0.01"),
        "--eval function returned top1=",
    )


def test_nan_metric_for_quantized_models_is_said_not_silently_budgeted(
    work: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    hostile._CALLS["n"] = 0
    text = _ok(_scan(work, "--eval", f"{H}:eval_nan_when_quantized", "--exclude-budget", "0.01"), capsys)
    assert "non-finite top1" in text and "budget was not reached" in text
    warnings = json.loads((work / "out" / "scan.json").read_text())["warnings"]
    assert any("non-finite top1" in w for w in warnings)


@pytest.mark.parametrize(
    ("arch", "calib"), [("in_place_input", "calib_images"), ("in_place_dict", "calib_dicts")]
)
def test_a_model_writing_into_its_input_changes_nothing_and_measures_right(
    work: Path,
    capsys: pytest.CaptureFixture[str],
    arch: str,
    calib: str,
) -> None:
    from sensitivity import scan

    model = getattr(hostile, arch)() if arch != "in_place_dict" else hostile.InPlaceDict()
    batches = getattr(hostile, calib)()
    before = [
        json.dumps(torch.as_tensor(b if not isinstance(b, dict) else b["points"]).tolist()) for b in batches
    ]
    result = scan(model, batches)
    after = [
        json.dumps(torch.as_tensor(b if not isinstance(b, dict) else b["points"]).tolist()) for b in batches
    ]
    assert before == after  # the user's batches are untouched
    assert result.comparison.set_index("config").loc["naive", "out_rel_l1"] < 0.05  # not a bogus huge error


def test_outputs_function_measures_each_named_output_apart(
    work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.save(hostile.mixed_units().state_dict(), work / "mixed.pth")
    argv = _scan(work, "--outputs", f"{H}:split_boxes_scores", model="mixed.pth", arch=f"{H}:mixed_units")
    text = _ok(argv, capsys)
    assert "per model output" in text
    rows = json.loads((work / "out" / "scan.json").read_text())["output_comparison"]
    assert {(r["config"], r["output"]) for r in rows} >= {("naive", "boxes"), ("naive", "scores")}
    html = (work / "out" / "report.html").read_text()
    assert 'id="outputs"' in html and "<code>scores</code>" in html


@pytest.mark.parametrize(
    ("fn", "fragment"),
    [
        ("outputs_raise", "--outputs function outputs_raise raised KeyError"),
        (
            "outputs_not_a_dict",
            "--outputs function must return a dict of name -> floating-point tensor, got int",
        ),
        ("no_such_function", "has no attribute 'no_such_function'"),
    ],
)
def test_bad_outputs_functions_are_one_line(work: Path, refused, fn: str, fragment: str) -> None:
    torch.save(hostile.mixed_units().state_dict(), work / "mixed.pth")
    refused(_scan(work, "--outputs", f"{H}:{fn}", model="mixed.pth", arch=f"{H}:mixed_units"), fragment)


# ------------------------------------------------------------------------------------------ data lost
def test_output_folder_holding_the_model_is_refused_even_with_overwrite(work: Path, refused) -> None:
    d = work / "d"
    d.mkdir()
    (d / "model.pth").write_bytes((work / "model.pth").read_bytes())
    (d / "calib.pt").write_bytes((work / "calib.pt").read_bytes())
    before = _digest(d)
    argv = [
        "scan",
        str(d / "model.pth"),
        "--arch",
        ARCH,
        "--calib",
        str(d / "calib.pt"),
        "--out",
        str(d),
        "--overwrite",
        "-q",
    ]
    refused(argv, f"output folder {d} holds the input")
    assert _digest(d) == before


def test_report_inside_the_calibration_folder_is_refused(work: Path, refused) -> None:
    (work / "calib_dir").mkdir()
    (work / "calib_dir" / "a.pt").write_bytes((work / "calib.pt").read_bytes())
    refused(_scan(work, calib="calib_dir", out="calib_dir/rep"), "lies inside the input folder")


@pytest.mark.parametrize("out", [".", ""])
def test_the_current_directory_is_never_an_output(work: Path, refused, out: str) -> None:
    start = time.perf_counter()
    argv = [
        "scan",
        str(work / "model.pth"),
        "--arch",
        ARCH,
        "--calib",
        str(work / "calib.pt"),
        "--out",
        out,
        "--overwrite",
        "-q",
    ]
    refused(argv, "current directory")
    assert time.perf_counter() - start < 20  # refused before any work, not after the scan


def test_a_user_folder_is_not_replaced_by_overwrite_nor_by_the_demo(work: Path, refused) -> None:
    mine = work / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    refused(_scan(work, "--overwrite", out="mine"), "was not written by sensitivity")
    refused(["demo", "--out", str(mine), "-q"], "was not written by sensitivity")
    assert (mine / "thesis.tex").read_text() == "years of work"


def test_a_dot_named_model_writes_reports_model_not_reports(work: Path, capsys) -> None:
    (work / "..pth").write_bytes((work / "model.pth").read_bytes())
    (work / "reports").mkdir()
    (work / "reports" / "keep.txt").write_text("other reports")
    argv = [
        "scan",
        str(work / "..pth"),
        "--arch",
        ARCH,
        "--calib",
        str(work / "calib.pt"),
        "--no-smoothquant",
        "-q",
        "--overwrite",
    ]
    _ok(argv, capsys)
    assert (work / "reports" / "model" / "scan.json").is_file()
    assert (work / "reports" / "keep.txt").read_text() == "other reports"


def test_apply_never_overwrites_its_input(work: Path, report: Path, refused) -> None:
    before = _digest(report)
    refused(
        ["apply", str(report / "model_quant.pt"), "--arch", ARCH, "--policy", str(report / "policy.yaml")],
        "is an input of this command and would be overwritten",
    )
    assert _digest(report) == before


def test_overwrite_through_a_symlink_leaves_no_debris(work: Path, report: Path, capsys) -> None:
    (work / "link").symlink_to(report)
    _ok(_scan(work, "--no-smoothquant", "--overwrite", out="link"), capsys)
    assert (work / "link").is_symlink() and (report / "scan.json").is_file()
    assert not [p.name for p in work.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------------------------------ hang
def _laughs(levels: int = 8) -> str:
    lines = ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels + 1):
        lines.append(f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]")
    return "  " + "\n  ".join(lines)


def test_yaml_alias_bombs_are_refused_at_once(work: Path, report: Path, refused) -> None:
    bomb = f"version: 1\nspec: W8A8\nmeta:\n{_laughs()}\nrules: []\n"
    (report / "policy.yaml").write_text(bomb)
    start = time.perf_counter()
    refused(
        ["apply", str(work / "model.pth"), "--arch", ARCH, "--policy", str(report / "policy.yaml")],
        "expands to",
        "anchors and aliases",
    )
    (work / "exclude.yaml").write_text(
        f"version: 1\nspec: W8A8\nexclude:\n- layer: mid\n  metrics: {{}}\nx:\n{_laughs()}\n"
    )
    refused(_scan(work, "--exclude", str(work / "exclude.yaml")), "expands to")
    assert time.perf_counter() - start < 20


def test_load_quantized_refuses_an_alias_bomb_policy(report: Path) -> None:
    from sensitivity import load_quantized
    from sensitivity.errors import ConfigError
    from tests.models import PlantedOutlierNet

    payload = torch.load(report / "model_quant.pt", weights_only=True)
    payload["policy"] = f"version: 1\nspec: W8A8\nmeta:\n{_laughs()}\nrules: []\n"
    torch.save(payload, report / "bomb.pt")
    with pytest.raises(ConfigError, match="expands to"):
        load_quantized(report / "bomb.pt", PlantedOutlierNet)


# ------------------------------------------------------------------------ tracebacks instead of one line
def test_onnx_export_of_dict_outputs(work: Path, capsys) -> None:
    torch.save(hostile.dict_out().state_dict(), work / "det.pth")
    _ok(_scan(work, "--no-smoothquant", model="det.pth", arch=f"{H}:dict_out"), capsys)
    out = work / "out"
    _ok(
        [
            "apply",
            str(work / "det.pth"),
            "--arch",
            f"{H}:dict_out",
            "--policy",
            str(out / "policy.yaml"),
            "--onnx",
        ],
        capsys,
    )
    check = json.loads((out / "export.json").read_text())
    assert check["ok"] and check["max_abs_diff_qdq_reference"] < 1e-4
    import onnx

    names = [o.name for o in onnx.load(str(out / "model_quant.onnx")).graph.output]
    assert names == ["hm", "boxes.reg"]  # the integer output is not a quantization output


def test_onnx_export_failure_is_one_line_and_recorded(work: Path, capsys) -> None:
    torch.save(hostile.unexportable().state_dict(), work / "unexp.pth")
    argv = _scan(
        work, "--no-smoothquant", model="unexp.pth", arch=f"{H}:unexportable", calib=f"{H}:calib_vectors"
    )
    argv[argv.index("--calib") + 1] = f"{H}:calib_vectors"
    _ok(argv, capsys)
    out = work / "out"
    code = main(
        [
            "apply",
            str(work / "unexp.pth"),
            "--arch",
            f"{H}:unexportable",
            "--policy",
            str(out / "policy.yaml"),
            "--onnx",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert (
        code == 2
        and err.startswith("error: ONNX export of the quantized model failed")
        and len(err.splitlines()) == 1
    )
    assert (out / "model_quant.pt").is_file() and not (out / "model_quant.onnx").exists()
    record = json.loads((out / "export.json").read_text())
    assert record["ok"] is False and "export" in record["error"]


@pytest.mark.parametrize(
    ("calib", "batch_size", "fragment"),
    [
        ("calib_int64_one", "1", "the model rejected calibration batch 0 (tensor int64[1, 3, 12, 12])"),
        ("calib_uint8_one", "1", "the model rejected calibration batch 0 (tensor uint8[1, 3, 12, 12])"),
        ("calib_dict_for_tensor_model", "8", "the model rejected calibration batch 0 (dict(x: float32"),
        (
            "calib_tuple_with_none",
            "8",
            "the model rejected calibration batch 0 (tuple(float32[1, 3, 12, 12], None))",
        ),
    ],
)
def test_the_models_first_run_is_wrapped(
    work: Path, refused, calib: str, batch_size: str, fragment: str
) -> None:
    argv = _scan(work, "--batch-size", batch_size)
    argv[argv.index("--calib") + 1] = f"{H}:{calib}"
    refused(argv, fragment)


@pytest.mark.parametrize(
    ("calib", "kind"),
    [
        ("calib_sparse", "sparse"),
        ("calib_meta", "meta"),
        ("calib_float8", "float8"),
        ("calib_nested", "nested"),
        ("calib_quantized", "quantized"),
    ],
)
def test_unusual_tensor_kinds_in_calibration_data(work: Path, refused, calib: str, kind: str) -> None:
    argv = _scan(work)
    argv[argv.index("--calib") + 1] = f"{H}:{calib}"
    refused(argv, "calibration batch 0", kind)


def test_a_torchscript_submodule_is_scanned_around_and_said(work: Path, capsys) -> None:
    torch.save(hostile.scripted_part().state_dict(), work / "s.pth")
    text = _ok(_scan(work, "--no-smoothquant", model="s.pth", arch=f"{H}:scripted_part"), capsys)
    assert "not scanned" in text and "TorchScript" in text
    info = json.loads((work / "out" / "scan.json").read_text())
    assert info["layers"] == 1 and set(info["unscanned"]) == {"block.0", "block.2"}


@pytest.mark.parametrize("port", ["99999", "-1", "65536"])
def test_view_port_out_of_range(report: Path, refused, port: str) -> None:
    refused(["view", str(report), "--no-browser", "--port", port], "--port must be a port number in 0..65535")


def test_deeply_nested_arch_kwargs(work: Path, refused) -> None:
    refused(_scan(work, "--arch-kwargs", "[" * 100_000), "--arch-kwargs is nested too deeply")


@pytest.mark.parametrize("opset", ["99", "12", "0"])
def test_opset_out_of_range_is_refused_before_anything_is_written(
    work: Path, report: Path, refused, opset: str
) -> None:
    before = _digest(report)
    refused(
        [
            "apply",
            str(work / "model.pth"),
            "--arch",
            ARCH,
            "--policy",
            str(report / "policy.yaml"),
            "--onnx",
            "--opset",
            opset,
        ],
        "--opset must be between 13",
    )
    assert _digest(report) == before


@pytest.mark.parametrize(
    ("state", "fragment"),
    [
        (torch.zeros(3), "holds a Tensor, not a quant state"),
        ({"layers": {}}, "it has no 'spec' entry"),
        ({"spec": "W8A8", "layers": {}}, "'spec' is a str, not a mapping"),
        ({"spec": {"w_bits": 99}, "layers": {}}, "'spec' is not a valid spec"),
        (
            {"spec": {"w_bits": 8}, "layers": {"mid": {"method": "naive", "input_amax": "x"}}},
            "'input_amax' is not a tensor",
        ),
        ({"spec": {"w_bits": 8}, "layers": {"mid": {"method": "magic"}}}, "method 'magic' is not one of"),
    ],
)
def test_malformed_quant_states_are_one_line(work: Path, report: Path, refused, state, fragment: str) -> None:
    torch.save(state, report / "quant_state.pt")
    refused(
        ["apply", str(work / "model.pth"), "--arch", ARCH, "--policy", str(report / "policy.yaml")], fragment
    )


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"spec": "W8A8"}, "'spec' must be a mapping"),
        ({"spec": {"spec": 8}}, "'spec.spec' must be a string"),
        ({"comparison": [1, 2]}, "'comparison' must be a list of mappings"),
        ({"timings": []}, "'timings' must be a mapping"),
    ],
)
def test_malformed_scan_json_is_one_line(report: Path, refused, change: dict, fragment: str) -> None:
    info = json.loads((report / "scan.json").read_text())
    (report / "scan.json").write_text(json.dumps({**info, **change}))
    refused(["report", str(report)], fragment)


@pytest.mark.parametrize("drop", ["fingerprint", "layers"])
def test_a_damaged_resume_checkpoint_is_one_line(work: Path, refused, drop: str) -> None:
    payload = {"format": "sensitivity-calibration", "version": 1, "fingerprint": "x", "layers": {}}
    del payload[drop]
    torch.save(payload, work / ".out.resume.pt")
    refused(_scan(work, "--resume", str(work / "out")), "is a damaged calibration checkpoint", f"no {drop}")


def test_docs_list_every_new_message() -> None:
    docs = (Path(__file__).resolve().parents[1] / "docs" / "errors.md").read_text()
    for fragment in (
        "is an input of this command",
        "was not written by sensitivity",
        "appeared while this run",
        "expands to",
        "--opset must be between",
        "the policy is for",
        "ONNX export of the quantized model failed",
        "--port must be a port number",
        "--outputs function",
        "not a usable quant state",
        "terminated",
    ):
        assert fragment in docs, fragment


def test_exclude_yaml_lists_the_layers_the_budget_keeps_in_fp(work: Path, capsys) -> None:
    _ok(
        _scan(work, "--eval", f"{H}:eval_agreement", "--exclude-budget", "0.0001", "--no-smoothquant"), capsys
    )
    info = json.loads((work / "out" / "scan.json").read_text())
    excluded = [e["layer"] for e in yaml.safe_load((work / "out" / "exclude.yaml").read_text())["exclude"]]
    policy_fp = [
        r["match"]
        for r in yaml.safe_load((work / "out" / "policy.yaml").read_text())["rules"]
        if r["method"] == "fp"
    ]
    assert len(excluded) >= 2  # `mid` by its threshold, at least one more by the budget
    assert excluded == info["excluded"] == policy_fp
    comp = {r["config"]: r for r in info["comparison"]}
    assert comp["naive+exclusion"]["fp_layers"] == len(excluded)
