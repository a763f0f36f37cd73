"""Writing output files: all of a run's files or none, never a half-written one.

A page beside an older ``trace.json``, a truncated file after a crash, or an empty folder after
a failed run would each show the user something other than what was asked. :func:`write_files`
writes every file to a temporary name in the target folder, then renames them into place
(``os.replace`` is atomic within a folder); on any error the temporary files are removed, and a
folder it created is removed again.

>>> import tempfile, pathlib
>>> out = pathlib.Path(tempfile.mkdtemp()) / "page"
>>> [p.name for p in write_files(out, {"a.txt": "one", "b.txt": "two"})]
['a.txt', 'b.txt']
>>> (out / "b.txt").read_text()
'two'
"""

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Union

from .errors import RatLensError

__all__ = ["write_files"]


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
            fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{name}.", suffix=".tmp")
            staged[name] = Path(tmp)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
        for name in files:
            if (out / name).exists():
                fd, backup = tempfile.mkstemp(dir=out, prefix=f".{name}.", suffix=".old")
                os.close(fd)
                staged[f"{name}.old"] = Path(backup)  # removed on failure until it holds one
                os.replace(out / name, backup)
                backups[name] = Path(staged.pop(f"{name}.old"))
        for name in files:
            os.replace(staged[name], out / name)
            del staged[name]
            placed.append(name)
    except OSError as err:
        for name in placed:
            (out / name).unlink(missing_ok=True)
        for name, backup in backups.items():
            if backup.exists():
                os.replace(backup, out / name)
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
        if created:
            _remove_if_empty(out)
        raise RatLensError(f"cannot write {sorted(files)} to {str(out)!r}: {err}") from err
    for backup in backups.values():
        backup.unlink(missing_ok=True)
    return [out / name for name in files]


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass
