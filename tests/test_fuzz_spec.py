"""Fuzzing the option strings a user types: a spec (`--spec`, `QuantSpec.parse`), `--calibrator`,
`--act-sign`, `--alpha-grid` (`parse_alpha_grid`), plus `--sq-granularity`, `--sq-mode` and `--device`.

Whatever the text, the outcome is a valid value or a one-line `SensitivityError`; through the CLI, exit
code 2 with one red line, never a traceback. Deterministic (`derandomize=True`) and bounded.
(The YAML files are fuzzed in policy/test_rules_io.py.)
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from sensitivity import ScanOptions
from sensitivity.cli import main
from sensitivity.errors import SpecError
from sensitivity.methods.smoothquant import MAX_ALPHAS, parse_alpha_grid
from sensitivity.spec import CALIBRATORS, QuantSpec
from tests.models import TinyConvNet

MODELS = str(Path(__file__).resolve().with_name("models.py"))
FUZZ = settings(max_examples=150, derandomize=True, deadline=None, database=None)

# text a shell can pass (no lone surrogates, which no real argv or stderr carries) ...
_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=30)
# ... and text close to the valid forms, so the checks behind the parsing are reached too
_digits = st.one_of(st.integers(-3, 40).map(str), st.just("9" * 5000), st.just("0" * 30 + "8"), st.just(""))
_spec = st.one_of(
    _text,
    st.tuples(st.sampled_from(["W", "w", " W", "A", "[b]W"]), _digits, st.sampled_from(["A", "a", "", "W"]),
              _digits, st.sampled_from(["", " ", "x", "\n"])).map("".join),
)  # fmt: skip
_number = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(
        ["0", "1", "0.5", ".25", "1e-9", "-0", "nan", "inf", "-inf", "1e308", "", " ", "x", "1_0"]
    ),
)
_alpha_grid = st.one_of(
    _text,
    st.lists(_number, min_size=1, max_size=5).map(",".join),
    st.lists(_number, min_size=2, max_size=4).map(":".join),
)
_calibrator = st.one_of(_text, st.sampled_from([*CALIBRATORS, "MAX", "max ", "histogram"]))
_act_sign = st.one_of(_text, st.sampled_from(["signed", "auto", "unsigned", "Signed", ""]))


def _one_line(exc: BaseException) -> None:
    assert str(exc) and "\n" not in str(exc) and "\r" not in str(exc), repr(str(exc))


@FUZZ
@given(_spec, _calibrator, _act_sign, st.floats(allow_nan=True, allow_infinity=True))
@example("W" + "9" * 5000 + "A8", "max", "signed", 99.99)
def test_quant_spec_parse(text: str, calibrator: str, act_sign: str, percentile: float) -> None:
    try:
        spec = QuantSpec.parse(text, calibrator=calibrator, act_sign=act_sign, percentile=percentile)
    except SpecError as exc:
        _one_line(exc)
    else:
        assert 2 <= spec.w_bits <= 16 and 2 <= spec.a_bits <= 16
        assert calibrator in CALIBRATORS and act_sign in ("signed", "auto") and 0 < percentile <= 100
        assert (
            QuantSpec.parse(spec.name, calibrator=calibrator, act_sign=act_sign, percentile=percentile)
            == spec
        )


@FUZZ
@given(_alpha_grid)
@example("0:inf:1")
@example("0:1:1e-300")  # would be 1e300 values
@example("-1e308:1e308:1e-308")
@example("0:1:0.001")  # the most a grid may list
def test_parse_alpha_grid(text: str) -> None:
    try:
        alphas = parse_alpha_grid(text)
    except SpecError as exc:
        _one_line(exc)
    else:
        assert isinstance(alphas, tuple) and len(alphas) == len(set(alphas)) <= MAX_ALPHAS
        assert (alphas == ()) == (text.strip() == "")
        assert all(isinstance(a, float) and math.isfinite(a) and 0.0 <= a <= 1.0 for a in alphas)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """`scan` argv up to the options under test; `--exclude-budget` without `--eval` is refused after every
    option has been parsed, so each run ends before the (slow) scan, whatever the options."""
    work = tmp_path_factory.mktemp("fuzz-cli")
    torch.save(TinyConvNet().state_dict(), work / "model.pth")
    torch.save(torch.randn(4, 3, 8, 8), work / "calib.pt")
    return ["scan", str(work / "model.pth"), "--arch", f"{MODELS}:build_tiny", "--calib", str(work / "calib.pt"),
            "--out", str(work / "never"), "-q", "--exclude-budget", "0.1"]  # fmt: skip


def _mostly(valid: list[str], fuzz: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """A valid value 7 times in 8: the options are checked in turn, so the later ones get reached too."""
    return st.integers(0, 7).flatmap(lambda i: fuzz if i == 0 else st.sampled_from(valid))


_OPTION = {"spec": "--spec", "calibrator": "--calibrator", "act_sign": "--act-sign", "alpha_grid": "--alpha-grid",
           "granularity": "--sq-granularity", "mode": "--sq-mode", "device": "--device"}  # fmt: skip
_VALID = {"spec": "W8A8", "calibrator": "max", "act_sign": "signed", "alpha_grid": "0.5",
          "granularity": "channel", "mode": "static", "device": "cpu"}  # fmt: skip


@settings(FUZZ, max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    spec=_mostly(["W8A8", "W4A8", "w8a16", " W2A2 "], _spec),
    calibrator=_mostly(list(CALIBRATORS), _calibrator),
    act_sign=_mostly(["signed", "auto"], _act_sign),
    alpha_grid=_mostly(["0.5", "0.25,0.5,0.75", "0.1:0.9:0.1", "1", "0"], _alpha_grid),
    granularity=_mostly(["channel", "im2col", "channel,im2col"], st.one_of(st.just("row"), _text)),
    mode=_mostly(["static", "dynamic"], st.one_of(st.just("Static"), _text)),
    device=_mostly(["cpu", "cpu:0"], st.one_of(st.sampled_from(["cuda:7", "mps", "cuda:-1", "gpu"]), _text)),
)
@example(**{**_VALID, "spec": "[/x]"})  # rich markup in a message is printed as is, not interpreted
@example(**{**_VALID, "alpha_grid": "0:1:1e-12"})  # 1e12 alphas: refused, not allocated
def test_cli_options_are_one_red_line(
    files: list[str], capsys: pytest.CaptureFixture[str], **values: str
) -> None:
    options = [f"{_OPTION[key]}={value}" for key, value in values.items()]  # with `=`, "-x" is a value too
    assert main([*files, *options]) == 2, options
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "Traceback" not in captured.err + captured.out
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    if err == "error: --exclude-budget needs --eval pkg.module:function to measure the metric":
        # every option was accepted (this refusal comes after them all): each must indeed be valid
        QuantSpec.parse(values["spec"], calibrator=values["calibrator"], act_sign=values["act_sign"])
        parse_alpha_grid(values["alpha_grid"])  # (empty: no SmoothQuant)
        assert torch.device(values["device"]).type == "cpu"
    # which check refused (see --hypothesis-show-statistics: every option's check is reached)
    event(err.split(":")[1].split("'")[0].strip()[:40])


@FUZZ
@given(
    st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.integers(min_value=-(2**40), max_value=2**40),
        st.booleans(),
        st.none(),
        _text,
    )
)
def test_stored_mb_is_a_budget_or_one_error(value: object) -> None:
    """`ScanOptions(stored_activation_mb=...)` (`--stored-mb`): any finite number >= 0 is a budget (ints
    and numpy scalars too); anything else, bools included, one `SpecError` naming the option."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < math.inf
    values = [value]
    if ok and float(value).is_integer() and value < 2**31:  # type: ignore[arg-type]
        values += [np.float32(value), np.int64(value)]
    for v in values:
        if ok:
            assert ScanOptions(stored_activation_mb=v).stored_activation_mb == v
        else:
            with pytest.raises(SpecError, match=r"^--stored-mb must be a number of MiB >= 0"):
                ScanOptions(stored_activation_mb=v)
