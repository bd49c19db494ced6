"""Command line (typer + rich): one small module per command, each only parsing and delegating."""

from sensitivity.cli import apply, demo, pcdet, report, scan  # noqa: F401  (register the commands)
from sensitivity.cli.app import app
from sensitivity.cli.console import print_summary
from sensitivity.cli.main import main, run

__all__ = ["app", "main", "print_summary", "run"]
