"""The command line as the tests drive it: argv builders and the refusal check (one line, exit 2, nothing
left behind). The `work` and `refused` fixtures live in conftest.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sensitivity.cli import main

ROOT = Path(__file__).resolve().parents[1]
MODELS = str(ROOT / "tests" / "models.py")
ARCH = f"{MODELS}:build_planted"


def _scan(
    work: Path,
    *extra: str,
    model: str = "model.pth",
    calib: str = "calib.pt",
    arch: str | None = ARCH,
    out: str | Path = "out",
) -> list[str]:
    """`sensitivity scan` argv; file names are relative to `work` (absolute paths pass through)."""
    arch_args = ["--arch", arch] if arch else []
    return ["scan", str(work / model), *arch_args, "--calib", str(work / calib), "--out", str(work / out), "-q",
            *extra]  # fmt: skip


def fails(work: Path, capsys: pytest.CaptureFixture[str], argv: list[str], *fragments: str) -> str:
    """Run the CLI: exit code 2, one red line holding every fragment, and no new file in `work`."""
    before = set(os.listdir(work))
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: "), err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in captured.err + captured.out
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    assert set(os.listdir(work)) == before, "the failed command left files behind"
    return err
