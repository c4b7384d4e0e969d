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


@pytest.mark.skipif(not hasattr(os, "fchmod"), reason="POSIX file modes")
def test_files_get_the_mode_open_would_give_them(tmp_path):
    """mkstemp's 0600 made every run file owner-only whatever the umask; a new file gets
    0666 less the umask (as open() and torch.save give it), a rewritten one keeps its mode."""
    old = os.umask(0o022)
    try:
        new = tmp_path / "new.yaml"
        write_atomically(new, "a: 1\n")
        assert new.stat().st_mode & 0o777 == 0o644
        kept = tmp_path / "kept.json"
        kept.write_text("{}")
        kept.chmod(0o640)
        write_atomically(kept, "{}")
        assert kept.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)
