"""A trace in words and numbers: one-line circuits, the heads and layers carrying traced mass.

``summarize(result)`` needs nothing but the :class:`~rat_lens.result.TraceResult`. Give
it more and it says more: the captured ``patterns`` add attention statistics and rollout
importance, the model's final ``logits`` add next-token predictions at the traced positions,
``roles`` (:func:`rat_lens.roles.head_roles`) names the heads on the edges. Read as a
dataclass, ``to_markdown()``, ``to_text()`` (fits 100 columns), ``rich.print(summary)`` in a
terminal, or ``to_dict()`` / ``to_json()`` (and back).

**Traced mass** is the Sankey rule summed by what it runs through: every beam counts with
softmax(score_norm) over the beams, every edge with that share × its edge weight (attention,
or a share of the block output).
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from ..errors import RatLensError, checked_call
from ..result import (
    HeadTable,
    HeadWrite,
    JsonRoundTrip,
    Prediction,
    StayWrite,
    TraceResult,
    Verification,
    beam_weights,
    check_result,
)
from ..text import path_text
from .text import summary_html, summary_markdown, summary_rich, summary_text

__all__ = [
    "Summary",
    "BeamCircuit",
    "HeadMass",
    "LayerMass",
    "EdgeMass",
    "TokenScore",
    "summarize",
    "ROLE_LABELS",
]

ROLE_LABELS = {
    "previous_token_head": "prev-token",
    "duplicate_token_head": "duplicate",
    "induction_head": "induction",
}


@dataclass
class BeamCircuit:
    """One beam as a line, target first (:func:`rat_lens.text.path_text` without the score):
    ``'red'@7 ←L1.H1(0.97)─ 'red'@3``; runs of residual stays read ``stays L29-L19``."""

    rank: int
    circuit: str
    score_raw: float
    score_norm: float
    share: float  # softmax(score_norm) over the beams
    roles: list[str] = field(default_factory=list)  # per edge: role label of its head, or ""


@dataclass
class HeadMass:
    """Traced mass through one (layer, head); ``head`` None when heads were aggregated."""

    layer: int
    head: Optional[int]
    mass: float
    share: float  # of all traced mass
    edges: int
    role: str = ""
    role_score: Optional[float] = None


@dataclass
class LayerMass:
    layer: int
    mass: float
    share: float


@dataclass
class EdgeMass:
    """One edge (key → query through layer.head) with its weights and its traced mass:
    ``weight`` is the edge weight the search used (attention, or under value_norm /
    contribution the head's share of the block output: the text heads the column by which),
    ``attention`` the head's attention weight on the edge (None where the trace recorded none).
    """

    layer: int
    head: Optional[int]
    query: int
    key: int
    query_token: str
    key_token: str
    weight: float
    mass: float
    bos_mass: float
    beams: list[int] = field(default_factory=list)
    role: str = ""
    attention: Optional[float] = None


@dataclass
class TokenScore:
    position: int
    token: str
    beam_mass: float
    rollout: Optional[float] = None


@dataclass
class Carried:
    """What the route carried (:mod:`rat_lens.lens`), as the summary shows it: the token
    explained and its foil; ``top1_from``, the lowest traced layer from which the logit lens at
    the target reads the target as its top token on every layer up to the top (None: not at
    the top), and ``top_prob``, its lens probability after the top layer; the head moves'
    writes (one per head and query, with the key of its first move) and the stays' blocks
    (best beam first, at most ``carried_rows`` each);
    ``positions`` / ``position_tokens``: the tokens at the positions they name."""

    target: Optional[str]  # None: a result saved without the token explained
    foil: Optional[str]
    top1_from: Optional[int]
    top_prob: Optional[float]
    writes: list[HeadWrite]
    stays: list[StayWrite]
    positions: list[int]
    position_tokens: list[str]

    def token(self, position: int) -> str:
        return self.position_tokens[self.positions.index(position)]


@dataclass
class Summary(JsonRoundTrip):
    """Everything :func:`summarize` found; ``str(summary)`` is :meth:`to_text`."""

    target_pos: int
    target_token: str
    mode: str
    layer: int
    layer_lo: Optional[int]
    agg_heads: str
    length_norm: str
    exclude_bos: bool
    batch_index: int
    beams: list[BeamCircuit]
    heads: list[HeadMass]
    layers: list[LayerMass]
    edges: list[EdgeMass]
    tokens: list[TokenScore]
    importance: dict[str, list[float]] = field(default_factory=dict)  # name -> [seq]
    roles: Optional[HeadTable] = None
    role_threshold: float = 0.3
    stats: Optional[HeadTable] = None
    predictions: list[Prediction] = field(default_factory=list)
    verification: Optional[Verification] = None
    edge_weight: str = "attention"  # what the edge weights (and so the masses) are
    # A chain whose best beam ends on position 0: the attention sink, not a circuit.
    ends_on_sink: bool = False
    carried: Optional[Carried] = None  # None: the trace was not explained (no lens)

    def to_markdown(self) -> str:
        """GitHub-flavoured markdown: a heading, then one table per section."""
        return summary_markdown(self)

    def to_text(self, width: int = 100) -> str:
        """Plain-text tables, every line at most ``width`` terminal columns."""
        return summary_text(self, width)

    def html_fragment(self) -> str:
        """An HTML fragment of the same tables (for a side panel), all text escaped."""
        return summary_html(self)

    def __str__(self) -> str:
        return self.to_text()

    def __rich__(self):
        """``rich.print(summary)``: rich tables (rich is imported only here)."""
        return summary_rich(self)

    def _repr_markdown_(self) -> str:
        return self.to_markdown()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Summary":
        data = dict(data)
        # A summary saved before edges kept the search's weight and the attention apart.
        data["edges"] = [
            {("weight" if k == "attn" else k): v for k, v in edge.items()}
            for edge in data.get("edges", [])
        ]
        for name, kind in (
            ("beams", BeamCircuit),
            ("heads", HeadMass),
            ("layers", LayerMass),
            ("edges", EdgeMass),
            ("tokens", TokenScore),
            ("predictions", Prediction),
        ):
            data[name] = [kind(**item) for item in data.get(name, [])]
        for name in ("roles", "stats"):
            if data.get(name) is not None:
                data[name] = HeadTable.from_dict(data[name])
        if data.get("verification") is not None:
            data["verification"] = Verification.from_dict(data["verification"])
        carried = data.get("carried")
        if carried is not None:
            data["carried"] = Carried(
                **{
                    **carried,
                    "writes": [HeadWrite(**w) for w in carried["writes"]],
                    "stays": [StayWrite.from_dict(s) for s in carried["stays"]],
                }
            )
        return cls(**data)


@checked_call
def summarize(
    result: TraceResult,
    *,
    patterns=None,
    logits=None,
    roles: Union[HeadTable, dict, None] = None,
    stats: Union[HeadTable, dict, None] = None,
    predictions: Optional[list] = None,
    tokenizer=None,
    k: int = 3,
    top_edges: int = 8,
    carried_rows: int = 8,
    top_tokens: int = 8,
    role_threshold: float = 0.3,
    verification: Union[Verification, dict, None] = None,
) -> Summary:
    """Summarise ``result``; every extra argument adds a section and none is needed.

    Args:
        patterns: the captured attention of the traced layers: an ``ActivationCache`` or a dict
            keyed by hook name or layer, each ``[batch, head, q, k]`` or ``[head, q, k]``
            (head-aggregated ones too). Adds per-head statistics and rollout importance.
        logits: the model's final logits ``[seq, vocab]`` or ``[batch, seq, vocab]``; adds the
            top-``k`` next tokens at each traced position (decoded by ``tokenizer`` if given).
        roles: :func:`rat_lens.roles.head_roles` of the traced tokens; names the heads on the
            edges whose best role scores at least ``role_threshold``.
        stats: precomputed statistics (:class:`HeadTable`).
        predictions: precomputed prediction records.
        top_edges: rows kept in the edges table.
        carried_rows: rows kept of the moves' writes and of the stays (an explained trace).
        top_tokens: rows kept in the tokens table.
        verification: :func:`rat_lens.verify.verify` of this result; adds each beam's causal
            effect and the faithfulness curve.

    Fields the tracer records (``predictions``, ``rollout``, and ``verification`` kept from
    :func:`rat_lens.verify`) are used when present and not given here. Only ``patterns`` and
    ``logits`` need torch (imported for them alone).

    Examples:
        >>> from rat_lens import trace
        >>> from rat_lens.models import load
        >>> result = trace(load("induction-2l"), "cat dog red blue cat dog red", layers=(0, 1),
        ...                agg_heads="none", top_beam=3)
        >>> summary = summarize(result)
        >>> summary.beams[0].circuit.startswith("'red'@7 ←L1.H")
        True
        >>> round(sum(layer.share for layer in summary.layers), 6)
        1.0
        >>> Summary.from_json(summary.to_json()) == summary
        True
    """
    check_result(result, "summarize")
    # Explicit arguments win; then what the tracer recorded; then what the tensors give.
    roles, stats = _table(roles), _table(stats)
    rollout = getattr(result, "rollout", None) or None
    if patterns is not None:
        stats, rollout = _from_patterns(result, patterns, stats, rollout)
    predictions = _predictions(result, predictions, logits, tokenizer, k)
    if verification is None:
        verification = getattr(result, "verification", None)
    if isinstance(verification, dict):
        verification = Verification.from_dict(verification)

    circuits, heads, edges = _masses(result, roles, role_threshold)
    layers = _share_by_layer(heads)
    importance = {"beam_mass": _beam_mass(result, edges)}
    if rollout is not None:
        importance["rollout"] = [float(x) for x in rollout]
    return Summary(
        target_pos=result.target_pos,
        target_token=result.tokens[result.target_pos],
        mode=result.mode,
        layer=result.layer,
        layer_lo=result.layer_lo,
        agg_heads=result.agg_heads,
        length_norm=result.length_norm,
        edge_weight=result.edge_weight,
        exclude_bos=result.exclude_bos,
        batch_index=result.batch_index,
        beams=circuits,
        heads=sorted(heads, key=lambda h: (-h.mass, -h.layer, h.head or 0)),
        layers=layers,
        edges=sorted(edges, key=lambda e: -e.mass)[:top_edges],
        tokens=_top_tokens(result.tokens, importance, top_tokens),
        importance=importance,
        roles=roles,
        role_threshold=role_threshold,
        stats=stats,
        predictions=[
            p if isinstance(p, Prediction) else Prediction(**p) for p in predictions or []
        ],
        verification=verification,
        ends_on_sink=_ends_on_sink(result),
        carried=_carried(result, carried_rows),
    )


def _carried(result: TraceResult, limit: int) -> Optional[Carried]:
    """What the route carried, from the result's lens, writes and stays (None: no lens)."""
    if not result.lens:
        return None
    column = sorted((r for r in result.lens if r.position == result.target_pos),
                    key=lambda r: r.layer)  # fmt: skip
    top1_from = None
    for record in reversed(column):  # down from the top while the target stays top-1
        if record.target_rank != 0:
            break
        top1_from = record.layer
    # A head's write at a query is one, whichever keys its moves read: one row each.
    first: dict[tuple, HeadWrite] = {}
    for w in result.writes:
        first.setdefault((w.layer, w.head, w.position), w)
    writes, stays = list(first.values())[:limit], result.stays[:limit]
    positions = sorted(
        {p for w in writes for p in (w.position, w.key)} | {s.position for s in stays}
    )
    return Carried(
        target=result.target_token,
        foil=result.foil_token,
        top1_from=top1_from,
        top_prob=column[-1].target_prob if column else None,
        writes=writes,
        stays=stays,
        positions=positions,
        position_tokens=[result.tokens[p] for p in positions],
    )


def _ends_on_sink(result) -> bool:
    """Whether a chain's best beam ends on position 0, where trained models park attention
    (BOS or not): then the beams show the sink, and layers mode or ``exclude_bos`` show more."""
    best = result.beams[0] if result.beams else None
    return result.mode == "chain" and best is not None and best.positions[-1] == 0


def _from_patterns(
    result: TraceResult, patterns, stats: Optional[HeadTable], rollout: Optional[list]
) -> tuple[HeadTable, list]:
    """``stats`` and ``rollout``, each computed from the traced layers' patterns where not
    given (every traced layer's pattern is read either way, so a bad cache always fails)."""
    low = result.layer_lo if result.mode == "layers" else result.layer
    layer_ids = list(range(result.layer, low - 1, -1))
    stacked = [_pattern(patterns, layer, result.batch_index) for layer in layer_ids]
    stats = stats if stats is not None else _stats_table(layer_ids, stacked, result.agg_heads)
    rollout = rollout if rollout is not None else _rollout(stacked, result.target_pos)
    return stats, rollout


def _predictions(result: TraceResult, predictions, logits, tokenizer, k: int):
    """The predictions given, else the tracer's, else the top ``k`` of ``logits``, else None."""
    if predictions is None:
        predictions = getattr(result, "predictions", None) or None
    if predictions is None and logits is not None:
        from ..search.stats import predictions_at  # torch, for logits only

        predictions = predictions_at(result, logits, tokenizer, k)
    return predictions


def _share_by_layer(heads: list[HeadMass]) -> list[LayerMass]:
    """Sets each head's share of all traced mass; returns the mass per layer, top layer first."""
    total = sum(h.mass for h in heads) or 1.0  # no edge traced: shares 0, not a division by 0
    per_layer: dict[int, float] = {}
    for hm in heads:
        hm.share = hm.mass / total
        per_layer[hm.layer] = per_layer.get(hm.layer, 0.0) + hm.mass
    return [
        LayerMass(layer, mass, mass / total)
        for layer, mass in sorted(per_layer.items(), key=lambda item: -item[0])
    ]


def _masses(
    result: TraceResult, roles: Optional[HeadTable], threshold: float
) -> tuple[list[BeamCircuit], list[HeadMass], list[EdgeMass]]:
    """Every beam as a circuit line; traced mass summed per (layer, head) and per edge."""
    heads: dict[tuple, HeadMass] = {}
    edges: dict[tuple, EdgeMass] = {}
    circuits = []
    for b, (beam, share) in enumerate(zip(result.beams, beam_weights(result.beams))):
        edge_roles = []
        for i, weight in enumerate(beam.edge_weights):
            if beam.is_residual(i):  # a stay: no head carries it
                edge_roles.append("")
                continue
            layer, head = beam.layers[i], beam.heads[i]
            role, score = _best_role(roles, layer, head, threshold)
            edge_roles.append(role)
            hm = heads.setdefault((layer, head), HeadMass(layer, head, 0.0, 0.0, 0, role, score))
            hm.mass += share * weight
            hm.edges += 1
            q, key = beam.positions[i], beam.positions[i + 1]
            em = edges.setdefault(
                (layer, head, q, key),
                EdgeMass(
                    layer,
                    head,
                    q,
                    key,
                    beam.tokens[i],
                    beam.tokens[i + 1],
                    weight,
                    0.0,
                    beam.bos_mass[i],
                    [],
                    role,
                    beam.edge_attns[i] if beam.edge_attns else None,
                ),
            )
            em.mass += share * weight
            em.beams.append(b)
        line = path_text(beam, score=False)
        circuits.append(
            BeamCircuit(b + 1, line, beam.score_raw, beam.score_norm, share, edge_roles)
        )
    return circuits, list(heads.values()), list(edges.values())


def _table(value) -> Optional[HeadTable]:
    if value is None or isinstance(value, HeadTable):
        return value
    if isinstance(value, dict):
        return HeadTable.from_dict(value)
    raise RatLensError(f"expected a HeadTable or its to_dict(), got {type(value).__name__}")


def _best_role(
    roles: Optional[HeadTable], layer: int, head: Optional[int], threshold: float
) -> tuple[str, Optional[float]]:
    """The role whose detector score for (layer, head) is highest and >= threshold."""
    if roles is None or head is None:
        return "", None
    scored = [(roles.get(name, layer, head), name) for name in roles.scores]
    scored = [(s, n) for s, n in scored if s is not None and s >= threshold]
    if not scored:
        return "", None
    score, name = max(scored)
    return ROLE_LABELS.get(name, name), score


def _pattern(patterns, layer: int, batch_index: int):
    """``[head, q, k]`` of one layer, from a cache / dict keyed by hook name or by layer."""
    name = f"blocks.{layer}.attn.hook_pattern"  # TL's name; capture.hook_name without importing TL
    for key in (name, layer):
        try:
            pattern = patterns[key]
            break
        except (KeyError, IndexError, TypeError):
            continue
    else:
        raise RatLensError(
            f"patterns has no {name!r} (nor key {layer}): pass the cache of the traced layers"
        )
    if pattern.ndim == 4:
        pattern = pattern[batch_index if pattern.shape[0] > 1 else 0]
    if pattern.ndim != 3:
        raise RatLensError(
            f"pattern of layer {layer} has shape {tuple(pattern.shape)}; expected "
            "[batch, head, q, k] or [head, q, k]"
        )
    return pattern.detach().cpu()


def _stats_table(layer_ids: list[int], stacked: list, agg_heads: str) -> HeadTable:
    import torch  # patterns were given: they are torch tensors

    from ..search.stats import attention_stats

    per_layer = [attention_stats(p.float()) for p in stacked]
    n_heads = {p.shape[0] for p in stacked}
    if len(n_heads) > 1:
        raise RatLensError(f"patterns have different head counts per layer: {sorted(n_heads)}")
    return HeadTable.from_tensors(
        layer_ids,
        {name: torch.stack([s[name] for s in per_layer]) for name in per_layer[0]},
        aggregated=n_heads == {1} and agg_heads != "none",
    )


def _rollout(stacked: list, target: int) -> list[float]:
    import torch  # patterns were given: they are torch tensors

    from ..search.stats import rollout_importance

    lo_to_hi = [p.float() for p in reversed(stacked)]
    if len({p.shape[0] for p in lo_to_hi}) > 1:  # mixed head counts: average each layer first
        lo_to_hi = [p.mean(0, keepdim=True) for p in lo_to_hi]
    return rollout_importance(torch.stack(lo_to_hi), target).tolist()


def _beam_mass(result: TraceResult, edges) -> list[float]:
    """Traced mass landing on each position (``search.stats.beam_mass_importance`` in plain
    Python, in the same order, so that a summary needs no torch)."""
    mass = [0.0] * result.seq_len
    for edge in edges:
        mass[edge.key] += edge.mass
    return mass


def _top_tokens(tokens: list[str], importance: dict[str, list[float]], n: int) -> list[TokenScore]:
    """The top ``n`` positions by beam mass, and by rollout when there is one."""
    chosen: dict[int, None] = {}
    for name in ("beam_mass", "rollout"):
        values = importance.get(name)
        if values is not None:
            best = sorted(range(len(values)), key=lambda p: -values[p])[:n]
            chosen.update((p, None) for p in best if values[p] > 0)
    rollout: Any = importance.get("rollout")
    rows = [
        TokenScore(
            p, tokens[p], importance["beam_mass"][p], None if rollout is None else rollout[p]
        )
        for p in chosen
    ]
    return sorted(rows, key=lambda t: (-t.beam_mass, -(t.rollout or 0.0), t.position))
