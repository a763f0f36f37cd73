"""The census page: a layer × head heatmap of a :class:`~rat_lens.corpus.Census`, the table of
its heads, and the prompts it traced.

One self-contained file (``OUT/census.html``, written by ``rat_lens.census`` and
``rat-lens census``) on the trace page's machinery: the same vendored D3, ``util.js`` helpers
and style, the data inlined by :func:`~rat_lens.render._payload.inline_json`. The page's own
code is ``js/census.js``; its data records are ``CensusPayload`` in ``js/schema.js``. The table
of heads is static HTML written here, so it reads without JavaScript (and to a screen reader).

A census is taken duck-typed (``n_prompts``, ``options``, ``heads`` and, when no results are
given, ``traces()``): this module sits below :mod:`rat_lens.corpus`, which imports the model
code, and must load without torch.
"""

import dataclasses
import html
import webbrowser
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

from ..errors import RatLensError, check_int, checked_call
from ..files import write_files
from ..result import TraceResult
from ._html import SCRIPTS, VENDOR, _asset, _document, _new_id, _script
from ._payload import _round, inline_json, payload, verification

__all__ = [
    "census_payload",
    "census_fragment",
    "census_html",
    "render_census",
    "PAGE_PROMPTS",
    "PAGE_TRACE_CHARS",
]

# The page's list of prompts holds the first PAGE_PROMPTS: 0.3 kB each for a 16-token prompt,
# 0.7 kB with verify's checks (measured), so the page stays near 1 MB at most. The heatmap and
# the table count every prompt; the list is for reading examples of a head.
PAGE_PROMPTS = 1000
BEFORE_TOKENS, AFTER_TOKENS = 48, 8  # of each prompt's text, shown around its target
# Each listed prompt carries its trace for its expander (compact: _trace), in prompt order while
# their JSON stays within PAGE_TRACE_CHARS: measured 4.2 kB a prompt for the embedded model
# (2 layers, 5 beams: all 1,000 listed prompts fit) and 19 kB for SmolLM2 at full depth (about
# 250 fit), so a page stays under ~6 MB.
PAGE_TRACE_CHARS = 5_000_000
# The trace page's scripts, then the census's own: a prompt's expander draws its trace with the
# trace page's code (mount.js's mount), from the data in the page.
CENSUS_SCRIPTS = (*SCRIPTS, "js/census.js")
STYLES = ("widget.css", "census.css")
OPTION_NAMES = ("agg_heads", "top_beam", "top_k", "length_norm", "edge_weight", "residual")


def census_payload(found, results: Sequence[TraceResult], max_prompts: int = PAGE_PROMPTS) -> dict:
    """The data the census page draws (``CensusPayload`` in ``js/schema.js``).

    ``results`` are the census's traces in prompt order; the grid's rows are every layer they
    traced, its columns every head the census counted (one column when heads were aggregated).

    >>> from rat_lens.corpus import Census, HeadCount
    >>> found = Census(1, "traces.jsonl", {"layers": [0, 1], "agg_heads": "none"},
    ...                [HeadCount(1, 2, 1, 1, 0.9, 1.0)])
    >>> data = census_payload(found, [])
    >>> data["meta"]["layers"], data["meta"]["heads"], data["heads"][0]["traced_mass"]
    ([1], [0, 1, 2], 0.9)
    """
    check_int("max_prompts", max_prompts, minimum=0)
    heads = list(found.heads)
    named = sorted({h.head for h in heads if h.head is not None})
    layers = {h.layer for h in heads}
    for r in results:
        layers.update(range(r.layer_lo if r.mode == "layers" else r.layer, r.layer + 1))
    options = dict(found.options)
    prompts = _listed(results[:max_prompts])
    return {
        "meta": {
            "n_prompts": found.n_prompts,
            "listed": len(prompts),
            "with_trace": sum("trace" in p for p in prompts),
            "layers": sorted(layers, reverse=True),
            "heads": list(range(named[-1] + 1)) if named else [None],
            "options": {k: options[k] for k in OPTION_NAMES if k in options},
            "traced_layers": _layers_text(options),
        },
        "heads": [
            {
                "layer": h.layer,
                "head": h.head,
                "top_beam_prompts": h.top_beam_prompts,
                "edges": h.edges,
                "traced_mass": _round(h.traced_mass),
                "mass_share": _round(h.mass_share),
            }
            for h in heads
        ],
        "prompts": prompts,
        **({"roles": _roles(roles)} if (roles := getattr(found, "roles", None)) else {}),
    }


def census_fragment(
    found, results: Optional[Sequence[TraceResult]] = None, max_prompts: int = PAGE_PROMPTS
) -> str:
    """The census widget as an HTML fragment (style, static table, data and scripts inside),
    for a notebook output or your own page. ``results``: the census's traces in prompt order;
    default: read from the census's files (``found.traces()``)."""
    results = found.traces() if results is None else list(results)
    if not all(isinstance(r, TraceResult) for r in results):
        raise RatLensError("results must be the census's TraceResults, in prompt order")
    data = census_payload(found, results, max_prompts)
    uid = _new_id()
    return "\n".join(
        [
            "<style>" + "\n".join(_asset(name) for name in STYLES) + "</style>",
            f'<div class="ratlens ratlens-census" id="ratlens-census-{uid}"></div>',
            _table(data),
            f'<script type="application/json" id="ratlens-census-data-{uid}">'
            f"{inline_json(data)}</script>",
            _script(VENDOR, CENSUS_SCRIPTS, f"mountCensus({inline_json(uid)});"),
        ]
    )


def census_html(
    found, results: Optional[Sequence[TraceResult]] = None, max_prompts: int = PAGE_PROMPTS
) -> str:
    """The census page, a complete self-contained HTML document (what ``census.html`` holds)."""
    body = census_fragment(found, results, max_prompts)
    return _document(f"rat_lens census: {found.n_prompts:,} prompts", body)


@checked_call
def render_census(
    found,
    out_dir: Union[str, Path],
    results: Optional[Sequence[TraceResult]] = None,
    open_browser: bool = False,
    max_prompts: int = PAGE_PROMPTS,
) -> str:
    """Write ``census.html`` to ``out_dir``; return its path (as :func:`render_html` does)."""
    page = write_files(out_dir, {"census.html": census_html(found, results, max_prompts)})[0]
    if open_browser:
        webbrowser.open(page.resolve().as_uri())
    return str(page)


def _prompt(index: int, result: TraceResult) -> dict:
    """``CensusPrompt``: the tokens around the target, the best beam's heads and, when the
    census checked it (``verify=``), the causal check."""
    tokens, pos = result.tokens, result.target_pos
    start = max(0, pos - BEFORE_TOKENS)
    best = result.beams[0] if result.beams else None
    edges = [] if best is None else [i for i in range(best.num_edges) if not best.is_residual(i)]
    guess = next((p for p in result.predictions if p.position == pos and p.tokens), None)
    return {
        "index": index,
        "seq_len": result.seq_len,
        "target_pos": pos,
        "start": start,
        "before": list(tokens[start:pos]),
        "target": tokens[pos] if pos < len(tokens) else "",
        "after": list(tokens[pos + 1 : pos + 1 + AFTER_TOKENS]),
        "path": result.paths_text[0] if result.paths_text else "",
        "layers": [best.layers[i] for i in edges],
        "heads": [best.heads[i] for i in edges],
        # The best route's moves from the target back (stays left out): what the list shows.
        "moves": [
            {
                "layer": m.layer,
                "head": m.head,
                "query": m.query,
                "key": m.key,
                "token": tokens[m.key],
                "weight": _round(m.weight),
            }
            for m in (best.moves() if best is not None else [])
        ],
        "guess": None if guess is None else guess.tokens[0],
        "guess_prob": None if guess is None else _round(guess.probs[0]),
        **({"verification": verification(v)} if (v := result.verification) else {}),
    }


def _listed(results: Sequence[TraceResult]) -> list[dict]:
    """``CensusPrompt`` records, each with its trace while the traces' JSON stays within
    ``PAGE_TRACE_CHARS`` (after that, none: the first prompts carry theirs)."""
    prompts, spent = [], 0
    for i, result in enumerate(results):
        prompts.append(_prompt(i, result))
        trace = _trace(result)
        spent += len(inline_json(trace))
        if spent <= PAGE_TRACE_CHARS:
            prompts[-1]["trace"] = trace
    return prompts


def _trace(result: TraceResult) -> dict:
    """What the prompt's expander draws: the trace page's ``Payload``, compact. The beams, the
    graph, the tokens, the predictions and the causal check are kept; the strip's averaged
    attention (``top_attention``: a few keys for every position) and the heads' whole attention
    rows (``head_rows``: up to 32 keys per traced query) are left out, so the strip shows the
    beams' own edges and the head heatmap the beams' keys. They are most of a trace's payload."""
    return payload(dataclasses.replace(result, token_ids=[], top_attention=[], head_rows=[]))


def _roles(table) -> dict:
    """``CensusRoles``: a :class:`~rat_lens.result.HeadTable` of role scores, rounded."""
    return {
        "layers": list(table.layers),
        "scores": {
            name: [[_round(x) for x in row] for row in rows] for name, rows in table.scores.items()
        },
    }


def _layers_text(options: dict) -> str:
    layers = options.get("layers")
    if layers:
        return f"layers {layers[1]} down to {layers[0]}"
    return f"layer {options.get('layer', -1)} (chain)"


def _table(data: dict) -> str:
    """Every counted head as a static table, most traced mass first: the heatmap's numbers
    for readers without the graphic (and without JavaScript)."""
    meta, heads, roles = data["meta"], data["heads"], data.get("roles")
    names = sorted(roles["scores"]) if roles else []
    cols = ["head", "top-beam prompts", "share of prompts", "edges", "traced mass", "mass share"]
    cols += [name.removesuffix("_head").replace("_", " ") for name in names]
    rows = []
    for h in heads:
        # ints, whatever a loaded census.json holds: they go into the markup unescaped
        layer, head = int(h["layer"]), None if h["head"] is None else int(h["head"])
        cells = [
            f"{h['top_beam_prompts']:,}",
            f"{h['top_beam_prompts'] / max(meta['n_prompts'], 1):.1%}",
            f"{h['edges']:,}",
            f"{h['traced_mass']:.4g}",
            f"{h['mass_share']:.1%}",
        ]
        for name in names:
            score = _role_score(roles, name, layer, head)
            cells.append("" if score is None else f"{score:.3f}")
        rows.append(
            f'<tr data-layer="{layer}" data-head="{"" if head is None else head}">'
            f'<th scope="row">L{layer}{"" if head is None else f".H{head}"}</th>'
            + "".join(f"<td>{html.escape(c)}</td>" for c in cells)
            + "</tr>"
        )
    head_row = "".join(f'<th scope="col">{html.escape(c)}</th>' for c in cols)
    return (
        '<details class="ratlens-census-table"><summary>Table: the '
        f"{len(heads):,} heads on the routes of {meta['n_prompts']:,} prompts, by traced mass"
        f"</summary><table><thead><tr>{head_row}</tr></thead><tbody>{''.join(rows)}</tbody>"
        "</table></details>"
    )


def _role_score(roles: dict, name: str, layer: int, head: Optional[int]) -> Optional[float]:
    if head is None or layer not in roles["layers"]:
        return None
    row = roles["scores"][name][roles["layers"].index(layer)]
    return row[head] if head < len(row) else None
