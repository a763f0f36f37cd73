"""Assembling the page: vendored D3 + d3-sankey, our script and style, and the inline data.

Everything goes into one string, so the file works from ``file://`` and offline (a page that
``fetch()``es its data is blank there: Chromium blocks fetch on file://) and the same markup works
as a notebook output. D3 is run inside a function whose ``globalThis``, ``define``, ``module`` and
``exports`` are local, so its UMD header attaches ``d3`` to a private object: the page's own
``window.d3`` (or a notebook's require.js) is never touched, whatever version it is.
"""

import html
import uuid
import webbrowser
from collections.abc import Sequence
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Union

from .. import options
from ..errors import RatLensError, checked_call
from ..files import write_files
from ..result import TraceResult, check_result, dump_traces
from ..summary import summarize
from ._payload import inline_json, payload

__all__ = ["html_fragment", "to_html", "render_html", "page_files"]

VENDOR = ("vendor/d3.min.js", "vendor/d3-sankey.min.js")
# Concatenated in this order into one function: each file's header says what it defines and what
# it uses from the files before it. schema.js (first) documents the data, the payload's records.
SCRIPTS = (
    "js/schema.js",
    "js/util.js",
    "js/diagram.js",
    "js/routemap.js",
    "js/heads.js",
    "js/panels.js",
    "js/strip.js",
    "js/export.js",
    "js/mount.js",
)

Results = Union[TraceResult, Sequence[TraceResult]]


@cache
def _asset(name: str) -> str:
    text = (files(__package__) / name).read_text(encoding="utf-8")
    # Inlined code must not contain what would end its <script> or <style> element early.
    for bad in ("</script", "</style", "<!--"):
        if bad in text.lower():
            raise RatLensError(f"asset {name} contains {bad!r} and cannot be inlined")
    return text


def _new_id() -> str:
    """A fresh element-id suffix per widget: two outputs on one notebook page never collide."""
    return uuid.uuid4().hex[:12]


def _as_list(results: Results) -> list[TraceResult]:
    items = list(results) if isinstance(results, (list, tuple)) else [results]
    if not items or not all(isinstance(r, TraceResult) for r in items):
        raise RatLensError(
            f"expected a TraceResult or a non-empty list of them, got {type(results).__name__}"
        )
    beams = sum(len(getattr(r, "beams", ())) for r in items)
    if beams > options.PAGE_BEAM_BUDGET:
        raise RatLensError(
            f"the page would draw {beams:,} beams, over the page budget of "
            f"{options.PAGE_BEAM_BUDGET:,}: show fewer results or beams, or raise "
            f"rat_lens.options.PAGE_BEAM_BUDGET if you mean it"
        )
    return items


def html_fragment(results: Results) -> str:
    """The widget(s) as an HTML fragment, for notebook outputs (``TraceResult._repr_html_``).

    Scripts, style and data are inside it; several fragments on one page each load their own
    copy of D3 and touch only their own elements.
    """
    items = _as_list(results)
    ids = [_new_id() for _ in items]
    parts = [f"<style>{_asset('widget.css')}</style>"]
    if len(items) > 1:  # several targets (e.g. each generated token): links to pick one
        prompts = any(r.batch_index for r in items)
        links = " · ".join(
            f'<a href="#ratlens-{uid}">{html.escape(_target_label(r, prompts))}</a>'
            for uid, r in zip(ids, items)
        )
        parts.append(f'<nav class="ratlens-targets">Targets: {links}</nav>')
    for uid, result in zip(ids, items):
        parts.append(f'<div class="ratlens" id="ratlens-{uid}"></div>')
        # The circuit summary beside the diagram: static tables, every string escaped by it.
        parts.append(
            f'<details class="ratlens-summary" id="ratlens-summary-{uid}">'
            f"<summary>Circuit summary</summary>{summarize(result).html_fragment()}"
            "</details>"
        )
        parts.append(
            f'<script type="application/json" id="ratlens-data-{uid}">'
            f"{inline_json(payload(result))}</script>"
        )
    parts.append(_script(VENDOR, SCRIPTS, f"mountAll({inline_json(ids)});"))
    return "\n".join(parts)


def _script(vendor: Sequence[str], scripts: Sequence[str], call: str) -> str:
    """One ``<script>``: the vendored files (D3 attaching itself to a private object, see the
    module docstring), then our files in one function, then ``call``."""
    loaded = "\n;\n".join(_asset(name) for name in vendor)
    app = "\n".join(_asset(name) for name in scripts)
    return (
        '<script>\n(function () {\n"use strict";\nconst scope = {};\n'
        "(function (globalThis, define, module, exports) {\n"
        f"{loaded}\n}}).call(scope, scope);\nconst d3 = scope.d3;\n"
        f"{app}\n{call}\n}})();\n</script>"
    )


def _document(title: str, body: str) -> str:
    """A complete HTML document: ``title`` (escaped here) and ``body`` (markup)."""
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f'<title>{html.escape(title)}</title>\n</head>\n<body class="ratlens-page">\n'
        f"{body}\n</body>\n</html>\n"
    )


def _target_label(result: TraceResult, prompts: bool = False) -> str:
    """``'red'@8 → 'blue'``: the target and the token after it (on a page of a generated
    continuation, what the model produced from the target), and the prompt when ``prompts``
    (the page shows more than one) or when it is not the batch's first.

    >>> from rat_lens.result import SankeyData
    >>> r = TraceResult(3, 1, 0, 1, 1, ["a", "b", "c"], [], SankeyData([], []), [])
    >>> _target_label(r), _target_label(r, prompts=True)
    ("'b'@1 → 'c'", "'b'@1 → 'c' (prompt 0)")
    """
    tokens, pos = result.tokens, result.target_pos
    label = f"{tokens[pos] if pos < len(tokens) else ''!r}@{pos}"
    if pos + 1 < len(tokens):
        label += f" → {tokens[pos + 1]!r}"
    if prompts or result.batch_index:
        label += f" (prompt {result.batch_index})"
    return label


def to_html(results: Results) -> str:
    """A complete, self-contained HTML document showing one result, or several one below the
    other (e.g. what ``trace_batch`` returned)."""
    items = _as_list(results)
    return _document(f"rat_lens trace: {_target_label(items[0])}", html_fragment(items))


def page_files(results: Results) -> dict[str, str]:
    """``index.html`` (the page) and ``trace.json`` (what ``rat-lens render`` redraws it from)."""
    items = _as_list(results)
    one_or_all = items[0] if isinstance(results, TraceResult) else items
    return {"index.html": to_html(items), "trace.json": dump_traces(one_or_all)}


@checked_call
def render_html(result: Results, out_dir: Union[str, Path], open_browser: bool = False) -> str:
    """Write ``index.html`` (self-contained) and ``trace.json`` to ``out_dir``; return the path of
    ``index.html``, as reverse-attention's ``render_html`` does.

    ``trace.json`` is ``result.to_json()`` (a list of them for several results), which
    ``rat-lens render trace.json -o out/`` turns back into the same page without a model. Both
    files are written or neither (:func:`rat_lens.files.write_files`): a failure never leaves a
    new page beside an old trace, nor an empty folder. Each result is checked as a saved one
    first (:func:`rat_lens.result.check_result`): a hand-edited or foreign one is named, and
    nothing is written.
    """
    for item in result if isinstance(result, (list, tuple)) else [result]:
        check_result(item, "render_html")
    index = write_files(out_dir, page_files(result))[0]
    if open_browser:
        webbrowser.open(index.resolve().as_uri())
    return str(index)
