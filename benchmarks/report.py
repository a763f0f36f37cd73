"""Refresh the measured sections of docs/benchmarks.md, and nothing else on the page.

Each benchmark script's section sits between two marker comments, ``<!-- report.py: NAME -->``
and ``<!-- /report.py: NAME -->``; this runs the scripts, stamps each section with the date and
the machine, and rewrites what is between its markers. Everything outside them (notes written
by hand, sections other scripts add) is kept as it is. A section whose markers are missing is
added at the end of the page.

python benchmarks/report.py                  # every script: about 30 minutes on 2 cores
python benchmarks/report.py census.py        # one section
"""

import argparse
import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
PAGE = HERE.parent / "docs" / "benchmarks.md"
SCRIPTS = {
    "beam_search.py": [],
    "forward.py": [],
    "html_size.py": [],
    "census.py": [],
    "edge_weights.py": ["--repeat", "1"],
}


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem = (
        int(
            next(
                line.split()[1]
                for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")
            )
        )
        / 2**20
    )
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, Python {platform.python_version()}"


def markers(name: str) -> tuple[str, str]:
    return f"<!-- report.py: {name} -->", f"<!-- /report.py: {name} -->"


def put_section(page: str, name: str, body: str) -> str:
    """``page`` with the text between ``name``'s markers replaced by ``body`` (the section
    appended, markers included, when the page has none).

    >>> page = "# B\\n\\nby hand\\n<!-- report.py: a -->\\nold\\n<!-- /report.py: a -->\\nkept\\n"
    >>> print(put_section(page, "a", "new"), end="")
    # B
    <BLANKLINE>
    by hand
    <!-- report.py: a -->
    new
    <!-- /report.py: a -->
    kept
    >>> put_section("# B\\n", "b", "table").splitlines()[-3:]
    ['<!-- report.py: b -->', 'table', '<!-- /report.py: b -->']
    """
    begin, end = markers(name)
    block = f"{begin}\n{body.strip()}\n{end}"
    if page.count(begin) > 1 or page.count(begin) != page.count(end):
        raise SystemExit(f"{PAGE}: the markers of section {name!r} are not one pair: fix by hand")
    if begin not in page:
        return page.rstrip("\n") + "\n\n" + block + "\n"
    start = page.index(begin)
    stop = page.index(end, start) + len(end)
    return page[:start] + block + page[stop:]


def run(script: str, args: list[str]) -> str:
    """The script's section: its heading, when and where it ran, and what it printed."""
    done = subprocess.run(
        [sys.executable, str(HERE / script), *args], capture_output=True, text=True, check=True
    )
    stamp = f"`python benchmarks/{script}` on {datetime.date.today()}: {machine()}."
    return f"## `benchmarks/{script}`\n\n{stamp}\n\n{done.stdout.strip()}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scripts", nargs="*", help=f"of {', '.join(SCRIPTS)} (default: all)")
    chosen = parser.parse_args().scripts or list(SCRIPTS)
    unknown = sorted(set(chosen) - set(SCRIPTS))
    if unknown:
        parser.error(f"no benchmark {unknown}: choose from {', '.join(SCRIPTS)}")
    for script in chosen:
        body = run(script, SCRIPTS[script])
        # Read just before writing: the page may have been edited while the script ran.
        page = put_section(PAGE.read_text(encoding="utf-8"), script, body)
        PAGE.write_text(page, encoding="utf-8")


if __name__ == "__main__":
    main()
