"""reverse-attention's ``sankey``: the Sankey graph of some beams, its JSON, and the page.

The graph is :func:`rat_lens.result.build_sankey`'s (the peer's rule: a link weighs Σ over the
beams using it of softmax(score_norm) × edge weight); the page is rat_lens's
(:func:`rat_lens.render.render_html`: one self-contained ``index.html`` beside ``trace.json``).

Examples:
    >>> from rat_lens.result import BeamPath
    >>> beams = [BeamPath([2, 0], ["c", "a"], [2, 0], [0.5], -0.69, -0.69),
    ...          BeamPath([2, 1, 0], ["c", "b", "a"], [2, 1, 0], [0.4, 0.9], -1.02, -0.51)]
    >>> sankey = beams_to_sankey(beams, ["a", "b", "c"], layer=3)
    >>> [n.id for n in sankey.nodes]
    ['L3_P0', 'L3_P1', 'L3_P2']
    >>> [(k.source, k.target, k.beam_indices) for k in sankey.links]
    [('L3_P0', 'L3_P2', [0]), ('L3_P1', 'L3_P2', [1]), ('L3_P0', 'L3_P1', [1])]
    >>> [round(w, 3) for w in compute_beam_weights(beams)]
    [0.455, 0.545]
"""

import dataclasses
from pathlib import Path
from typing import Union

from .. import render
from ..errors import RatLensError
from ..result import BeamPath, SankeyData, TraceResult, beam_weights, build_sankey, node_id

__all__ = [
    "compute_beam_weights",
    "beams_to_sankey",
    "sankey_to_dict",
    "trace_result_to_json",
    "get_html_template_dir",
    "render_html",
]


def compute_beam_weights(beams: list[BeamPath]) -> list[float]:
    """softmax(score_norm) over ``beams``: how much each counts in a link's weight."""
    return beam_weights(beams)


def beams_to_sankey(
    beams: list[BeamPath], tokens: list[str], layer: int = 0, aggregate: bool = True
) -> SankeyData:
    """Nodes (one per position, in ``layer``) and links (key → query, in the order the beams
    first use them) of chain beams. A link weighs Σ softmax(score_norm) × edge weight over the
    beams using it, or the plain Σ of edge weights with ``aggregate=False``."""
    for b, beam in enumerate(beams):
        if len(beam.positions) != len(beam.edge_attns) + 1:
            raise RatLensError(
                f"beams[{b}] has {len(beam.positions)} positions and {len(beam.edge_attns)} "
                "edge weights: a path needs one position more than edges"
            )
        if not all(0 <= p < len(tokens) for p in beam.positions):
            raise RatLensError(
                f"beams[{b}].positions {beam.positions} reach past the {len(tokens)} tokens given"
            )
    beams = [_in_layer(beam, layer) for beam in beams]
    sankey = build_sankey(beams, tokens, "chain", layer)
    if not aggregate:
        by_ends = {(link.source, link.target): link for link in sankey.links}
        for link in sankey.links:
            link.value = 0.0
        for beam in beams:
            for i, weight in enumerate(beam.edge_attns):
                ends = (node_id(layer, beam.positions[i + 1]), node_id(layer, beam.positions[i]))
                by_ends[ends].value += weight
    return sankey


def _in_layer(beam: BeamPath, layer: int) -> BeamPath:
    """A beam built from the peer's six fields records no layers, heads or BOS mass: a chain's
    edges are all in ``layer``, heads aggregated; the BOS mass is unknown (read as 0, as
    :meth:`TraceResult.from_dict` reads the peer's files)."""
    edges = len(beam.edge_attns)
    return dataclasses.replace(
        beam,
        layers=beam.layers or [layer] * edges,
        heads=beam.heads or [None] * edges,
        bos_mass=beam.bos_mass or [0.0] * edges,
    )


def sankey_to_dict(sankey: SankeyData) -> dict:
    """``{"nodes": [...], "links": [...]}`` with every field of each (plain JSON types)."""
    return dataclasses.asdict(sankey)


def trace_result_to_json(trace_result: TraceResult) -> str:
    """The result's ``trace.json`` text: every field, and the peer's ``metadata`` block."""
    return trace_result.to_json(indent=2)


def get_html_template_dir() -> Path:
    """The folder of the page's own assets (scripts, styles, the vendored D3 with its
    licences); :func:`render_html` inlines them into one file, nothing there is copied."""
    return Path(render.__file__).parent


def render_html(
    trace_result: Union[TraceResult, list], out_dir: Union[str, Path], open_browser: bool = False
) -> str:
    """Write ``index.html`` (self-contained) and ``trace.json`` to ``out_dir``; return the path
    of ``index.html`` (:func:`rat_lens.render.render_html`)."""
    return render.render_html(trace_result, out_dir, open_browser=open_browser)
