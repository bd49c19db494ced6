"""Output folders that never cost the user a file.

A folder the tool writes (a scan report, a demo, a `pcdet-dump`) is built in a temp folder beside the
target and moved into place at the end, so an interrupted or failed run leaves no half-written folder.
The rules, checked before any work:

- the output folder may not be the current directory or hold it, hold an input (the model, the
  calibration data, a policy...), or lie inside an input folder (a report inside `--calib DIR` would be
  read back as batches);
- an existing folder is replaced only with `overwrite`, and only when the tool wrote it: every folder it
  writes carries a `.sensitivity` marker file (older report folders are recognised by their scan.json);
- a symlink given as the output is followed: the folder it points to is written, the link stays.

The final move is atomic on Linux (`renameat2`: RENAME_NOREPLACE, or RENAME_EXCHANGE to replace), so two
runs racing for one folder cannot silently replace each other's work, and signals are deferred while it
happens. Where `renameat2` is missing, a two-step swap is used and its leftovers (and the temp folders of
runs that were killed) are cleaned up by the next run into the same folder.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from sensitivity.errors import OutputDirError
from sensitivity.files.atomic import default_mode
from sensitivity.files.signals import deferred_signals, outputs_committed

__all__ = [
    "MARKER",
    "atomic_dir",
    "check_output_dir",
    "check_output_files",
    "default_report_name",
    "is_tool_folder",
    "mark_folder",
    "staged_files",
]

#: The file that marks a folder as written by sensitivity (and so replaceable with --overwrite).
MARKER = ".sensitivity"
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


def mark_folder(folder: Path, kind: str) -> None:
    (folder / MARKER).write_text(json.dumps({"written_by": "sensitivity", "kind": kind, "version": 1}) + "\n")


def is_tool_folder(folder: Path) -> bool:
    """Written by sensitivity: it holds the marker, or (report folders of older versions) a scan.json of
    the sensitivity-scan format."""
    if (folder / MARKER).is_file():
        return True
    try:
        return json.loads((folder / "scan.json").read_text()).get("format") == "sensitivity-scan"
    except (OSError, ValueError, AttributeError, RecursionError):
        return False


def default_report_name(model: str | os.PathLike[str]) -> str:
    """`reports/<this>`: the model file's stem, or `model` when the stem is empty or only dots (`..pth`)."""
    stem = Path(model).stem.strip()
    return stem if stem.strip(".") else "model"


def _real(path: str | os.PathLike[str], what: str) -> Path:
    if not str(path).strip():
        raise OutputDirError(f"the {what} is empty: give a folder name, e.g. --out reports/mymodel")
    return Path(path).expanduser().resolve()


def _inputs(inputs: Iterable[str | os.PathLike[str] | None]) -> list[Path]:
    found = []
    for item in inputs:
        if item is None or not str(item).strip():
            continue
        path = Path(item).expanduser()
        if path.exists():  # `pkg.module:function` specs are not paths
            found.append(path.resolve())
    return found


def _check_place(real: Path, shown: str | os.PathLike[str], inputs: list[Path]) -> None:
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise OutputDirError(
            f"output folder {shown} is the current directory or holds it: choose a new folder, e.g. "
            "--out reports/mymodel"
        )
    for item in inputs:
        if real == item or real in item.parents:
            raise OutputDirError(f"output folder {shown} holds the input {item}: choose another folder")
        if item.is_dir() and item in real.parents:
            raise OutputDirError(
                f"output folder {shown} lies inside the input folder {item} (it would be read back as "
                "input): choose another folder"
            )


def _check_parent(real: Path, shown: str | os.PathLike[str]) -> None:
    for folder in real.parents:  # the nearest one that exists is where the folder will be made
        if folder.exists():
            if not folder.is_dir():
                raise OutputDirError(f"cannot write to {shown}: {folder} is a file, not a folder")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise OutputDirError(f"cannot write to {shown}: {folder} is not writable (permission denied)")
            return


def check_output_dir(
    path: str | os.PathLike[str],
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike[str] | None] = (),
) -> Path:
    """Refuse, in one line and before any work, an output folder the rules above forbid; returns the real
    path to write (symlinks followed)."""
    real = _real(path, "output folder")
    _check_place(real, path, _inputs(inputs))
    if real.exists():
        if not real.is_dir():
            raise OutputDirError(f"output path {path} exists and is not a folder")
        if not overwrite:
            raise OutputDirError(f"output folder {path} already exists: pass --overwrite to replace it")
        if not is_tool_folder(real):
            raise OutputDirError(
                f"output folder {path} was not written by sensitivity (no {MARKER} marker): it is not "
                "replaced, even with --overwrite; choose another --out"
            )
    _check_parent(real, path)
    return real


def check_output_files(
    folder: str | os.PathLike[str], names: Iterable[str], inputs: Iterable[str | os.PathLike[str] | None] = ()
) -> Path:
    """For commands that add files to a folder (`apply`): no output may be an input, and in a folder the
    tool did not write no existing file is replaced. Returns the real folder."""
    real = _real(folder, "output folder")
    ins = _inputs(inputs)
    if real.exists() and not real.is_dir():
        raise OutputDirError(f"output path {folder} exists and is not a folder")
    ours = real.is_dir() and is_tool_folder(real)
    for name in names:
        target = real / name
        for item in ins:
            if target == item or (target.exists() and item.exists() and os.path.samefile(target, item)):
                raise OutputDirError(
                    f"{target} is an input of this command and would be overwritten: pass --out NEW_FOLDER"
                )
        if target.exists() and not ours:
            raise OutputDirError(
                f"{target} exists in a folder sensitivity did not write: it is not replaced; pass --out NEW_FOLDER"
            )
    _check_parent(real, folder)
    return real


# ------------------------------------------------------------------------------------------ atomic moves
def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux renameat2; False where the C library or the file system does not offer it."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), ctypes.c_uint(flags)) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _move_new(src: Path, dst: Path) -> None:
    """src -> dst where dst must not exist (FileExistsError if it does, even if it appeared just now)."""
    if not _renameat2(src, dst, _RENAME_NOREPLACE):
        if dst.exists() or dst.is_symlink():
            raise FileExistsError(errno.EEXIST, "exists", str(dst))
        os.rename(src, dst)


def _swap(new: Path, dst: Path, old: Path) -> None:
    """Make `new` be `dst`, leaving the previous `dst` at `new` (exchange) or at `old` (fallback)."""
    if _renameat2(new, dst, _RENAME_EXCHANGE):
        return
    os.rename(dst, old)
    try:
        os.rename(new, dst)
    except OSError:
        os.rename(old, dst)
        raise
    os.rename(old, new)


_STALE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)(?:-.*)?$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(parent: Path, name: str) -> None:
    """Remove temp folders left beside `parent/name` by runs that were killed; an old report moved aside by
    an interrupted fallback swap goes back in place when the folder is missing."""
    if not parent.is_dir():
        return
    for entry in parent.iterdir():
        m = _STALE.match(entry.name)
        if not m or m["name"] != name or _alive(int(m["pid"])):
            continue
        target = parent / name
        if m["kind"] == "old" and not target.exists():
            os.rename(entry, target)
        else:
            shutil.rmtree(entry, ignore_errors=True)


class atomic_dir:
    """`with atomic_dir(path, overwrite, inputs) as tmp:` write into tmp; on success tmp becomes path."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        overwrite: bool = False,
        inputs: Iterable[str | os.PathLike[str] | None] = (),
        kind: str = "scan",
    ) -> None:
        self.shown = path
        self.path = Path(path)
        self.overwrite = overwrite
        self.inputs = list(inputs)
        self.kind = kind
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        self.path = check_output_dir(self.shown, self.overwrite, self.inputs)
        parent = self.path.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            with deferred_signals():
                clean_stale(parent, self.path.name)
                prefix = f".{self.path.name}.partial-{os.getpid()}-"
                self.tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
            os.chmod(self.tmp, default_mode(directory=True))  # mkdtemp's 0700 would make the report private
            mark_folder(self.tmp, self.kind)
        except OSError as exc:
            raise OutputDirError(f"cannot write to {parent}: {exc.strerror or exc}") from exc
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.tmp is not None
        with deferred_signals():  # a second Ctrl-C must not cut the clean-up or the move in half
            if exc_type is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                if isinstance(exc, OSError) and not isinstance(exc, OutputDirError):
                    raise OutputDirError(f"writing {self.shown} failed: {exc.strerror or exc}") from exc
                return
            self._commit(self.tmp)
            outputs_committed()

    def _commit(self, tmp: Path) -> None:
        try:
            if self.path.exists():
                if not (self.overwrite and is_tool_folder(self.path)):
                    raise OutputDirError(
                        f"output folder {self.shown} appeared while this run was working (another run?): it is "
                        "not replaced; pass --overwrite, or choose another --out"
                    )
                _swap(tmp, self.path, self.path.with_name(f".{self.path.name}.old-{os.getpid()}"))
                shutil.rmtree(tmp, ignore_errors=True)  # now the previous folder
            else:
                _move_new(tmp, self.path)
        except FileExistsError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise OutputDirError(
                f"output folder {self.shown} appeared while this run was working (another run?): it is not "
                "replaced; pass --overwrite, or choose another --out"
            ) from None
        except OutputDirError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise OutputDirError(f"cannot move the report into {self.shown}: {exc.strerror or exc}") from exc


class staged_files:
    """`with staged_files(folder) as tmp:` write files into tmp; on success they all land in `folder` (a new
    folder appears whole, with its marker; in an existing one each file replaces its namesake, the whole set
    moved with signals deferred), so an interrupted `apply` leaves either all its outputs or none. Check
    the outputs first with `check_output_files`."""

    def __init__(self, folder: str | os.PathLike[str], kind: str = "apply") -> None:
        self.folder = Path(folder)
        self.kind = kind
        self.inner: atomic_dir | None = None
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        if not self.folder.exists():
            self.inner = atomic_dir(self.folder, kind=self.kind)
            self.tmp = self.inner.__enter__()
            return self.tmp
        try:
            with deferred_signals():
                clean_stale(self.folder, "files")
                self.tmp = Path(tempfile.mkdtemp(prefix=f".files.partial-{os.getpid()}-", dir=self.folder))
        except OSError as exc:
            raise OutputDirError(f"cannot write to {self.folder}: {exc.strerror or exc}") from exc
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.inner is not None:
            self.inner.__exit__(exc_type, exc, tb)
            return
        assert self.tmp is not None
        with deferred_signals():
            try:
                if exc_type is None:
                    for item in sorted(self.tmp.iterdir()):
                        os.replace(item, self.folder / item.name)
                    outputs_committed()
            except OSError as err:
                raise OutputDirError(
                    f"cannot move the outputs into {self.folder}: {err.strerror or err}"
                ) from err
            finally:
                shutil.rmtree(self.tmp, ignore_errors=True)
        if isinstance(exc, OSError) and not isinstance(exc, OutputDirError):
            raise OutputDirError(f"writing into {self.folder} failed: {exc.strerror or exc}") from exc
