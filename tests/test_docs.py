"""The documentation site builds with no warning (broken links, missing API objects)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_mkdocs_build_strict(tmp_path):
    # Without -q: mkdocs prints its (and griffe's, mkdocs_autorefs') warnings, so any of them
    # fails this test even where --strict would let it through. NO_MKDOCS_2_WARNING silences
    # Material for MkDocs' end-of-life banner, which is not about this site.
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    # The banner, should it print anyway: boxed lines, then "set NO_MKDOCS_2_WARNING=1".
    banner = ("│", "NO_MKDOCS_2_WARNING")
    warnings = [
        line
        for line in output.splitlines()
        if "WARNING" in line and not any(mark in line for mark in banner)
    ]
    assert not warnings, "\n".join(warnings)
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert api.count("trace_attention") > 0
    assert 'id="rat_lens.options.TraceOptions"' in api
    assert 'id="rat_lens.compat.ReverseAttentionTracer"' in api
