"""The entry points: run the Typer app; user errors become one red line and exit code 2, Ctrl-C 130 and
SIGTERM 143, with nothing half-written left behind."""

from __future__ import annotations

import logging

import typer
from rich.markup import escape

from sensitivity.cli.app import app
from sensitivity.cli.console import console
from sensitivity.errors import SensitivityError
from sensitivity.files import InterruptHandlers, Terminated

__all__ = ["main", "run"]


#: what an interrupted command left behind (its outputs are staged and moved in only when complete)
_NOTHING_WRITTEN = {
    "scan": "no report was written",
    "demo": "no report was written",
    "report": "the report was left as it was",
    "apply": "no model was written",
    "pcdet-dump": "no batches were written",
    "view": "stopped serving",
}


def _command(argv: list[str] | None) -> str | None:
    import sys

    args = sys.argv[1:] if argv is None else argv
    return next((a for a in args if not a.startswith("-")), None)


def _quiet_exit(message: str, code: int, argv: list[str] | None) -> int:
    outcome = _NOTHING_WRITTEN.get(_command(argv) or "", "nothing was written")
    console.print(f"[bold red]{message}[/bold red]: {outcome}")
    return code


def main(argv: list[str] | None = None, *, restore_signals: bool = True) -> int:
    """Entry point: SensitivityError -> one red line + exit 2; Ctrl-C -> exit 130 and SIGTERM -> exit 143,
    nothing half-written (temp folders are removed on the way out). Signals that arrive once the command
    is done are ignored; `restore_signals=False` (the process entry points) keeps it so until exit."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    handlers = InterruptHandlers().install()
    try:
        return _main(argv, handlers)
    finally:
        handlers.done()
        if restore_signals:
            handlers.restore()
        else:
            handlers.ignore()


def run() -> int:
    """The `sensitivity` console script and `python -m sensitivity`."""
    return main(restore_signals=False)


def _main(argv: list[str] | None, handlers: InterruptHandlers) -> int:
    try:
        rv = app(args=argv, standalone_mode=False)
        if rv == 130:  # typer turns Ctrl-C into an exit code of 130 in non-standalone mode
            raise KeyboardInterrupt
        if isinstance(rv, int) and not isinstance(rv, bool) and rv != 0:
            return rv
    except SensitivityError as exc:
        # escaped: the message quotes user input (a spec, a path), which may look like rich markup
        console.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        handlers.done()  # a second Ctrl-C while saying so is ignored (no traceback)
        return _quiet_exit("interrupted", 130, argv)
    except Terminated:
        handlers.done()
        return _quiet_exit("terminated", 143, argv)
    except typer.Exit as exc:
        return int(exc.exit_code or 0)
    except typer.Abort:
        handlers.done()
        return _quiet_exit("interrupted", 130, argv)
    except Exception as exc:  # usage errors (typer's click, vendored or not) show themselves
        if callable(getattr(exc, "show", None)) and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            return exc.exit_code
        if type(exc).__name__ == "Abort":  # click's own Abort where typer re-exports another class
            handlers.done()
            return _quiet_exit("interrupted", 130, argv)
        raise
    return 0
