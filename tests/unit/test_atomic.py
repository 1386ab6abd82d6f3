"""atomic_write: all or nothing, with the permissions a plain open() gives."""

from __future__ import annotations

import os
import stat

import pytest

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
