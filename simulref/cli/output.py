"""Where the command line's results go: a rich console on stdout that ends on a broken
pipe like print does, and trace files that are checked before the model loads and never
lost to a late error."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from simulref.cli.args import UsageError


def stdout_console(**options):
    """A rich Console for stdout whose reader going away (``simulref ... | head``) raises
    BrokenPipeError like a plain print does, so that every subcommand ends the same way
    (exit 141, see :func:`main`); rich's own handling exits with status 1."""
    from rich.console import Console

    class _Console(Console):
        def on_broken_pipe(self) -> None:
            raise BrokenPipeError(32, "Broken pipe")

    return _Console(**options)


def _check_writable(path: str, option: str) -> None:
    """Refuse, before any model loads, an output file that cannot be written."""
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"{option}: {path} is a directory; expected a file name")
    if target.exists() and not os.access(target, os.W_OK):
        raise UsageError(f"{option}: cannot write to {path} (not writable)")
    parent = target.resolve().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UsageError(f"{option}: cannot write to {path} (no writable directory {parent})")


def save_trace(path: str, trace, option: str, write: Callable) -> None:
    """``write(path, [trace])``; when that fails late (the directory went away, the disk is
    full), the finished trace goes to a fresh file in the temporary directory instead, and
    the error (a :class:`~simulref.atomic.WriteError`: exit 74) names both, so that a
    translation is never lost to its last step."""
    from simulref.atomic import WriteError

    try:
        write(path, [trace])
    except OSError as error:
        import tempfile

        why = error.why if isinstance(error, WriteError) else (error.strerror or str(error))
        handle, rescue = tempfile.mkstemp(prefix="simulref-trace-", suffix=".jsonl")
        os.close(handle)
        write(rescue, [trace])
        raise WriteError(f"{option} {path}", f"{why}; the trace was saved to {rescue}",
                         error.errno) from None
