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
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import Sequence, Union

from ..errors import RatLensError
from ..result import TraceResult
from ..summary import summarize
from ._payload import inline_json, payload

__all__ = ["html_fragment", "to_html", "render_html"]

VENDOR = ("vendor/d3.min.js", "vendor/d3-sankey.min.js")
SCRIPTS = ("js/util.js", "js/diagram.js", "js/panels.js", "js/strip.js", "js/export.js",
           "js/mount.js")

Results = Union[TraceResult, Sequence[TraceResult]]


@lru_cache(maxsize=None)
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
    items = [results] if isinstance(results, TraceResult) else list(results)
    if not items or not all(isinstance(r, TraceResult) for r in items):
        raise RatLensError(f"expected a TraceResult or a non-empty list of them, got "
                           f"{type(results).__name__}")
    return items


def html_fragment(results: Results) -> str:
    """The widget(s) as an HTML fragment, for notebook outputs (``TraceResult._repr_html_``).

    Scripts, style and data are inside it; several fragments on one page each load their own
    copy of D3 and touch only their own elements.
    """
    items = _as_list(results)
    ids = [_new_id() for _ in items]
    parts = [f'<style>{_asset("widget.css")}</style>']
    if len(items) > 1:  # several targets (e.g. each generated token): links to pick one
        links = " · ".join(
            f'<a href="#ratlens-{uid}">{html.escape(_target_label(r))}</a>'
            for uid, r in zip(ids, items))
        parts.append(f'<nav class="ratlens-targets">Targets: {links}</nav>')
    for uid, result in zip(ids, items):
        parts.append(f'<div class="ratlens" id="ratlens-{uid}"></div>')
        # The circuit summary beside the diagram: static tables, every string escaped by it.
        parts.append(f'<details class="ratlens-summary" id="ratlens-summary-{uid}">'
                     f'<summary>Circuit summary</summary>{summarize(result).html_fragment()}</details>')
        parts.append(f'<script type="application/json" id="ratlens-data-{uid}">'
                     f'{inline_json(payload(result))}</script>')
    vendor = "\n;\n".join(_asset(name) for name in VENDOR)
    app = "\n".join(_asset(name) for name in SCRIPTS)
    parts.append(
        "<script>\n(function () {\n\"use strict\";\nvar scope = {};\n"
        "(function (globalThis, define, module, exports) {\n"
        f"{vendor}\n}}).call(scope, scope);\nvar d3 = scope.d3;\n"
        f"{app}\n"
        f"mountAll({inline_json(ids)});\n}})();\n</script>")
    return "\n".join(parts)


def _target_label(result: TraceResult) -> str:
    token = result.tokens[result.target_pos] if result.target_pos < len(result.tokens) else ""
    return f"{token!r}@{result.target_pos}" + (f" (prompt {result.batch_index})"
                                                if result.batch_index else "")


def to_html(results: Results) -> str:
    """A complete, self-contained HTML document showing one result, or several one below the
    other (e.g. what ``trace_batch`` returned)."""
    items = _as_list(results)
    title = html.escape(f"rat_lens trace: {_target_label(items[0])}")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{title}</title>\n</head>\n<body class=\"ratlens-page\">\n"
            f"{html_fragment(items)}\n</body>\n</html>\n")


def render_html(result: Results, out_dir: Union[str, Path], open_browser: bool = False) -> str:
    """Write ``index.html`` (self-contained) and ``trace.json`` to ``out_dir``; return the path of
    ``index.html``, as reverse-attention's ``render_html`` does.

    ``trace.json`` is ``result.to_json()`` (a list of them for several results), which
    ``rat-lens render trace.json -o out/`` turns back into the same page without a model.
    """
    items = _as_list(result)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        index = out / "index.html"
        index.write_text(to_html(items), encoding="utf-8")
        saved = items[0].to_json() if isinstance(result, TraceResult) else \
            "[" + ", ".join(r.to_json() for r in items) + "]"
        (out / "trace.json").write_text(saved, encoding="utf-8")
    except OSError as err:
        raise RatLensError(f"cannot write the page to {str(out)!r}: {err}") from err
    if open_browser:
        webbrowser.open(index.resolve().as_uri())
    return str(index)
