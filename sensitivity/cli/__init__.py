"""Command line (typer + rich): one small module per command, each only parsing and delegating."""

from sensitivity.cli import apply, demo, pcdet, report, scan  # noqa: F401  (register the commands)
from sensitivity.cli.app import app
from sensitivity.cli.main import main, run
from sensitivity.cli.summary import print_summary

__all__ = ["app", "main", "print_summary", "run"]
