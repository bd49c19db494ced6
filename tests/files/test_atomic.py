"""Atomic file writes: the file appears whole or not at all, with ordinary permissions."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from sensitivity.files import atomic_write, default_mode


def test_a_write_replaces_the_file_whole_with_ordinary_permissions(tmp_path: Path) -> None:
    path = tmp_path / "x.txt"
    path.write_text("old")
    atomic_write(path, lambda f: f.write(b"new"))
    assert path.read_text() == "new" and stat.S_IMODE(os.stat(path).st_mode) == default_mode()
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_a_failing_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "x.txt"
    path.write_text("old")

    def boom(f):  # type: ignore[no-untyped-def]
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(path, boom)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_keep_temp_returns_the_written_temp_file(tmp_path: Path) -> None:
    tmp = atomic_write(tmp_path / "x.txt", lambda f: f.write(b"a"), keep_temp=True)
    assert tmp != tmp_path / "x.txt" and tmp.read_text() == "a" and not (tmp_path / "x.txt").exists()
