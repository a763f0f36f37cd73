"""Every ```python block of README.md and docs/*.md runs as a new user would run it, and prints
what the page shows (issue 23, point 5). The rules, for writers, are in docs/contributing.md
("Code blocks that run"):

- A page's blocks run in order in one fresh Python process, in an empty temporary folder, with
  ``BROWSER=true`` (``open_browser=True`` opens nothing) and the Hugging Face Hub offline.
- Each block starts with a fresh namespace, unless the line before its fence is
  ``<!-- doc-test: continue -->``: then it runs in the namespace of the block before it.
- ``<!-- doc-test: setup`` ... ``-->`` holds hidden code that runs first, in the block's
  namespace (for what a reader brings: their own Hugging Face model, their hooks).
- ``<!-- doc-test: needs gpu -->`` / ``<!-- doc-test: needs internet -->``: the block runs only
  where a CUDA device is present / ``RAT_LENS_DOCS_INTERNET=1`` is set.
- A ```text block after a python block (only prose between, no other fence) is that block's
  printed output and must equal it, line by line (trailing spaces ignored); a line holding only
  ``...`` stands for any number of lines. A ```text block anywhere else is an error.
  ``RAT_LENS_DOCS_UPDATE=1`` rewrites the shown output from the run instead of comparing.
"""

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"<!-- doc-test: (continue|needs gpu|needs internet) -->$")
FENCE = re.compile(r"^```(\S*)\s*$")


@dataclass
class Block:
    line: int  # 1-based line of the first code line in the page
    code: str
    continues: bool = False
    setup: str = ""
    needs: list[str] = field(default_factory=list)
    output: tuple[int, int, str] | None = None  # (first line, end line, shown text)


def parse(page: Path) -> list[Block]:
    """The page's python blocks, their markers and shown outputs; ValueError on a stray marker or
    an output block with no python block before it."""
    lines = page.read_text().splitlines()
    blocks: list[Block] = []
    pending: list[str] = []
    setup: list[str] | None = None
    last_fence_python = False
    i = 0
    while i < len(lines):
        line = lines[i]
        if setup is not None:
            if line.strip() == "-->":
                pending.append("setup:" + "\n".join(setup))
                setup = None
            else:
                setup.append(line)
        elif line.strip() == "<!-- doc-test: setup":
            setup = []
        elif line.startswith("<!-- doc-test"):
            if not MARKER.match(line.strip()):
                raise ValueError(f"{page.name}:{i + 1}: unknown marker {line.strip()!r}")
            pending.append(MARKER.match(line.strip())[1])
        elif match := FENCE.match(line):
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            body = "\n".join(lines[i + 1 : end])
            if match[1] == "python":
                blocks.append(_block(i + 2, body, pending))
            elif pending:
                raise ValueError(
                    f"{page.name}:{i + 1}: markers {pending} before a {match[1]!r} block"
                )
            if match[1] == "text":
                if not last_fence_python:
                    raise ValueError(
                        f"{page.name}:{i + 1}: a ```text block with no python block before it"
                    )
                blocks[-1].output = (i + 2, end + 1, body)
            last_fence_python = match[1] == "python"
            pending = []
            i = end
        elif line.strip() and pending:
            raise ValueError(f"{page.name}:{i + 1}: markers {pending} not right before a fence")
        i += 1
    return blocks


def _block(line: int, code: str, markers: list[str]) -> Block:
    block = Block(line, code)
    for marker in markers:
        if marker == "continue":
            block.continues = True
        elif marker.startswith("setup:"):
            block.setup = marker[len("setup:") :]
        else:
            block.needs.append(marker.split()[1])
    return block


# Runs in the page's process: each block's code, compiled with the page's name and line numbers
# so a traceback points into the page; stdout captured per block.
RUNNER = r"""
import contextlib, io, json, sys, traceback, warnings
page, blocks = json.load(sys.stdin)
namespace, results = {}, []
for block in blocks:
    if not block["continues"]:
        namespace = {"__name__": "__main__"}
    out = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out):
        warnings.simplefilter("always")
        try:
            exec(block["setup"], namespace)
            out.truncate(0)
            code = "\n" * (block["line"] - 1) + block["code"]
            exec(compile(code, page, "exec"), namespace)
            error = None
        except BaseException:
            error = traceback.format_exc()
    warned = [f"{w.category.__name__}: {w.message}" for w in caught]
    results.append({"stdout": out.getvalue(), "error": error, "warnings": warned})
    if error:
        break
with open(sys.argv[1], "w") as f:
    json.dump(results, f)
"""


def runnable(block: Block) -> bool:
    have = {
        "gpu": _has_cuda,
        "internet": lambda: os.environ.get("RAT_LENS_DOCS_INTERNET") == "1",
    }
    return all(have[need]() for need in block.needs)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def matches(shown: str, printed: str) -> bool:
    """Line by line, trailing spaces and trailing blank lines ignored; a ``...`` line matches
    any run of lines."""
    pattern = "".join(
        r"(?:.*\n)*?" if line.strip() == "..." else re.escape(line.rstrip()) + r"\n"
        for line in shown.rstrip().splitlines()
    )
    printed = "".join(line.rstrip() + "\n" for line in printed.rstrip().splitlines())
    return re.fullmatch(pattern, printed)


def run_page(page: Path, blocks: list[Block], cwd: Path) -> list[dict]:
    env = {
        **os.environ,
        "BROWSER": "true",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONWARNINGS": "default",
    }
    payload = json.dumps([str(page.relative_to(ROOT)), [vars(b) for b in blocks]])
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, str(cwd / ".results.json")],
        input=payload,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr
    return json.loads((cwd / ".results.json").read_text())


def update(page: Path, blocks: list[Block], results: list[dict]) -> None:
    """Write each block's printed output into its ```text block (a shown ``...`` last line
    keeps the shown length)."""
    lines = page.read_text().splitlines()
    for block, result in reversed(list(zip(blocks, results))):
        if block.output is None:
            continue
        first, end, shown = block.output
        printed = result["stdout"].rstrip("\n").splitlines()
        if shown.splitlines()[-1:] == ["..."]:
            printed = printed[: len(shown.splitlines()) - 1] + ["..."]
        lines[first - 1 : end - 1] = [line.rstrip() for line in printed]
    page.write_text("\n".join(lines) + "\n")


@pytest.mark.slow
@pytest.mark.parametrize(
    "page", [p for p in PAGES if "```python" in p.read_text()], ids=lambda p: p.name
)
def test_python_blocks_run_and_print_what_the_page_shows(page, tmp_path):
    blocks = [b for b in parse(page) if runnable(b)]
    results = run_page(page, blocks, tmp_path)
    if os.environ.get("RAT_LENS_DOCS_UPDATE") == "1":
        update(page, blocks, results)
    for block, result in zip(blocks, results):
        where = f"{page.name}:{block.line}"
        assert result["error"] is None, f"{where} fails:\n{result['error']}"
        assert not result["warnings"], f"{where} warns: {result['warnings']}"
        if block.output and os.environ.get("RAT_LENS_DOCS_UPDATE") != "1":
            assert matches(block.output[2], result["stdout"]), (
                f"{where} prints\n{result['stdout']}\nnot what the page shows\n{block.output[2]}"
            )


def test_every_page_parses_and_its_markers_are_known():
    found = {page.name: parse(page) for page in PAGES}
    assert sum(len(blocks) for blocks in found.values()) >= 18
    for name, blocks in found.items():
        assert not (blocks and blocks[0].continues), f"{name}: the first block continues nothing"


@pytest.mark.parametrize(
    "text, problem",
    [
        ("<!-- doc-test: skip -->\n```python\npass\n```\n", "unknown marker"),
        ("```bash\nls\n```\n\n```text\nx\n```\n", "no python block before it"),
        ("<!-- doc-test: continue -->\n\nprose\n```python\npass\n```\n", "not right before"),
    ],
)
def test_malformed_pages_are_refused(text, problem, tmp_path):
    page = tmp_path / "page.md"
    page.write_text(text)
    with pytest.raises(ValueError, match=problem):
        parse(page)


def test_shown_output_matching_rule():
    assert matches("a\nb", "a  \nb\n")
    assert matches("a\n...", "a\nb\nc\n") and matches("a\n...\nz", "a\nz\n")
    assert not matches("a\nb", "a\nc\n") and not matches("a", "a\nb\n")
    assert not matches("a (x)", "a y\n")  # shown text is literal, not a pattern
