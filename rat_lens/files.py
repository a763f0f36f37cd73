"""Writing output files: all of a run's files or none, never a half-written one.

A page beside an older ``trace.json``, a truncated file after a crash, or an empty folder after
a failed run would each show the user something other than what was asked. :func:`write_files`
writes every file to a temporary name in the target folder (never ``TMPDIR``: a rename across
filesystems fails), then renames them into place (``os.replace`` is atomic within a folder); on
any error, Ctrl-C included, the temporary files are removed, files it replaced are put back, and
a folder it created is removed again. Files are created as ``open()`` creates them, readable as
the process's umask allows (0644 under 022), not private to the user as ``mkstemp``'s are.

>>> import tempfile, pathlib
>>> out = pathlib.Path(tempfile.mkdtemp()) / "page"
>>> [p.name for p in write_files(out, {"a.txt": "one", "b.txt": "two"})]
['a.txt', 'b.txt']
>>> (out / "b.txt").read_text()
'two'
"""

import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Union

from .errors import RatLensError

# How a census writes its traces (rat_lens.corpus; the CLI's --format choices).
CENSUS_FORMATS = ("jsonl", "parquet")

__all__ = ["write_files", "CENSUS_FORMATS"]


def write_files(out_dir: Union[str, Path], files: Mapping[str, str]) -> list[Path]:
    """Write ``{file name: text}`` (UTF-8) into ``out_dir``, all or none; return the paths.

    Files already there are kept until every new one is in place (then replaced), and are put
    back if any step fails."""
    out = Path(out_dir)
    created = not out.exists()
    staged: dict[str, Path] = {}
    backups: dict[str, Path] = {}
    placed: list[str] = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            fd, staged[name] = _create(out, name, ".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
        for name in files:
            if (out / name).exists():
                fd, backups[name] = _create(out, name, ".old")
                os.close(fd)
                os.replace(out / name, backups[name])
        for name in files:
            os.replace(staged[name], out / name)
            del staged[name]
            placed.append(name)
    except BaseException as err:  # Ctrl-C too: never a half-written folder
        for name in placed:
            (out / name).unlink(missing_ok=True)
        for name, backup in backups.items():  # the old file, unless the move never happened
            if (out / name).exists():
                backup.unlink(missing_ok=True)
            else:
                os.replace(backup, out / name)
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
        if created:
            _remove_if_empty(out)
        if isinstance(err, OSError):
            raise RatLensError(f"cannot write {sorted(files)} to {str(out)!r}: {err}") from err
        raise
    for backup in backups.values():
        backup.unlink(missing_ok=True)
    return [out / name for name in files]


def _create(folder: Path, name: str, suffix: str) -> tuple[int, Path]:
    """A new hidden file beside ``name`` in ``folder``, opened for writing: mode 0666 less the
    umask, as ``open()`` would make it (``mkstemp`` makes 0600, unreadable to the group)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        path = folder / f".{name}.{secrets.token_hex(4)}{suffix}"
        try:
            return os.open(path, flags, 0o666), path
        except FileExistsError:  # a name another writer took: draw again
            continue


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass
