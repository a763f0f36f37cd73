"""What the page is given: a :class:`TraceResult` cut down to what the diagram draws, as JSON
that is safe to inline in a ``<script>`` element.

The page never sees the result object itself: it gets the traced nodes and links (per head, one
link per (layer, head, key, query) edge, made here from the beams), the beams, the token text
(for the token strip), the strip's attention rows, the model's predictions at traced positions,
what each route carried (the logit lens at its nodes, each move's head write and what was written
where a route stayed, when the trace explained itself: ``rat_lens.lens``) and, when the result
has them, whole per-head attention rows (``head_rows``, optional). Nothing else is embedded, so
a 30-layer trace of thousands of tokens stays a small file.

Every record here is documented, field by field, in ``js/schema.js`` (the JSDoc ``@typedef`` the
page's code reads it through); ``tests/test_render.py`` checks a real payload against it, so a
field added here without a line there fails the tests.
"""

import json
from collections.abc import Callable
from typing import Optional

from ..result import (
    HeadWrite,
    LensRecord,
    StayWrite,
    TraceResult,
    Verification,
    beam_weights,
    node_id,
    node_layers,
)
from ..text import verification_metric

__all__ = [
    "payload",
    "links",
    "per_head",
    "head_rows",
    "strip_rows",
    "inline_json",
    "verification",
    "lens_record",
    "head_write",
    "stay_write",
    "node_ids",
]

# Characters that could end the inline <script> element (``</script>``) or open a comment in it
# (``<!--``), written as JSON \u escapes, which JSON.parse reads back to the same string. Non-ASCII
# text is escaped by json itself (ensure_ascii): that covers U+2028/2029, which older JavaScript
# parsers take as line ends, and lone surrogates, which UTF-8 cannot even write.
_UNSAFE = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026"}
_UNSAFE_TABLE = str.maketrans(_UNSAFE)


def payload(result: TraceResult) -> dict:
    """The data one diagram draws: plain JSON types, deterministic for a given result.

    >>> from rat_lens.result import BeamPath, build_sankey
    >>> beam = BeamPath([2, 0], ["c", "a"], [7, 5], [0.9], -0.1, -0.1, layers=[0],
    ...                 heads=[None], bos_mass=[0.9])
    >>> result = TraceResult(3, 2, 0, 1, 1, ["a", "b", "c"], [beam],
    ...                      build_sankey([beam], ["a", "b", "c"], "chain", 0), ["a -> c"])
    >>> data = payload(result)
    >>> data["beams"][0]["node_ids"], [n["id"] for n in data["nodes"]]
    (['L0_P2', 'L0_P0'], ['L0_P0', 'L0_P2'])
    >>> data["meta"]["target_node_id"]
    'L0_P2'
    >>> data["strip"]
    {'source': 'edges', 'rows': [{'query': 2, 'key': 0, 'weight': 0.9, 'layer': 0, 'head': None}]}
    """
    ids = node_ids(result)
    return {
        "meta": {
            "mode": result.mode,
            "layer": result.layer,
            "layer_lo": result.layer_lo,
            "target_pos": result.target_pos,
            "target_node_id": ids(result.layer, result.target_pos),
            "seq_len": result.seq_len,
            "top_beam": result.top_beam,
            "top_k": result.top_k,
            "agg_heads": result.agg_heads,
            "length_norm": result.length_norm,
            "move_threshold": result.move_threshold,
            "depth_discount": result.depth_discount,
            "residual": result.residual,
            "exclude_bos": result.exclude_bos,
            "batch_index": result.batch_index,
            # A --generate page: the tokens from here on were generated (None: not known).
            "prompt_len": getattr(result, "prompt_len", None),
            # What the route explains (rat_lens.lens): "why target_token and not foil_token".
            "target_token": result.target_token,
            "foil_token": result.foil_token,
        },
        "tokens": list(result.tokens),
        "token_ids": list(result.token_ids),
        "beams": [_beam(b, text, result, ids) for b, text in zip(result.beams, result.paths_text)],
        # Sorted by (layer, position): the page's layout reads positions, not this order.
        "nodes": [
            {"id": n.id, "position": n.position, "layer": n.layer}
            for n in sorted(result.sankey.nodes, key=lambda n: (n.layer, n.position))
        ],
        "links": links(result, ids),
        "strip": {
            "source": "attention" if result.top_attention else "edges",
            "rows": strip_rows(result),
        },
        "predictions": [
            {"position": p.position, "tokens": list(p.tokens), "probs": _rounded(p.probs)}
            for p in result.predictions
        ],
        # What each route carried (rat_lens.lens): empty unless the trace explained itself.
        "lens": [lens_record(r) for r in result.lens],
        "writes": [head_write(w) for w in result.writes],
        "stays": [stay_write(s) for s in result.stays],
        **({"head_rows": rows} if (rows := head_rows(result)) else {}),
        **({"verification": verification(result.verification)} if result.verification else {}),
    }


def _beam(b, text: str, result: TraceResult, ids: Callable[[int, int], str]) -> dict:
    """One ``Beam`` record (``js/schema.js``), weights rounded, with its nodes' ids."""
    return {
        "positions": b.positions,
        "edge_weights": _rounded(b.edge_weights),
        "edge_attns": [None if a is None else _round(a) for a in b.edge_attns],
        "layers": b.layers,
        "heads": b.heads,
        "bos_mass": _rounded(b.bos_mass),
        "score_raw": _round(b.score_raw),
        "score_norm": _round(b.score_norm),
        "kinds": list(getattr(b, "kinds", None) or []),
        "text": text,
        "node_ids": [
            ids(lay, pos)
            for pos, lay in zip(b.positions, node_layers(b, result.mode, result.layer))
        ],
    }


def per_head(result: TraceResult) -> bool:
    """Whether the beams name heads (``agg_heads="none"``): then the diagram draws one link per
    (layer, head, key, query) edge instead of the Sankey graph's links, which merge heads."""
    return any(h is not None for b in result.beams for h in b.heads)


def links(result: TraceResult, ids: Callable[[int, int], str]) -> list[dict]:
    """The diagram's links (``Link`` in ``js/schema.js``), key node → query node.

    Heads aggregated: ``result.sankey.links`` as they are (``head`` null). Per head: one link per
    distinct (layer, head, key, query) edge of the beams, built here from the beams by
    ``build_sankey``'s rule (Σ over the beams using the edge of softmax(score_norm over beams) ×
    edge weight, :func:`rat_lens.result.beam_weights`), in the order the beams first use them:
    the links of one key → query pair then add up to the Sankey graph's merged link. A stay in
    the residual stream (an edge of kind ``"residual"`` in a contribution-weighted trace, head
    ``None``) is a link of its own, marked ``"residual": True``.

    >>> from rat_lens.result import BeamPath, build_sankey
    >>> beams = [BeamPath([2, 1], ["c", "b"], [2, 1], [0.8], -0.2, -0.2, layers=[0],
    ...                   heads=[h], bos_mass=[0.0]) for h in (1, 0)]
    >>> result = TraceResult(3, 2, 0, 2, 2, ["a", "b", "c"], beams,
    ...                      build_sankey(beams, ["a", "b", "c"], "chain", 0), ["", ""])
    >>> [(lk["head"], lk["value"], lk["beams"]) for lk in links(result, node_ids(result))]
    [(1, 0.4, [0]), (0, 0.4, [1])]
    >>> [round(lk.value, 6) for lk in result.sankey.links]   # the same edge, heads merged
    [0.8]
    """
    if not per_head(result):
        return [
            {
                "source": lk.source,
                "target": lk.target,
                "value": _round(lk.value),
                "beams": lk.beam_indices,
                "layer": lk.layer,
                "head": None,
            }
            for lk in result.sankey.links
        ]
    found: dict[tuple, dict] = {}
    for b, (beam, weight) in enumerate(zip(result.beams, beam_weights(result.beams))):
        lays = node_layers(beam, result.mode, result.layer)
        kinds = getattr(beam, "kinds", None) or []
        for i, edge_weight in enumerate(beam.edge_weights):
            key, query = ids(lays[i + 1], beam.positions[i + 1]), ids(lays[i], beam.positions[i])
            stay = bool(kinds) and kinds[i] == "residual"
            link = found.setdefault(
                (key, query, beam.layers[i], beam.heads[i], stay),
                {
                    "source": key,
                    "target": query,
                    "value": 0.0,
                    "beams": [],
                    "layer": beam.layers[i],
                    "head": beam.heads[i],
                    **({"residual": True} if stay else {}),
                },
            )
            link["value"] += weight * edge_weight
            if b not in link["beams"]:
                link["beams"].append(b)
    return [{**lk, "value": _round(lk["value"])} for lk in found.values()]


def head_rows(result: TraceResult) -> list[dict]:
    """``HeadRow`` records (``js/schema.js``): one head's attention row at one traced query, for
    the page's head heatmap, from ``result.head_rows`` when the tracer recorded them (an optional
    field: dicts or objects with ``layer``, ``head``, ``query``, ``keys``, ``weights``); empty
    otherwise, and the heatmap then shows the beams' edges only.

    >>> from rat_lens.result import SankeyData
    >>> result = TraceResult(3, 2, 0, 1, 1, ["a", "b", "c"], [], SankeyData([], []), [])
    >>> head_rows(result)
    []
    >>> result.head_rows = [{"layer": 0, "head": 1, "query": 2, "keys": [0, 1, 2],
    ...                      "weights": [0.1234567, 0.5, 0.3765433]}]
    >>> head_rows(result)[0]["weights"]
    [0.123457, 0.5, 0.376543]
    """
    rows = []
    for row in getattr(result, "head_rows", None) or []:
        get = row.get if isinstance(row, dict) else lambda name, r=row: getattr(r, name)
        rows.append(
            {
                "layer": int(get("layer")),
                "head": None if get("head") is None else int(get("head")),
                "query": int(get("query")),
                "keys": [int(k) for k in get("keys")],
                "weights": _rounded(get("weights")),
            }
        )
    return rows


def verification(v: Verification) -> dict:
    """What the info panel shows of a :class:`Verification`: each beam's causal effect, the
    faithfulness curve's area and the blank-out correlations (rounded)."""
    f, t = v.faithfulness, v.token_importance
    return {
        "prediction": v.prediction,
        "metric": v.metric,
        "metric_name": verification_metric(v),
        "foil": v.foil,
        "logit_diff": None if v.logit_diff is None else _round(v.logit_diff),
        "ablation": v.ablation,
        "n_random": v.n_random,
        "beams": [
            {
                "effect": _round(b.effect.effect),
                "ratio": None if b.effect.ratio is None else _round(b.effect.ratio),
                "p_value": b.effect.p_value,
            }
            for b in v.beams
        ],
        "faithfulness_area": None if f is None or f.area is None else _round(f.area),
        "spearman": {
            k: None if x is None else _round(x)
            for k, x in (t.spearman if t is not None else {}).items()
        },
    }


def lens_record(r: LensRecord) -> dict:
    """A ``LensRecord`` (``js/schema.js``): the logit lens at one node, probabilities rounded."""
    return {
        "layer": r.layer,
        "position": r.position,
        "tokens": list(r.tokens),
        "token_ids": list(r.token_ids),
        "probs": _rounded(r.probs),
        "target_rank": r.target_rank,
        "target_prob": _round(r.target_prob),
    }


def head_write(w: HeadWrite) -> dict:
    """A ``HeadWrite`` (``js/schema.js``): what one head move wrote, its direct logits rounded."""
    return {
        "layer": w.layer,
        "head": w.head,
        "position": w.position,
        "key": w.key,
        "promoted": list(w.promoted),
        "promoted_ids": list(w.promoted_ids),
        "promoted_logits": _rounded(w.promoted_logits),
        "suppressed": list(w.suppressed),
        "suppressed_ids": list(w.suppressed_ids),
        "suppressed_logits": _rounded(w.suppressed_logits),
        "dla": _round(w.dla),
        "dla_diff": None if w.dla_diff is None else _round(w.dla_diff),
    }


def stay_write(s: StayWrite) -> dict:
    """A ``StayWrite`` (``js/schema.js``): what was written where a route stayed, rounded."""
    return {
        "position": s.position,
        "top": s.top,
        "bottom": s.bottom,
        "blocks": [
            {"layer": b.layer, "block": b.block, "share": _round(b.share)} for b in s.blocks
        ],
        "mlp_layer": s.mlp_layer,
        "mlp_dla": None if s.mlp_dla is None else _round(s.mlp_dla),
        "mlp_dla_diff": None if s.mlp_dla_diff is None else _round(s.mlp_dla_diff),
    }


def node_ids(result: TraceResult) -> Callable[[int, int], str]:
    """``(layer, position) -> id`` of the node the diagram draws there.

    Ids are made once, by :func:`rat_lens.result.node_id` when ``build_sankey`` makes the nodes;
    this reads them back from ``result.sankey.nodes``, so beams, links and nodes on the page
    always agree with the graph. A node not in the graph (a result whose Sankey was not built
    from its beams, or a target no beam left) gets :func:`~rat_lens.result.node_id`'s id, which
    matches nothing drawn: clicking it can light nothing up, and nothing breaks.

    >>> from rat_lens.result import SankeyData, SankeyNode
    >>> result = TraceResult(2, 1, 0, 1, 1, ["a", "b"], [],
    ...                      SankeyData([SankeyNode("n1", "b", 1, 0)], []), [])
    >>> ids = node_ids(result)
    >>> ids(0, 1), ids(0, 0)
    ('n1', 'L0_P0')
    """
    drawn = {(n.layer, n.position): n.id for n in result.sankey.nodes}

    def lookup(layer: int, position: int) -> str:
        found = drawn.get((layer, position))
        return found if found is not None else node_id(layer, position)

    return lookup


def strip_rows(result: TraceResult) -> list[dict]:
    """``{query, key, weight, layer, head}`` rows (``StripRow`` in ``js/schema.js``) for the
    token strip, which shows, for a hovered token, what it attends to and what attends to it.

    From a traced model, the strongest keys of every query (``result.top_attention``, averaged
    over the traced layers and heads: layer and head are ``None``); from a bare tensor trace,
    each distinct edge of the beams, best beam first (tokens off the paths show nothing).
    """
    if result.top_attention:
        return [_strip_row(q, k, w, None, None) for q, k, w in result.top_attention]
    rows, seen = [], set()
    for beam in result.beams:
        for i, weight in enumerate(beam.edge_weights):
            edge = (beam.positions[i], beam.positions[i + 1], beam.layers[i], beam.heads[i])
            if edge not in seen:
                seen.add(edge)
                rows.append(_strip_row(edge[0], edge[1], weight, edge[2], edge[3]))
    return rows


def _strip_row(
    query: int, key: int, weight: float, layer: Optional[int], head: Optional[int]
) -> dict:
    """One ``StripRow``: ``layer`` / ``head`` are None where averaged over the traced ones."""
    return {"query": query, "key": key, "weight": _round(weight), "layer": layer, "head": head}


def _round(x: float) -> float:
    """Six significant digits: the page shows at most four decimals, and a 2,000-hop chain's
    page is a quarter smaller than with full float reprs."""
    return float(f"{x:.6g}")


def _rounded(xs: list[float]) -> list[float]:
    return [_round(x) for x in xs]


def inline_json(data) -> str:
    """JSON for a ``<script type="application/json">`` element: nothing in it can close the
    element, open a comment or break a line. Compact (no space after ``,`` and ``:``): the named
    strip-row fields cost less than the spaces this drops from a long chain's page.

    >>> inline_json({"token": "</script><!--\\u2028", "n": [1, 2]})
    '{"token":"\\\\u003c/script\\\\u003e\\\\u003c!--\\\\u2028","n":[1,2]}'
    """
    return json.dumps(data, allow_nan=False, separators=(",", ":")).translate(_UNSAFE_TABLE)
