"""Write a file so that readers see the old content or the new, never half of it.

A write that fails (a full disk, a read-only filesystem, a quota) raises
:class:`WriteError`: an ``OSError`` whose message is one line naming the file, with
nothing half-written left behind (a replaced file keeps its old content; an appended one
is cut back to where the append began). The command line maps it to its own exit code.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


class WriteError(OSError):
    """A file could not be written; ``str()`` is one line naming it and why. What was
    there before is untouched. ``errno`` is the cause's (ENOSPC for a full disk; EIO
    when a library reported it without one)."""

    def __init__(self, path: str | os.PathLike, why: str, code: int | None = None):
        super().__init__(code if code is not None else errno.EIO, why, os.fspath(path))
        self.path = Path(path)
        self.why = why

    def __str__(self) -> str:
        return f"{self.path}: cannot write ({self.why})"


def _ours(error: OSError, *names) -> bool:
    """Whether ``error`` is about one of the files ``names`` (or about no file: a write
    or fsync on a descriptor names none), not about another file the caller touched."""
    return error.filename is None or os.fspath(error.filename) in {os.fspath(n) for n in names}


def write_error(path: str | os.PathLike, error: OSError) -> WriteError:
    """``error`` (an OSError from writing ``path``) as a :class:`WriteError`."""
    if isinstance(error, WriteError):
        return error
    return WriteError(path, error.strerror or str(error), error.errno)


def _default_mode() -> int:
    # What open() would give a new file; mkstemp's 0o600 would hide results from others.
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_write(path: str | os.PathLike, *, text: bool = False) -> Iterator[IO]:
    """Yield a file opened on a temp file beside ``path``; on leaving the block without
    an error, flush, fsync, give it the permissions a plain ``open()`` would and rename
    it over ``path``. On an error the temp file is removed and ``path`` is untouched; an
    OSError of the writing itself (a full disk) is raised as :class:`WriteError`.
    ``text=True`` opens it as UTF-8 text with ``\\n`` line ends; otherwise binary."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path}: cannot write, no such directory {path.parent}")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise write_error(path, error) from None
    try:
        if text:
            handle = os.fdopen(fd, "w", encoding="utf-8", newline="\n")
        else:
            handle = os.fdopen(fd, "wb")
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except OSError as error:
        Path(tmp).unlink(missing_ok=True)
        if _ours(error, tmp, path):
            raise write_error(path, error) from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace_with(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """``write(tmp)`` (a library that wants a path, e.g. ``mx.save_safetensors``), then
    fsync and rename over ``path``: the contract of :func:`atomic_write`. A RuntimeError
    of ``write`` is how MLX reports a failed write (a full disk: "[write] Unable to write
    N bytes"): a :class:`WriteError` too."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(str(tmp))
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        if _ours(error, tmp, path):
            raise write_error(path, error) from None
        raise
    except RuntimeError as error:
        tmp.unlink(missing_ok=True)
        raise WriteError(path, " ".join(str(error).split()) or "the write failed") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def append_line(path: str | os.PathLike, line: str, *, fsync: bool = True) -> None:
    """Append ``line`` (its own newline included) with one write, then fsync (unless
    ``fsync`` is False): an interruption leaves the whole line or a partial last line.
    A failed write (a full disk part-way through the line) cuts the file back to where
    the append began and raises :class:`WriteError`."""
    payload = line.encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as error:
        raise write_error(path, error) from None
    try:
        start = os.fstat(fd).st_size
        try:
            written = os.write(fd, payload)
            while written < len(payload):  # a regular file takes it in one go; be safe
                written += os.write(fd, payload[written:])
            if fsync:
                os.fsync(fd)
        except OSError as error:
            try:
                os.ftruncate(fd, start)
            except OSError:  # cannot even cut it: the partial line is cut on resume
                pass
            raise write_error(path, error) from None
    finally:
        os.close(fd)


def probe_writable(directory: str | os.PathLike) -> None:
    """Check, before any long work, that files can be written in ``directory``: a temp
    file is made in it and removed (permissions alone do not tell: root ignores them,
    not a read-only filesystem or an immutable directory). A directory that does not
    exist yet is probed at its nearest existing parent, and nothing is made.
    :class:`WriteError` naming the directory otherwise."""
    path = Path(directory)
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise WriteError(probe, "not a directory", errno.ENOTDIR)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".simulref-probe.", suffix=".tmp", dir=probe)
    except OSError as error:
        raise WriteError(probe if probe == path else path, error.strerror or str(error),
                         error.errno) from None
    os.close(fd)
    Path(tmp).unlink(missing_ok=True)
