"""Writing files and folders so that nothing the user owns is lost: atomic writes, report folders that are
replaced only when the tool wrote them, and signals deferred while a folder is being swapped in."""

from sensitivity.files.atomic import atomic_torch_save, atomic_write, default_mode, torch_save_file
from sensitivity.files.folders import (
    MARKER,
    atomic_dir,
    check_output_dir,
    check_output_files,
    default_report_name,
    is_tool_folder,
    mark_folder,
    staged_files,
)
from sensitivity.files.signals import InterruptHandlers, Terminated, deferred_signals

__all__ = [
    "MARKER",
    "InterruptHandlers",
    "Terminated",
    "atomic_dir",
    "atomic_torch_save",
    "atomic_write",
    "check_output_dir",
    "check_output_files",
    "default_mode",
    "default_report_name",
    "deferred_signals",
    "is_tool_folder",
    "mark_folder",
    "staged_files",
    "torch_save_file",
]
