"""The documentation site builds with no warning (broken links, missing API objects)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_mkdocs_build_strict(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "site" / "api" / "index.html").read_text().count("trace_attention") > 0
