"""write_atomically: the one way the library writes a run's files."""

import os

import pytest

from pyro_slots.checkpoint import write_atomically


def test_old_file_survives_a_failed_write_and_no_temporary_is_left(tmp_path, monkeypatch):
    path = tmp_path / "test.json"
    write_atomically(path, "old")
    assert path.read_text() == "old"

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, "new " * 1000)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test.json"]
    monkeypatch.undo()
    write_atomically(path, b"\xffbytes")
    assert path.read_bytes() == b"\xffbytes"
