"""Model loading: every accepted file kind, and every user-fixable failure as one clear line."""

from __future__ import annotations

import pickle
import sys
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from sensitivity.errors import ModelLoadError, SensitivityError, UntrustedPickleError
from sensitivity.load import STATE_DICT_KEYS, load_model, load_state_dict, resolve_callable

FACTORIES = str(Path(__file__).with_name("factories.py"))
ARCH = f"{FACTORIES}:tiny_cnn"


def tiny(width: int = 4) -> nn.Module:
    """A TinyCNN from the same module instance `load_model` imports (so pickled classes match)."""
    torch.manual_seed(width)
    model = resolve_callable(ARCH, "test")(width=width)
    with torch.no_grad():  # non-default BN statistics, so a load that drops buffers is caught
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    return model.eval()


def fails(exc: type[SensitivityError], *needles: str, call: Callable[[], Any]) -> str:
    """Run `call`, expect `exc` with a one-line message containing every needle; return the message."""
    with pytest.raises(exc) as info:
        call()
    msg = str(info.value)
    assert "\n" not in msg and "\r" not in msg, msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    return msg


def same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ------------------------------------------------------------------------------------------ state dicts
def test_state_dict_round_trip(tmp_path: Path) -> None:
    ref = tiny(4)
    path = tmp_path / "model.pth"
    torch.save(ref.state_dict(), path)
    model = load_model(path, arch=ARCH, arch_kwargs={"width": 4})
    same_weights(model, ref)
    assert not model.training
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(model(x), ref(x))


def test_legacy_serialization_state_dict(tmp_path: Path) -> None:
    ref = tiny(4)
    path = tmp_path / "old.pth"
    torch.save(ref.state_dict(), path, _use_new_zipfile_serialization=False)
    same_weights(load_model(path, arch=ARCH, arch_kwargs={"width": 4}), ref)


def test_json_kwargs(tmp_path: Path) -> None:
    ref = tiny(6)
    path = tmp_path / "model.pt"
    torch.save(ref.state_dict(), path)
    model = load_model(path, arch=ARCH, arch_kwargs='{"width": 6, "num_classes": 10}')
    same_weights(model, ref)
    assert load_model(None, arch=ARCH, arch_kwargs="  ").conv.out_channels == 8  # blank = no kwargs


def test_json_kwargs_errors(tmp_path: Path) -> None:
    fails(
        ModelLoadError,
        "--arch-kwargs is not valid JSON",
        "column",
        call=lambda: load_model(None, arch=ARCH, arch_kwargs="{width: 4}"),
    )
    fails(
        ModelLoadError,
        "--arch-kwargs must be a JSON object",
        "got a list",
        call=lambda: load_model(None, arch=ARCH, arch_kwargs="[4]"),
    )
    fails(
        ModelLoadError,
        "--arch-kwargs given without --arch",
        call=lambda: load_model(None, arch_kwargs={"width": 4}),
    )


def test_safetensors(tmp_path: Path) -> None:
    ref = tiny(4)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    same_weights(load_model(path, arch=ARCH, arch_kwargs={"width": 4}), ref)
    # recognised by content, not by suffix
    renamed = path.rename(tmp_path / "weights.bin")
    same_weights(load_model(renamed, arch=ARCH, arch_kwargs={"width": 4}), ref)
    assert load_state_dict(renamed).keys() == ref.state_dict().keys()


def test_truncated_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in tiny(4).state_dict().items()}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    fails(
        ModelLoadError, "safetensors file is truncated or corrupt", call=lambda: load_model(path, arch=ARCH)
    )


def test_torchscript_archive_with_arch(tmp_path: Path) -> None:
    ref = tiny(4)
    path = tmp_path / "model.ts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(ref, torch.randn(1, 3, 8, 8)), str(path))
    model = load_model(path, arch=ARCH, arch_kwargs={"width": 4})
    assert not isinstance(model, torch.jit.ScriptModule)
    same_weights(model, ref)
    assert load_state_dict(path).keys() == ref.state_dict().keys()


def test_torchscript_archive_without_arch(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(nn.Linear(2, 2)), str(path))
    fails(
        ModelLoadError,
        "TorchScript archive",
        "hooks cannot run on ScriptModules",
        "pass --arch pkg.module:factory",
        call=lambda: load_model(path),
    )


@pytest.mark.parametrize("zip_format", [True, False])
def test_pickled_module_refused(tmp_path: Path, zip_format: bool) -> None:
    path = tmp_path / "whole.pt"
    torch.save(tiny(4), path, _use_new_zipfile_serialization=zip_format)
    msg = fails(
        UntrustedPickleError,
        "pickled Python objects",
        "TinyCNN",
        "--trust-pickle",
        "arbitrary code",
        call=lambda: load_model(path),
    )
    assert isinstance(UntrustedPickleError(msg), ModelLoadError)
    fails(UntrustedPickleError, "--trust-pickle", call=lambda: load_model(path, arch=ARCH))
    fails(UntrustedPickleError, "--trust-pickle", call=lambda: load_state_dict(path))


def test_pickled_module_trusted(tmp_path: Path) -> None:
    ref = tiny(4)
    ref.train()
    path = tmp_path / "whole.pt"
    torch.save(ref, path)
    model = load_model(path, trust_pickle=True)
    assert type(model) is type(ref)
    assert not model.training
    same_weights(model, ref)
    # with --arch as well, the pickle only supplies weights for the factory's model
    rebuilt = load_model(path, arch=ARCH, arch_kwargs={"width": 4}, trust_pickle=True)
    assert rebuilt is not model
    same_weights(rebuilt, ref)
    assert load_state_dict(path, trust_pickle=True).keys() == ref.state_dict().keys()


def test_pickled_checkpoint_with_module_trusted(tmp_path: Path) -> None:
    ref = tiny(4)
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "model": ref}, path)
    fails(UntrustedPickleError, "--trust-pickle", call=lambda: load_model(path))
    same_weights(load_model(path, trust_pickle=True), ref)


def test_corrupt_pickle_is_not_untrusted(tmp_path: Path) -> None:
    """An unknown opcode makes torch's weights-only unpickler fail too: that is corruption, not a pickle."""
    path = tmp_path / "bad.pth"
    path.write_bytes(b"\x80\x02\xff\xfe garbage")
    msg = fails(ModelLoadError, "truncated or corrupt", call=lambda: load_model(path, arch=ARCH))
    with pytest.raises(ModelLoadError) as info:
        load_model(path, arch=ARCH)
    assert not isinstance(info.value, UntrustedPickleError), msg


@pytest.mark.parametrize("zip_format", [True, False])
def test_truncated_checkpoint(tmp_path: Path, zip_format: bool) -> None:
    path = tmp_path / "model.pth"
    torch.save(tiny(4).state_dict(), path, _use_new_zipfile_serialization=zip_format)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    fails(
        ModelLoadError,
        f"cannot read {path}",
        "truncated or corrupt",
        call=lambda: load_model(path, arch=ARCH),
    )


def test_random_zip(tmp_path: Path) -> None:
    path = tmp_path / "model.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hello")
        z.writestr("weights/a.bin", b"\x00" * 16)
    fails(
        ModelLoadError,
        "is a zip archive but not a PyTorch checkpoint",
        call=lambda: load_model(path, arch=ARCH),
    )


def test_neither_format(tmp_path: Path) -> None:
    path = tmp_path / "model.pth"
    path.write_text("this is a text file, not weights\n")
    fails(
        ModelLoadError,
        "is not a PyTorch checkpoint (.pth/.pt), safetensors file or TorchScript archive",
        call=lambda: load_model(path, arch=ARCH),
    )
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    fails(ModelLoadError, "is empty", call=lambda: load_model(empty, arch=ARCH))


def test_plain_pickle_of_tensors_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "model.pkl"
    with open(path, "wb") as f:
        pickle.dump({"w": [1.0, 2.0]}, f, protocol=4)
    fails(ModelLoadError, "truncated or corrupt", call=lambda: load_model(path, arch=ARCH))


def test_missing_file_and_directory(tmp_path: Path) -> None:
    fails(ModelLoadError, "model file not found", "nope.pth", call=lambda: load_model(tmp_path / "nope.pth"))
    fails(ModelLoadError, "is a directory", call=lambda: load_model(tmp_path, arch=ARCH))


def test_state_dict_without_arch(tmp_path: Path) -> None:
    path = tmp_path / "model.pth"
    torch.save(tiny(4).state_dict(), path)
    fails(
        ModelLoadError,
        "holds only weights",
        "9 tensors",
        "pass --arch pkg.module:factory",
        call=lambda: load_model(path),
    )


def test_no_file_and_no_arch() -> None:
    fails(ModelLoadError, "no model given", "--arch pkg.module:factory", call=lambda: load_model(None))


def test_no_file_builds_factory_model() -> None:
    model = load_model(None, arch=ARCH, arch_kwargs={"width": 3})
    assert model.conv.out_channels == 3 and not model.training


# ------------------------------------------------------------------------------------------- mismatches
def test_missing_and_unexpected_keys(tmp_path: Path) -> None:
    sd = tiny(4).state_dict()
    del sd["fc.weight"], sd["bn.running_var"]
    sd["head.extra"] = torch.zeros(1)
    path = tmp_path / "model.pth"
    torch.save(sd, path)
    fails(
        ModelLoadError,
        f"do not match --arch {ARCH}",
        "2 missing keys: bn.running_var, fc.weight",
        "1 unexpected key: head.extra",
        call=lambda: load_model(path, arch=ARCH, arch_kwargs={"width": 4}),
    )


def test_many_missing_keys_are_counted(tmp_path: Path) -> None:
    path = tmp_path / "model.pth"
    torch.save({"other.weight": torch.zeros(1)}, path)
    msg = fails(
        ModelLoadError,
        "9 missing keys: conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, … (4 more)",
        call=lambda: load_model(path, arch=ARCH),
    )
    assert "bn.num_batches_tracked" not in msg  # only the first five are named


def test_shape_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "model.pth"
    torch.save(tiny(4).state_dict(), path)
    msg = fails(
        ModelLoadError,
        "shape mismatches",
        "conv.weight file [4, 3, 3, 3] vs model [8, 3, 3, 3]",
        call=lambda: load_model(path, arch=ARCH, arch_kwargs={"width": 8}),
    )
    assert "missing" not in msg and "unexpected" not in msg


def test_data_parallel_prefix(tmp_path: Path) -> None:
    ref = tiny(4)
    path = tmp_path / "dp.pth"
    torch.save({f"module.{k}": v for k, v in ref.state_dict().items()}, path)
    same_weights(load_model(path, arch=ARCH, arch_kwargs={"width": 4}), ref)
    assert all(not k.startswith("module.") for k in load_state_dict(path))


@pytest.mark.parametrize("key", STATE_DICT_KEYS)
def test_checkpoint_wrapped_state_dict(tmp_path: Path, key: str) -> None:
    ref = tiny(4)
    path = tmp_path / "ckpt.pth"
    inner = {f"module.{k}": v for k, v in ref.state_dict().items()}
    optimizer = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    torch.save({"epoch": 7, "it": 100, key: inner, "optimizer_state": optimizer.state_dict()}, path)
    same_weights(load_model(path, arch=ARCH, arch_kwargs={"width": 4}), ref)


def test_checkpoint_without_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 7, "weights": [torch.zeros(2)]}, path)
    fails(
        ModelLoadError,
        "holds a dict that is not a state dict",
        "'epoch', 'weights'",
        "'model_state'",
        call=lambda: load_model(path, arch=ARCH),
    )
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], listed)
    fails(ModelLoadError, "holds a list, not a state dict", call=lambda: load_model(listed, arch=ARCH))


# -------------------------------------------------------------------------------------------- factories
def test_factory_raises() -> None:
    fails(
        ModelLoadError,
        f"--arch factory '{FACTORIES}:broken' raised ValueError: width 3 is not supported",
        call=lambda: load_model(None, arch=f"{FACTORIES}:broken", arch_kwargs={"width": 3}),
    )
    fails(
        ModelLoadError,
        "raised TypeError",
        call=lambda: load_model(None, arch=ARCH, arch_kwargs={"depth": 3}),
    )


def test_factory_returns_non_module() -> None:
    fails(
        ModelLoadError,
        "returned a dict, not a torch.nn.Module",
        call=lambda: load_model(None, arch=f"{FACTORIES}:not_a_module"),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fails(
            ModelLoadError,
            "returned a TorchScript module",
            call=lambda: load_model(None, arch=f"{FACTORIES}:scripted"),
        )


# ------------------------------------------------------------------------------------- resolve_callable
def test_resolve_module_spec() -> None:
    assert resolve_callable("torch.nn:Linear", "--arch") is nn.Linear
    assert resolve_callable("torch:nn.Linear", "--arch") is nn.Linear  # dotted attribute
    model = load_model(None, arch="torch.nn:Linear", arch_kwargs='{"in_features": 3, "out_features": 2}')
    assert isinstance(model, nn.Linear)


def test_resolve_file_spec_is_cached() -> None:
    a = resolve_callable(ARCH, "--arch")
    b = resolve_callable(f" {ARCH} ", "--arch")
    assert a is b


@pytest.mark.parametrize("spec", ["torch.nn.Linear", ":Linear", "torch.nn:", "torch.nn:1bad"])
def test_resolve_bad_form(spec: str) -> None:
    fails(
        ModelLoadError,
        "is not of the form pkg.module:attr or path/to/file.py:attr",
        call=lambda: resolve_callable(spec, "--arch"),
    )


def test_resolve_errors(tmp_path: Path) -> None:
    fails(
        ModelLoadError,
        "--arch 'no_such_pkg_xyz.models:net'",
        "cannot import no_such_pkg_xyz.models",
        call=lambda: resolve_callable("no_such_pkg_xyz.models:net", "--arch"),
    )
    fails(
        ModelLoadError,
        "has no attribute 'tiny_cn'",
        "did you mean tiny_cnn",
        call=lambda: resolve_callable(f"{FACTORIES}:tiny_cn", "--arch"),
    )
    fails(
        ModelLoadError,
        "is a int, not a callable",
        call=lambda: resolve_callable(f"{FACTORIES}:NOT_CALLABLE", "--arch"),
    )
    fails(
        ModelLoadError,
        "file",
        "not found",
        call=lambda: resolve_callable(str(tmp_path / "missing.py") + ":f", "--arch"),
    )
    bad = tmp_path / "bad_models.py"
    bad.write_text("import torch\nraise RuntimeError('cuda\\nnot available')\n")
    fails(
        ModelLoadError,
        "importing bad_models.py failed: RuntimeError: cuda not available",
        call=lambda: resolve_callable(f"{bad}:net", "--arch"),
    )
    # the error class follows the caller (calibration functions raise CalibrationDataError)
    from sensitivity.errors import CalibrationDataError

    with pytest.raises(CalibrationDataError, match="--calib"):
        resolve_callable("torch.nn:nothing_here", "--calib", CalibrationDataError)


def test_resolve_retries_with_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Console scripts leave the current directory off sys.path; `my_models:net` should still work."""
    (tmp_path / "my_models_cwd_test.py").write_text("def net():\n    return 'built'\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "my_models_cwd_test", raising=False)
    try:
        assert resolve_callable("my_models_cwd_test:net", "--arch")() == "built"
    finally:
        sys.modules.pop("my_models_cwd_test", None)


def test_file_spec_sibling_imports(tmp_path: Path) -> None:
    (tmp_path / "blocks_sibling_test.py").write_text("WIDTH = 5\n")
    (tmp_path / "net_sibling.py").write_text(
        "import torch\nfrom blocks_sibling_test import WIDTH\n\n"
        "def net():\n    return torch.nn.Linear(WIDTH, 1)\n"
    )
    try:
        model = load_model(None, arch=f"{tmp_path / 'net_sibling.py'}:net")
        assert model.in_features == 5
        assert str(tmp_path) not in sys.path
    finally:
        sys.modules.pop("blocks_sibling_test", None)
