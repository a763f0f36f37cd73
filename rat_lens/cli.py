"""The ``rat-lens`` command.

``rat-lens render trace.json -o out/`` turns a saved trace (``TraceResult.to_json()``, or the
``trace.json`` that ``render_html`` writes) into ``out/index.html`` without loading any model:
trace where the model is, look at it anywhere. Subcommands are argparse subparsers, one
function each, so more can join.
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from .result import TraceResult

__all__ = ["main"]


def _load_traces(path: str) -> list[TraceResult]:
    """One result (``to_json()``) or a list of them (``trace.json`` of a page with several)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return [TraceResult.from_dict(d) for d in (data if isinstance(data, list) else [data])]


def _render(args: argparse.Namespace) -> int:
    from .render import render_html  # the renderer is only needed by this subcommand
    results = []
    for path in args.traces:
        try:
            results.extend(_load_traces(path))
        except (OSError, ValueError, TypeError, KeyError) as err:
            # ValueError: not JSON; TypeError / KeyError: JSON that is not a TraceResult.
            print(f"rat-lens render: cannot read a trace from {path!r}: "
                  f"{type(err).__name__}: {err}", file=sys.stderr)
            return 2
    index = render_html(results[0] if len(results) == 1 else results, args.out,
                        open_browser=args.open)
    print(index)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rat-lens", description="Reverse Attention Tracer for TransformerLens.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    render = commands.add_parser(
        "render", help="render saved traces (JSON) as one self-contained HTML page",
        description="Write OUT/index.html (and OUT/trace.json) from traces saved with "
                    "TraceResult.to_json(); no model is loaded.")
    render.add_argument("traces", nargs="+", metavar="TRACE_JSON",
                        help="a TraceResult JSON file (several: one page showing all)")
    render.add_argument("-o", "--out", required=True, metavar="OUT",
                        help="output folder (created if missing)")
    render.add_argument("--open", action="store_true", help="open the page in a browser")
    render.set_defaults(run=_render)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``rat-lens`` with ``argv`` (default: the command line); return the exit status."""
    args = _parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
