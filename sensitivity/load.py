"""Safe model loading: state dicts, safetensors, TorchScript weights and (only when trusted) pickled modules.

What a model file may be, and what `load_model` does with it:

- a state dict saved with `torch.save(model.state_dict())` (`.pth` / `.pt`, read with `weights_only=True`),
  or a checkpoint dict wrapping one under `state_dict`, `model_state` (OpenPCDet), `model` or
  `model_state_dict`; a `module.` prefix on every key (DataParallel) is stripped. Needs
  `--arch pkg.module:factory` to build the model the weights are loaded into (`strict=True`).
- a `.safetensors` file (recognised by content, whatever its suffix): a state dict, as above.
- a pytorch-quantization checkpoint (`<layer>._input_quantizer._amax` ...) for a plain `--arch` model:
  the quantizer keys come off, the rest loads strictly, and the input amax ride along as
  `model.sensitivity_checkpoint_amax` for the scan to use instead of calibrating those layers.
- a TorchScript archive: its state dict is loaded into `--arch` (hooks cannot run on ScriptModules).
- a pickled whole `nn.Module`: only with `trust_pickle=True` (`--trust-pickle`), since unpickling runs
  arbitrary code. With `--arch` as well, its state dict is loaded into the factory's model instead.
- no file at all (`path=None`): the `--arch` factory's own weights (e.g. a factory that downloads them).

Every failure the user can fix raises a one-line `ModelLoadError` (or `UntrustedPickleError`).
The returned model is on `map_location` and in eval mode.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sensitivity.errors import ModelLoadError, SensitivityError, UntrustedPickleError
from sensitivity.errors import describe_exception as _exc
from sensitivity.errors import one_line as _one_line
from sensitivity.io.callables import resolve_callable
from sensitivity.io.pq_checkpoint import has_quantizer_keys, split_checkpoint_amax, usable_checkpoint_amax
from sensitivity.io.torchfiles import check_file, pickled_object, sniff, torch_load_weights_only

__all__ = ["STATE_DICT_KEYS", "load_model", "load_state_dict"]

#: Keys under which checkpoint dicts wrap the model's state dict, tried in this order.
STATE_DICT_KEYS = ("state_dict", "model_state", "model", "model_state_dict")
_SHOW = 5  # names listed per category in mismatch messages

log = logging.getLogger(__name__)


def _first(names: list[str], n: int = _SHOW) -> str:
    shown = ", ".join(names[:n])
    return shown + (f", … ({len(names) - n} more)" if len(names) > n else "")


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else (plural or word + 's')}"


def _corrupt(path: Path, e: BaseException | None = None, kind: str = "PyTorch checkpoint") -> ModelLoadError:
    detail = ""
    if e is not None:
        detail = " (unexpected end of file)" if isinstance(e, EOFError) else f" ({_exc(e)})"
    return ModelLoadError(f"cannot read {path}: the {kind} is truncated or corrupt{detail}")


def _untrusted(path: Path, obj: str) -> UntrustedPickleError:
    return UntrustedPickleError(
        f"{path} holds pickled Python objects ({obj}), not just weights; unpickling them can run arbitrary "
        "code, so it is refused: pass --trust-pickle only if you trust the file's source, or save "
        "model.state_dict() and load it with --arch pkg.module:factory"
    )


# ------------------------------------------------------------------------------------------ state dicts
def _is_state_dict(obj: object) -> bool:
    if not isinstance(obj, Mapping) or not obj:
        return False
    return all(
        isinstance(k, str) and (isinstance(v, Tensor) or k.endswith("_extra_state")) for k, v in obj.items()
    )


def _strip_data_parallel(sd: dict[str, Any]) -> dict[str, Any]:
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module.") :]: v for k, v in sd.items()}
    return dict(sd)


def _unwrap(obj: Any, path: Path) -> dict[str, Tensor] | nn.Module:
    """The state dict (or, from a trusted pickle, the module) inside what `torch.load` returned."""
    if isinstance(obj, nn.Module):
        return obj
    if _is_state_dict(obj):
        return _strip_data_parallel(obj)
    if isinstance(obj, Mapping):
        for key in STATE_DICT_KEYS:
            inner = obj.get(key)
            if isinstance(inner, nn.Module):
                return inner
            if _is_state_dict(inner):
                return _strip_data_parallel(inner)
        keys = [repr(k) for k in list(obj)[:8]]
        shown = ", ".join(keys) + (", …" if len(obj) > 8 else "")
        raise ModelLoadError(
            f"{path} holds a dict that is not a state dict (keys: {shown or 'none'}) and wraps none under "
            f"{', '.join(repr(k) for k in STATE_DICT_KEYS)}"
        )
    raise ModelLoadError(f"{path} holds a {type(obj).__name__}, not a state dict or checkpoint dict")


def _read(path: Path, trust_pickle: bool, map_location: Any) -> tuple[str, dict[str, Tensor] | nn.Module]:
    """(kind, state dict or module) with kind one of state_dict | safetensors | torchscript | module."""
    check_file(path, "model file", ModelLoadError)
    try:
        kind = sniff(path)
    except OSError as e:
        raise ModelLoadError(f"cannot read model file {path}: {_exc(e)}") from e
    if kind == "empty":
        raise ModelLoadError(f"model file {path} is empty")
    if kind == "zip-broken":
        raise ModelLoadError(
            f"cannot read {path}: the zip archive (torch.save format) is truncated or corrupt"
        )
    if kind == "zip-other":
        raise ModelLoadError(
            f"{path} is a zip archive but not a PyTorch checkpoint or TorchScript archive "
            "(it has no data.pkl)"
        )
    if kind == "safetensors" or (kind == "unknown" and path.suffix.lower() == ".safetensors"):
        return "safetensors", _read_safetensors(path, map_location)
    if kind == "torchscript":
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit deprecation notices
                scripted = torch.jit.load(str(path), map_location=map_location)
        except Exception as e:
            raise _corrupt(path, e, "TorchScript archive") from e
        return "torchscript", _strip_data_parallel(dict(scripted.state_dict()))
    if kind == "unknown":
        raise ModelLoadError(
            f"{path} is not a PyTorch checkpoint (.pth/.pt), safetensors file or TorchScript archive"
        )

    try:
        obj = torch_load_weights_only(path, map_location)
    except Exception as e:
        refused = pickled_object(e)
        if refused is None:
            raise _corrupt(path, e) from e
        if not trust_pickle:
            raise _untrusted(path, refused) from None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                obj = torch.load(path, map_location=map_location, weights_only=False)
        except Exception as e2:
            raise ModelLoadError(f"cannot unpickle {path} (with --trust-pickle): {_exc(e2)}") from e2
    result = _unwrap(obj, path)
    return ("module" if isinstance(result, nn.Module) else "state_dict"), result


def _read_safetensors(path: Path, map_location: Any) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    device = str(map_location) if map_location is not None else "cpu"
    try:
        sd = load_file(str(path), device=device)
    except Exception as e:
        raise _corrupt(path, e, "safetensors file") from e
    if not sd:
        raise ModelLoadError(f"safetensors file {path} holds no tensors")
    return _strip_data_parallel(sd)


def load_state_dict(
    path: str | Path, map_location: str | torch.device = "cpu", trust_pickle: bool = False
) -> dict[str, Tensor]:
    """The state dict in a `.pth`/`.pt` (weights only), `.safetensors` or TorchScript archive.

    Checkpoint dicts are unwrapped (`state_dict`, `model_state`, `model`, `model_state_dict`) and a
    DataParallel `module.` prefix is stripped. A pickled module raises `UntrustedPickleError` unless
    `trust_pickle` (then its `state_dict()` is returned).
    """
    _, obj = _read(Path(path), trust_pickle, map_location)
    return dict(obj.state_dict()) if isinstance(obj, nn.Module) else obj


# ---------------------------------------------------------------------------------------------- models
def _parse_kwargs(arch_kwargs: dict[str, Any] | str | None) -> dict[str, Any]:
    if arch_kwargs is None:
        return {}
    if isinstance(arch_kwargs, Mapping):
        return dict(arch_kwargs)
    text = str(arch_kwargs).strip()
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelLoadError(
            f"--arch-kwargs is not valid JSON ({e.msg} at column {e.colno}): {_one_line(text, 120)}"
        ) from None
    except RecursionError:
        raise ModelLoadError(f"--arch-kwargs is nested too deeply: {_one_line(text, 60)}") from None
    if not isinstance(value, dict):
        raise ModelLoadError(
            f"--arch-kwargs must be a JSON object like '{{\"width\": 8}}', got a {type(value).__name__}"
        )
    return value


def _build(arch: str, kwargs: dict[str, Any]) -> nn.Module:
    factory = resolve_callable(arch, "--arch", ModelLoadError)
    try:
        model = factory(**kwargs)
    except SensitivityError:
        raise
    except Exception as e:
        raise ModelLoadError(f"--arch factory {arch!r} raised {_exc(e)}") from e
    if isinstance(model, torch.jit.ScriptModule):
        raise ModelLoadError(
            f"--arch factory {arch!r} returned a TorchScript module; hooks cannot run on ScriptModules, "
            "so the factory must build the eager nn.Module"
        )
    if not isinstance(model, nn.Module):
        raise ModelLoadError(
            f"--arch factory {arch!r} returned a {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def _shape(x: object) -> str:
    return str(list(x.shape)) if isinstance(x, Tensor) else type(x).__name__


def _load_into(model: nn.Module, sd: dict[str, Any], arch: str, path: Path) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    mismatched = [
        f"{k} file {_shape(sd[k])} vs model {_shape(v)}"
        for k, v in expected.items()
        if k in sd and isinstance(v, Tensor) and isinstance(sd[k], Tensor) and sd[k].shape != v.shape
    ]
    parts = []
    if missing:
        parts.append(f"{_plural(len(missing), 'missing key')}: {_first(missing)}")
    if unexpected:
        parts.append(f"{_plural(len(unexpected), 'unexpected key')}: {_first(unexpected)}")
    if mismatched:
        parts.append(
            f"{_plural(len(mismatched), 'shape mismatch', 'shape mismatches')}: {_first(mismatched)}"
        )
    if parts:
        raise ModelLoadError(f"the weights in {path.name} do not match --arch {arch}: " + "; ".join(parts))
    try:
        model.load_state_dict(sd, strict=True)
    except Exception as e:
        raise ModelLoadError(
            f"loading the weights in {path.name} into --arch {arch} failed: {_exc(e)}"
        ) from e


def _split_quantizer_state(
    model: nn.Module, sd: dict[str, Any], path: Path
) -> tuple[dict[str, Any], dict[str, dict[str, Tensor]]]:
    """A pytorch-quantization checkpoint for a plain `--arch` model: (the FP state dict, its layers' amax).

    Its `_input_quantizer` / `_weight_quantizer` keys come off so the rest loads strictly, and their amax
    come back for the scan to use instead of calibrating those layers. A model that has such quantizers
    itself gets the state dict unchanged.
    """
    if not has_quantizer_keys(sd):
        return sd, {}
    if any(
        n.rpartition(".")[2] in ("_input_quantizer", "_weight_quantizer") for n, _ in model.named_modules()
    ):
        return sd, {}
    plain, amax = split_checkpoint_amax(sd)
    amax, dropped = usable_checkpoint_amax(amax)
    for layer, why in dropped.items():
        log.warning(
            "%s: layer %s has %s, not a positive per-tensor range: calibrating it", path.name, layer, why
        )
    n_input = sum(1 for entry in amax.values() if "input" in entry)
    log.info(
        "%s is a pytorch-quantization checkpoint with input amax for %s (used instead of calibrating them)",
        path.name,
        _plural(n_input, "layer"),
    )
    return plain, amax


def load_model(
    path: str | Path | None,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | str | None = None,
    trust_pickle: bool = False,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """The eager `nn.Module` to analyse (see the module docstring for the accepted files), in eval mode.

    `arch` is `pkg.module:factory` or `path/to/file.py:factory`, called with `arch_kwargs` (a dict or a
    JSON object string). Weights must match the factory's model exactly: missing, unexpected and
    wrongly shaped keys are named in the error.
    """
    kwargs = _parse_kwargs(arch_kwargs)
    if kwargs and arch is None:
        raise ModelLoadError("--arch-kwargs given without --arch pkg.module:factory")
    if path is None:
        if arch is None:
            raise ModelLoadError("no model given: pass a model file and/or --arch pkg.module:factory")
        model = _build(arch, kwargs)
    else:
        file = Path(path)
        kind, obj = _read(file, trust_pickle, map_location)
        if arch is None:
            if isinstance(obj, nn.Module):
                model = obj
            elif kind == "torchscript":
                raise ModelLoadError(
                    f"{file} is a TorchScript archive and hooks cannot run on ScriptModules: "
                    "pass --arch pkg.module:factory to build the eager model its weights are loaded into"
                )
            else:
                raise ModelLoadError(
                    f"{file} holds only weights (a state dict of {_plural(len(obj), 'tensor')}), "
                    "not the model: pass --arch pkg.module:factory to build it"
                )
        else:
            model = _build(arch, kwargs)
            sd = dict(obj.state_dict()) if isinstance(obj, nn.Module) else obj
            sd, checkpoint_amax = _split_quantizer_state(model, sd, file)
            _load_into(model, sd, arch, file)
            if checkpoint_amax:
                model.sensitivity_checkpoint_amax = checkpoint_amax  # type: ignore[assignment]
    if isinstance(model, torch.jit.ScriptModule):  # a trusted pickle can hold anything
        raise ModelLoadError(
            f"{path} holds a TorchScript module; hooks cannot run on ScriptModules: pass --arch"
        )
    return model.to(map_location).eval()
