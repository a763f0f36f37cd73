"""Render a :class:`~rat_lens.TraceResult` as one self-contained interactive HTML page.

D3 v7 and d3-sankey (vendored, unmodified) and the trace data are inlined: the page works from
``file://``, offline, and as a notebook output (``TraceResult._repr_html_``). What the page
shows and how to use it: docs/render.md. A census of many prompts (:func:`rat_lens.census`) has a
page of its own, a layer × head heatmap: :func:`render_census` (docs/census.md).

Examples:
    >>> import torch, rat_lens
    >>> from rat_lens.render import to_html
    >>> from rat_lens.result import BeamPath, TraceResult, build_sankey, path_text
    >>> A = torch.tensor([[1.0, 0.0, 0.0], [0.7, 0.3, 0.0], [0.1, 0.6, 0.3]])
    >>> tokens = ["<bos>", " cat", " sat"]
    >>> beams = [BeamPath.from_beam(b, tokens, [0, 1, 2]) for b in rat_lens.trace_attention(A)]
    >>> result = TraceResult(3, 2, 0, 5, 5, tokens, beams, build_sankey(beams, tokens, "chain", 0),
    ...                      [path_text(b) for b in beams])
    >>> page = to_html(result)
    >>> page.startswith("<!DOCTYPE html>"), page.count("<script")   # the data, then the code
    (True, 2)
"""

from ._census import census_fragment, census_html, render_census
from ._html import html_fragment, page_files, render_html, to_html

__all__ = [
    "render_html",
    "to_html",
    "html_fragment",
    "page_files",
    "render_census",
    "census_html",
    "census_fragment",
]
