"""User code named on the command line (`--arch`, `--calib`, `--eval`, `--outputs`): `pkg.module:attr` or
`path/to/file.py:attr`, imported and resolved with one-line errors that name the spec."""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sensitivity.errors import ModelLoadError, SensitivityError
from sensitivity.errors import describe_exception as _exc

__all__ = ["resolve_callable"]


def resolve_callable(
    spec: str, what: str, error: type[SensitivityError] = ModelLoadError
) -> Callable[..., Any]:
    """The callable named by `pkg.module:attr` or `path/to/file.py:attr` (`attr` may be dotted).

    `what` names the option in messages (e.g. `--arch`); failures raise `error` (one line, naming the spec).
    A module that is not importable is retried with the current directory on `sys.path`, as
    `python -m` would have it (console scripts leave it off). A file is imported under a private module
    name (once per absolute path), with its own folder on `sys.path` while it runs.
    """
    text = str(spec).strip()
    module_name, sep, attr = text.rpartition(":")
    if not sep or not module_name or not attr or not all(p.isidentifier() for p in attr.split(".")):
        raise error(f"{what} {text!r} is not of the form pkg.module:attr or path/to/file.py:attr")
    is_file = module_name.endswith(".py") or "/" in module_name or os.sep in module_name
    module = (
        _import_file(module_name, text, what, error)
        if is_file
        else _import_module(module_name, text, what, error)
    )

    obj: Any = module
    for i, part in enumerate(attr.split(".")):
        if not hasattr(obj, part):
            owner = module_name if i == 0 else ".".join(attr.split(".")[:i])
            close = difflib.get_close_matches(part, [n for n in dir(obj) if not n.startswith("_")], n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise error(f"{what} {text!r}: {owner} has no attribute {part!r}{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise error(f"{what} {text!r} is a {type(obj).__name__}, not a callable")
    return obj


def _import_module(name: str, spec: str, what: str, error: type[SensitivityError]) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        missing = e.name or ""
        cwd = os.getcwd()
        own = bool(missing) and (name == missing or name.startswith(missing + "."))
        if own and cwd not in sys.path and "" not in sys.path:
            sys.path.insert(0, cwd)
            try:
                return importlib.import_module(name)
            except ModuleNotFoundError as e2:
                e = e2
            except Exception as e2:
                raise error(f"{what} {spec!r}: importing {name} failed: {_exc(e2)}") from e2
        raise error(f"{what} {spec!r}: cannot import {name} ({_exc(e)})") from e
    except Exception as e:
        raise error(f"{what} {spec!r}: importing {name} failed: {_exc(e)}") from e


def _import_file(file: str, spec: str, what: str, error: type[SensitivityError]) -> Any:
    path = Path(file).expanduser().resolve()
    if not path.is_file():
        raise error(f"{what} {spec!r}: file {path} not found")
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    stem = re.sub(r"\W", "_", path.stem)
    name = f"_sensitivity_user_{stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise error(f"{what} {spec!r}: {path} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    folder = str(path.parent)
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise error(f"{what} {spec!r}: importing {path.name} failed: {_exc(e)}") from e
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)
    return module
