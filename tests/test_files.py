"""Output files: readable as the umask says, staged beside their final name, all or none even
when Ctrl-C lands in the middle."""

import errno
import os
import stat
import tempfile
from pathlib import Path

import pytest

from rat_lens.files import write_files


@pytest.fixture
def umask():
    """Set the process's umask for one test, and put the old one back."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_get_the_mode_the_umask_gives(tmp_path, umask, mask, mode):
    umask(mask)
    (tmp_path / "b.txt").write_text("old")  # a replaced file gets the umask's mode too
    paths = write_files(tmp_path, {"a.txt": "one", "b.txt": "two"})
    assert [stat.S_IMODE(p.stat().st_mode) for p in paths] == [mode, mode]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]


def test_files_are_staged_in_the_output_folder_not_in_tmpdir(tmp_path, monkeypatch):
    """A TMPDIR on another filesystem: a rename from it fails (EXDEV), so staging must happen in
    the output folder. The rename is faked to fail as the kernel would across filesystems."""
    elsewhere = tmp_path / "tmpdir"
    elsewhere.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(elsewhere))
    monkeypatch.setenv("TMPDIR", str(elsewhere))
    rename = os.replace

    def replace(src, dst):
        if Path(src).parent != Path(dst).parent:
            raise OSError(errno.EXDEV, "Invalid cross-device link", str(src))
        rename(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("old")
    write_files(out, {"a.txt": "one", "b.txt": "two"})
    assert (out / "a.txt").read_text() == "one" and (out / "b.txt").read_text() == "two"
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "b.txt"]
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("at", [1, 2, 3])  # moving the old file aside, placing the 1st, the 2nd
def test_ctrl_c_while_writing_leaves_the_old_files_and_no_staging(tmp_path, monkeypatch, at):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("old a")
    (out / "keep.txt").write_text("untouched")
    rename, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == at:
            raise KeyboardInterrupt
        rename(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):  # the user's Ctrl-C, not turned into an error
        write_files(out, {"a.txt": "new a", "b.txt": "new b"})
    monkeypatch.setattr(os, "replace", rename)
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "keep.txt"]
    assert (out / "a.txt").read_text() == "old a"


def test_ctrl_c_in_a_new_folder_removes_it(tmp_path, monkeypatch):
    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_files(tmp_path / "page", {"a.txt": "one"})
    assert list(tmp_path.iterdir()) == []
