"""Calibration batches: every source format, the hold-out split, and feeding batches to models."""

from __future__ import annotations

import math
import warnings
import zipfile
from collections import OrderedDict, namedtuple
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from sensitivity.data import load_calibration
from sensitivity.errors import CalibrationDataError, SensitivityError
from sensitivity.io.batches import batch_len, batch_to, describe_batch, run_model, split_holdout
from sensitivity.io.callables import resolve_callable

FACTORIES = str(Path(__file__).with_name("factories.py"))


def fails(exc: type[SensitivityError], *needles: str, call: Callable[[], Any]) -> str:
    """Run `call`, expect `exc` with a one-line message containing every needle; return the message."""
    with pytest.raises(exc) as info:
        call()
    msg = str(info.value)
    assert "\n" not in msg and "\r" not in msg, msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    return msg


# ---------------------------------------------------------------------------------------------- .pt files
def test_tensor_is_samples(tmp_path: Path) -> None:
    x = torch.arange(10 * 3, dtype=torch.float32).reshape(10, 3)
    torch.save(x, tmp_path / "calib.pt")
    batches = load_calibration(tmp_path / "calib.pt", batch_size=4)
    assert [b.shape[0] for b in batches] == [4, 4, 2]  # last partial batch kept
    assert torch.equal(torch.cat(batches), x)
    assert load_calibration(str(tmp_path / "calib.pt"), batch_size=4, max_batches=2)[1].shape == (4, 3)


def test_list_is_batches(tmp_path: Path) -> None:
    batches = [torch.zeros(2, 3), (torch.ones(1, 3), torch.tensor(2.0)), {"points": torch.zeros(5, 4)}]
    torch.save(batches, tmp_path / "calib.pth")
    loaded = load_calibration(
        tmp_path / "calib.pth", batch_size=1
    )  # batch_size does not re-cut ready batches
    assert len(loaded) == 3
    assert torch.equal(loaded[0], batches[0])
    assert isinstance(loaded[1], tuple) and torch.equal(loaded[1][0], batches[1][0])
    assert isinstance(loaded[2], dict) and loaded[2]["points"].shape == (5, 4)


def test_tuple_is_batches(tmp_path: Path) -> None:
    torch.save((torch.zeros(2, 3), torch.ones(2, 3)), tmp_path / "calib.pt")
    loaded = load_calibration(tmp_path / "calib.pt")
    assert len(loaded) == 2 and torch.equal(loaded[1], torch.ones(2, 3))


def test_dict_is_one_batch(tmp_path: Path) -> None:
    batch = {
        "voxels": torch.randn(12, 10, 5),
        "coords": torch.zeros(12, 4, dtype=torch.int32),
        "batch_size": 2,
    }
    torch.save(batch, tmp_path / "batch_dict.pt")
    loaded = load_calibration(tmp_path / "batch_dict.pt", batch_size=4)
    assert len(loaded) == 1
    assert loaded[0].keys() == batch.keys() and loaded[0]["batch_size"] == 2


def test_integer_images_keep_dtype(tmp_path: Path) -> None:
    images = torch.randint(0, 255, (6, 3, 4, 4), dtype=torch.uint8)
    torch.save(images, tmp_path / "images.pt")
    loaded = load_calibration(tmp_path / "images.pt", batch_size=3)
    assert all(b.dtype == torch.uint8 for b in loaded)


def test_pickled_objects_refused(tmp_path: Path) -> None:
    torch.save({"x": torch.zeros(2), "transform": nn.ReLU()}, tmp_path / "calib.pt")
    fails(
        CalibrationDataError,
        "holds pickled Python objects",
        "torch.nn.modules.activation.ReLU",
        "arbitrary code",
        "--trust-pickle",
        call=lambda: load_calibration(tmp_path / "calib.pt"),
    )


@pytest.mark.parametrize("zip_format", [True, False])
def test_truncated_pt(tmp_path: Path, zip_format: bool) -> None:
    path = tmp_path / "calib.pt"
    torch.save(torch.randn(64, 16), path, _use_new_zipfile_serialization=zip_format)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    fails(
        CalibrationDataError,
        "cannot read calibration file",
        "truncated or corrupt",
        call=lambda: load_calibration(path),
    )


def test_wrong_kind_of_pt(tmp_path: Path) -> None:
    text = tmp_path / "calib.pt"
    text.write_text("x,y\n1,2\n")
    fails(CalibrationDataError, "is not a torch.save file", call=lambda: load_calibration(text))
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    fails(CalibrationDataError, "calibration file", "is empty", call=lambda: load_calibration(empty))
    script = tmp_path / "model.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(nn.Linear(2, 2)), str(script))
    fails(
        CalibrationDataError,
        "is a TorchScript archive (a model), not data",
        call=lambda: load_calibration(script),
    )
    scalar = tmp_path / "scalar.pt"
    torch.save(torch.tensor(3.0), scalar)
    fails(CalibrationDataError, "0-d tensor", "dim 0", call=lambda: load_calibration(scalar))
    number = tmp_path / "number.pt"
    torch.save(3, number)
    fails(CalibrationDataError, "holds a int; expected a tensor", call=lambda: load_calibration(number))
    strings = tmp_path / "strings.pt"
    torch.save(["a", "b"], strings)
    fails(
        CalibrationDataError,
        "calibration batch 0",
        "is a str; expected a tensor",
        call=lambda: load_calibration(strings),
    )


# ------------------------------------------------------------------------------------------------- numpy
def test_npz_single_array_is_samples(tmp_path: Path) -> None:
    np.savez(tmp_path / "calib.npz", np.arange(12, dtype=np.float32).reshape(6, 2))
    loaded = load_calibration(tmp_path / "calib.npz", batch_size=4)
    assert [tuple(b.shape) for b in loaded] == [(4, 2), (2, 2)]
    assert loaded[0].dtype == torch.float32


@pytest.mark.parametrize("key", ["x", "input", "inputs"])
def test_npz_input_key_alone_is_samples(tmp_path: Path, key: str) -> None:
    np.savez(tmp_path / "calib.npz", labels=np.zeros(5, dtype=np.int64), **{key: np.ones((5, 3), np.float32)})
    loaded = load_calibration(tmp_path / "calib.npz", batch_size=2)
    assert [tuple(b.shape) for b in loaded] == [(2, 3), (2, 3), (1, 3)]


def test_npz_arrays_zipped_in_key_order(tmp_path: Path) -> None:
    np.savez(tmp_path / "calib.npz", b_image=np.zeros((5, 3), np.float32), a_mask=np.ones((5, 1), np.uint8))
    loaded = load_calibration(tmp_path / "calib.npz", batch_size=4)
    assert len(loaded) == 2
    image, mask = loaded[0]  # archive order, not sorted order
    assert image.shape == (4, 3) and mask.dtype == torch.uint8
    assert isinstance(loaded[1], tuple) and loaded[1][0].shape == (1, 3)


def test_npz_unequal_first_dims(tmp_path: Path) -> None:
    np.savez(tmp_path / "calib.npz", a=np.zeros((5, 3)), b=np.zeros((4, 3)))
    fails(
        CalibrationDataError,
        "several arrays with different first dims (a: [5, 3], b: [4, 3])",
        call=lambda: load_calibration(tmp_path / "calib.npz"),
    )


def test_npz_object_array_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "calib.npz", x=np.array([np.zeros(2), np.zeros(3)], dtype=object))
    fails(
        CalibrationDataError,
        "pickled numpy object arrays",
        call=lambda: load_calibration(tmp_path / "calib.npz"),
    )


def test_npz_corrupt(tmp_path: Path) -> None:
    np.savez(tmp_path / "calib.npz", x=np.zeros((64, 64)))
    data = (tmp_path / "calib.npz").read_bytes()
    (tmp_path / "calib.npz").write_bytes(data[: len(data) // 2])
    fails(
        CalibrationDataError,
        "cannot read calibration file",
        call=lambda: load_calibration(tmp_path / "calib.npz"),
    )
    with zipfile.ZipFile(tmp_path / "other.npz", "w") as z:
        z.writestr("x.npy", b"not an npy")
    fails(
        CalibrationDataError,
        "cannot read calibration file",
        call=lambda: load_calibration(tmp_path / "other.npz"),
    )


def test_npy(tmp_path: Path) -> None:
    np.save(tmp_path / "calib.npy", np.zeros((3, 2), np.float16))
    loaded = load_calibration(tmp_path / "calib.npy", batch_size=2)
    assert [b.dtype for b in loaded] == [torch.float16, torch.float16]


def test_empty_npz(tmp_path: Path) -> None:
    np.savez(tmp_path / "calib.npz", x=np.zeros((0, 3)))
    fails(
        CalibrationDataError,
        "calibration set",
        "is empty",
        call=lambda: load_calibration(tmp_path / "calib.npz"),
    )


# ------------------------------------------------------------------------------------------------ folders
def test_folder_sorted_and_concatenated(tmp_path: Path) -> None:
    torch.save(torch.full((3, 2), 1.0), tmp_path / "b.pt")
    torch.save([torch.full((1, 2), 0.0)], tmp_path / "a.pth")
    np.savez(tmp_path / "c.npz", np.full((2, 2), 2.0, np.float32))
    (tmp_path / "notes.txt").write_text("ignored")
    torch.save(torch.full((1, 2), 9.0), tmp_path / ".hidden.pt")
    (tmp_path / "sub").mkdir()
    torch.save(torch.full((1, 2), 9.0), tmp_path / "sub" / "nested.pt")
    loaded = load_calibration(tmp_path, batch_size=2)
    # a.pth: one ready batch; b.pt: 3 samples -> 2 + 1 (batch_size applies per file); c.npz: 2 samples
    assert [b[0, 0].item() for b in loaded] == [0.0, 1.0, 1.0, 2.0]
    assert [b.shape[0] for b in loaded] == [1, 2, 1, 2]
    assert len(load_calibration(str(tmp_path), batch_size=2, max_batches=3)) == 3


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no data here")
    fails(
        CalibrationDataError, f"calibration set {tmp_path} is empty", call=lambda: load_calibration(tmp_path)
    )


# --------------------------------------------------------------------------------------------- functions
def test_function_returning_list() -> None:
    loaded = load_calibration(f"{FACTORIES}:calib_batches")
    assert len(loaded) == 3 and loaded[0].shape == (2, 3, 8, 8)


def test_endless_generator_with_max_batches() -> None:
    loaded = load_calibration(f"{FACTORIES}:calib_generator", max_batches=4)
    assert [b[0, 0].item() for b in loaded] == [0.0, 1.0, 2.0, 3.0]


def test_function_returning_tensor_or_dict() -> None:
    samples = load_calibration(f"{FACTORIES}:calib_tensor", batch_size=2)
    assert [b.shape[0] for b in samples] == [2, 2, 1]
    (one,) = load_calibration(f"{FACTORIES}:calib_dict")
    assert one["batch_size"] == 1


def test_function_numpy_batches_become_tensors(tmp_path: Path) -> None:
    module = tmp_path / "np_calib.py"
    module.write_text(
        "import numpy as np\n\n"
        "def batches():\n"
        "    yield {'points': np.ones((4, 3), np.float32), 'frame_id': np.array([7]), 'batch_size': 1}\n"
        "    yield (np.zeros((2, 3), np.uint8), None)\n"
    )
    first, second = load_calibration(f"{module}:batches")
    assert isinstance(first["points"], torch.Tensor) and first["points"].dtype == torch.float32
    assert first["batch_size"] == 1
    assert second[0].dtype == torch.uint8 and second[1] is None


def test_module_spec_import_error() -> None:
    fails(
        CalibrationDataError,
        "--calib 'no_such_calib_pkg:batches'",
        "cannot import no_such_calib_pkg",
        call=lambda: load_calibration("no_such_calib_pkg:batches"),
    )


def test_function_errors() -> None:
    fails(
        CalibrationDataError,
        "calib_raises' raised RuntimeError: dataset root /data/kitti missing",
        call=lambda: load_calibration(f"{FACTORIES}:calib_raises"),
    )
    fails(
        CalibrationDataError,
        "failed producing batch 1: OSError: disk read error",
        call=lambda: load_calibration(f"{FACTORIES}:calib_fails_midway"),
    )
    fails(
        CalibrationDataError,
        "returned a int, not an iterable of batches",
        call=lambda: load_calibration(f"{FACTORIES}:calib_not_iterable"),
    )
    fails(
        CalibrationDataError,
        "calibration set",
        "calib_empty is empty",
        call=lambda: load_calibration(f"{FACTORIES}:calib_empty"),
    )
    fails(
        CalibrationDataError,
        "has no attribute 'calib_nothing'",
        call=lambda: load_calibration(f"{FACTORIES}:calib_nothing"),
    )


# ------------------------------------------------------------------------------------------------ checks
def test_missing_source(tmp_path: Path) -> None:
    fails(
        CalibrationDataError,
        "calibration data not found",
        call=lambda: load_calibration(tmp_path / "nope.pt"),
    )
    fails(CalibrationDataError, "no calibration data given", call=lambda: load_calibration(""))


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True])
def test_bad_batch_size(tmp_path: Path, batch_size: Any) -> None:
    fails(
        CalibrationDataError,
        "--batch-size must be a positive integer",
        call=lambda: load_calibration(tmp_path, batch_size=batch_size),
    )


def test_bad_max_batches(tmp_path: Path) -> None:
    fails(
        CalibrationDataError,
        "--batches must be a positive integer",
        call=lambda: load_calibration(tmp_path, max_batches=0),
    )


def test_non_finite_values(tmp_path: Path) -> None:
    x = torch.zeros(8, 3)
    x[5, 0] = math.nan
    x[6, 1] = math.inf
    torch.save(x, tmp_path / "calib.pt")
    fails(
        CalibrationDataError,
        "calibration batch 1 from",
        "has 2 non-finite values (NaN/Inf)",
        call=lambda: load_calibration(tmp_path / "calib.pt", batch_size=4),
    )
    assert len(load_calibration(tmp_path / "calib.pt", batch_size=4, max_batches=1)) == 1  # batch 0 is fine
    torch.save([{"voxels": torch.tensor([[1.0, -math.inf]]), "coords": torch.zeros(1, 4)}], tmp_path / "d.pt")
    fails(
        CalibrationDataError,
        "calibration batch 0",
        "1 non-finite values (NaN/Inf) (at batch['voxels'])",
        call=lambda: load_calibration(tmp_path / "d.pt"),
    )


# ------------------------------------------------------------------------------------------ split_holdout
@pytest.mark.parametrize(
    ("n", "n_fit", "n_hold"), [(2, 1, 1), (3, 2, 1), (4, 3, 1), (8, 6, 2), (9, 7, 2), (12, 9, 3)]
)
def test_split_holdout(n: int, n_fit: int, n_hold: int) -> None:
    batches = [torch.full((1,), float(i)) for i in range(n)]
    fit, held = split_holdout(batches)
    assert (len(fit), len(held)) == (n_fit, n_hold)
    assert fit + held == batches  # order kept, the last ones held out


def test_split_holdout_single_batch_coincides() -> None:
    b = torch.zeros(2)
    fit, held = split_holdout([b])
    assert fit == [b] and held == [b]


def test_split_holdout_errors() -> None:
    fails(CalibrationDataError, "is empty", call=lambda: split_holdout([]))
    for fraction in (0.0, 1.0, -0.5):
        fails(
            CalibrationDataError,
            "held-out fraction must be in (0, 1)",
            call=lambda f=fraction: split_holdout([1, 2], f),
        )
    assert split_holdout(list(range(10)), fraction=0.5) == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9])


# ----------------------------------------------------------------------------------- running and moving
def test_run_model_dispatch() -> None:
    linear = nn.Linear(4, 2)
    x = torch.randn(3, 4)
    assert torch.equal(run_model(linear, x), linear(x))
    two = resolve_callable(f"{FACTORIES}:two_input", "test")()
    scale = torch.tensor(2.0)
    assert torch.equal(run_model(two, (x, scale)), two(x, scale))
    assert torch.equal(run_model(two, [x, scale]), two(x, scale))
    as_dict = resolve_callable(f"{FACTORIES}:dict_input", "test")()
    batch = {"points": x, "batch_size": 2}
    assert torch.equal(run_model(as_dict, batch), as_dict(batch))
    fails(CalibrationDataError, "cannot feed a str to the model", call=lambda: run_model(linear, "x"))


def test_batch_to() -> None:
    Pair = namedtuple("Pair", "a b")
    batch = {
        "x": torch.zeros(2),
        "nested": [torch.ones(1), (torch.zeros(3), "name")],
        "pair": Pair(torch.zeros(1), 3),
        "frame": np.zeros(2),
        "batch_size": 2,
    }
    moved = batch_to(batch, "meta")
    assert moved["x"].is_meta and moved["nested"][0].is_meta and moved["nested"][1][0].is_meta
    assert moved["nested"][1][1] == "name" and isinstance(moved["nested"][1], tuple)
    assert isinstance(moved["pair"], Pair) and moved["pair"].a.is_meta and moved["pair"].b == 3
    assert moved["frame"] is batch["frame"] and moved["batch_size"] == 2
    assert not batch["x"].is_meta  # the input is not modified
    assert isinstance(batch_to(OrderedDict(x=torch.zeros(1)), "cpu"), OrderedDict)
    assert batch_to(torch.ones(2), "meta").is_meta


def test_describe_batch() -> None:
    assert describe_batch(torch.zeros(8, 3, 32, 32)) == "tensor float32[8, 3, 32, 32]"
    assert (
        describe_batch({"voxels": torch.zeros(1200, 10, 5), "batch_size": 2})
        == "dict(voxels: float32[1200, 10, 5], batch_size: int)"
    )
    assert describe_batch((torch.zeros(2, 4, dtype=torch.int64), None)) == "tuple(int64[2, 4], None)"
    assert describe_batch([np.zeros((2,), np.float32)]) == "list(float32[2])"
    assert describe_batch(np.zeros((3, 1), np.uint8)) == "ndarray uint8[3, 1]"
    assert describe_batch(torch.zeros(2, device="meta")) == "tensor float32[2]@meta"
    long = describe_batch(list(range(20)))
    assert long.endswith("… 12 more)") and long.startswith("list(int, int")
    assert describe_batch({"a": {"b": {"c": {"d": 1}}}}) == "dict(a: dict(b: dict(c: dict(…))))"
    assert "\n" not in describe_batch({"a\nb": 1})


def test_batch_len() -> None:
    assert batch_len(torch.zeros(5, 3)) == 5
    assert batch_len(torch.tensor(1.0)) is None
    assert batch_len((None, torch.zeros(4))) == 4
    assert batch_len({"points": torch.zeros(100, 4), "batch_size": 2}) == 2  # OpenPCDet: samples, not points
    assert batch_len({"points": torch.zeros(100, 4)}) == 100
    assert batch_len(np.zeros((7, 2))) == 7
    assert batch_len(["a", 3]) is None
    assert batch_len("text") is None
