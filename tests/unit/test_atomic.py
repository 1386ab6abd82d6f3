"""atomic_write: all or nothing, with the permissions a plain open() gives."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from simulref import atomic
from simulref.atomic import atomic_write


@pytest.fixture(params=[0o022, 0o077])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_the_file_gets_the_mode_open_would_give(tmp_path, umask):
    with atomic_write(tmp_path / "a.json", text=True) as handle:
        handle.write("{}\n")
    with open(tmp_path / "b.json", "w") as handle:
        handle.write("{}\n")
    mode = stat.S_IMODE((tmp_path / "a.json").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o666 & ~umask


def test_an_error_leaves_the_old_file_and_no_temp_file(tmp_path):
    path = tmp_path / "results.json"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_write(path) as handle:
        handle.write(b"half")
        raise RuntimeError("disk full")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_a_missing_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory .*nowhere"):
        with atomic_write(tmp_path / "nowhere" / "x.json"):
            pass


def test_text_mode_writes_utf8_with_newline_line_ends(tmp_path):
    path = tmp_path / "t.jsonl"
    with atomic_write(path, text=True) as handle:
        handle.write("é\n")
    assert path.read_bytes() == "é\n".encode()


# --- a full disk: one catchable WriteError naming the file, nothing half-written ---------


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def assert_one_line_naming(error, path):
    message = str(error)
    assert "\n" not in message and str(path) in message and "No space left" in message
    assert isinstance(error, OSError) and error.errno == errno.ENOSPC


def test_a_full_disk_in_atomic_write_is_a_write_error_and_leaves_the_old_file(
        tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    path.write_bytes(b"old")
    monkeypatch.setattr(os, "fsync", full_disk)  # where a full disk shows on some filesystems
    with pytest.raises(atomic.WriteError) as caught, atomic_write(path) as handle:
        handle.write(b"half")
    assert_one_line_naming(caught.value, path)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_an_oserror_about_another_file_is_not_blamed_on_this_one(tmp_path):
    with pytest.raises(FileNotFoundError), atomic_write(tmp_path / "a.json"):
        open(tmp_path / "elsewhere.txt")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_in_an_append_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "progress.jsonl"
    atomic.append_line(path, '{"index": 0}\n')
    real_write = os.write

    def half_then_full(fd, data):
        real_write(fd, data[: len(data) // 2])
        full_disk()

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(atomic.WriteError) as caught:
        atomic.append_line(path, '{"index": 1, "trace": "a long line"}\n')
    assert_one_line_naming(caught.value, path)
    assert path.read_text() == '{"index": 0}\n'


def test_a_full_disk_while_a_library_writes_by_path_leaves_the_old_file(tmp_path):
    """mx.save_safetensors wants a path and reports a full disk as a RuntimeError."""
    path = tmp_path / "adapters.safetensors"
    path.write_bytes(b"old")

    def save(tmp):
        with open(tmp, "wb") as handle:
            handle.write(b"ha")
        raise RuntimeError("[write] Unable to write 94557 bytes to file.")

    with pytest.raises(atomic.WriteError, match=r"adapters.safetensors: cannot write") as c:
        atomic.replace_with(path, save)
    assert "\n" not in str(c.value)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapters.safetensors"]


def test_probe_writable_creates_nothing_and_names_an_unwritable_directory(tmp_path,
                                                                          monkeypatch):
    """Issue 21, item 4: `train --out` on a directory that cannot be written (a read-only
    filesystem, an immutable directory) failed after the model loaded. The probe writes
    a temp file and removes it; for a directory still to be made, it probes the nearest
    one that exists and makes nothing."""
    atomic.probe_writable(tmp_path)
    atomic.probe_writable(tmp_path / "new" / "deeper")
    assert list(tmp_path.iterdir()) == []

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(atomic.tempfile, "mkstemp", read_only)
    with pytest.raises(atomic.WriteError, match=r"cannot write \(Read-only file system\)"):
        atomic.probe_writable(tmp_path / "new")
    (tmp_path / "file").write_text("x")
    monkeypatch.undo()
    with pytest.raises(atomic.WriteError, match=r"file: cannot write \(not a directory\)"):
        atomic.probe_writable(tmp_path / "file" / "out")
