"""What a trace returns: beams, the Sankey graph built from them, and JSON round trips.

Field names follow reverse-attention 0.1.0 (``BeamPath.positions``, ``TraceResult.sankey``...),
so code written against it reads ours; the multi-layer and per-head modes add ``layers`` and
``heads`` per edge.
"""

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

from ._json import JsonRoundTrip


@dataclass
class Beam:
    """One path backward from the target: ``positions[0]`` is the target, each edge steps back.

    Edge ``i`` goes from query ``positions[i]`` to key ``positions[i + 1]`` through layer
    ``layers[i]`` (and head ``heads[i]``; ``None`` when heads were aggregated), with attention
    weight ``edge_attns[i]``. ``bos_mass[i]`` is how much of that edge's attention row sat on
    BOS / position 0. ``score_raw`` = Σ log(edge_attns); ``score_norm`` is it length-normalised.
    """

    positions: list[int]
    edge_attns: list[float]
    layers: list[int]
    heads: list[Optional[int]]
    bos_mass: list[float]
    score_raw: float
    score_norm: float

    @property
    def num_edges(self) -> int:
        return len(self.edge_attns)


@dataclass
class BeamPath(Beam):
    """A :class:`Beam` with the token text and ids at each of its positions."""

    tokens: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)

    @classmethod
    def from_beam(cls, beam: Beam, tokens: list[str], token_ids: list[int]) -> "BeamPath":
        return cls(**dataclasses.asdict(beam),
                   tokens=[tokens[p] for p in beam.positions],
                   token_ids=[token_ids[p] for p in beam.positions])


@dataclass
class SankeyNode:
    id: str
    name: str
    position: int
    layer: int = 0


@dataclass
class SankeyLink:
    source: str
    target: str
    value: float
    beam_indices: list[int] = field(default_factory=list)
    layer: int = 0
    heads: list[Optional[int]] = field(default_factory=list)


@dataclass
class SankeyData:
    nodes: list[SankeyNode]
    links: list[SankeyLink]


@dataclass
class TraceResult(JsonRoundTrip):
    """Beams traced backward from one target token of one prompt, ranked best first.

    ``mode`` is ``"chain"`` (every edge in ``layer``, the reverse-attention semantics) or
    ``"layers"`` (one edge per layer from ``layer`` down to ``layer_lo``). ``top_attention``
    holds ``[query, key, weight]`` for the strongest keys of every query, in the captured
    patterns averaged over the traced layers and heads (the renderer's token strip).
    ``predictions`` (when traced with ``predictions=k``) are the model's top-k next tokens at the
    traced positions; ``rollout`` is the target's attention-rollout importance over positions
    (Abnar & Zuidema 2020) across the traced layers (head-mean; empty for ``agg_heads="max"``).
    """

    seq_len: int
    target_pos: int
    layer: int
    top_beam: int
    top_k: int
    tokens: list[str]
    beams: list[BeamPath]
    sankey: SankeyData
    paths_text: list[str]
    mode: str = "chain"
    layer_lo: Optional[int] = None
    agg_heads: str = "mean"
    length_norm: str = "avg_logprob"
    residual: str = "none"
    exclude_bos: bool = False
    batch_index: int = 0
    token_ids: list[int] = field(default_factory=list)
    top_attention: list[list] = field(default_factory=list)
    predictions: list[dict] = field(default_factory=list)
    rollout: list[float] = field(default_factory=list)
    verification: Optional[dict] = None  # Verification.to_dict(), set by TraceResult.verify

    def __repr__(self) -> str:
        layers = f"layer={self.layer}" if self.mode == "chain" else \
            f"layers={self.layer_lo}..{self.layer}"
        best = f"{self.beams[0].score_norm:.3f}" if self.beams else "-"
        return (f"TraceResult(target_pos={self.target_pos}, {layers}, mode={self.mode!r}, "
                f"agg_heads={self.agg_heads!r}, top_beam={self.top_beam}, top_k={self.top_k}, "
                f"beams={len(self.beams)}, best_score={best})")

    def summary(self, **kwargs):
        """Circuit-style summary: :func:`rat_lens.summary.summarize` of this result.

        >>> from rat_lens import trace
        >>> from rat_lens.models import load
        >>> result = trace(load("induction-2l"), "cat dog red cat", layers=(0, 1))
        >>> print(result.summary().to_text().splitlines()[0])
        Trace summary: target 'cat'@4
        """
        from .summary import summarize  # lazily: summary imports this module

        return summarize(self, **kwargs)

    def verify(self, model, **kwargs):
        """Causal check of this trace in ``model``: :func:`rat_lens.verify.verify`, kept in
        ``self.verification`` (as a dict) so that the summary and the HTML page show it.

        >>> from rat_lens import trace
        >>> from rat_lens.models import load
        >>> model = load("induction-2l")
        >>> result = trace(model, "cat dog red blue cat dog red", layers=(0, 1))
        >>> result.verify(model, n_random=4).prediction
        'blue'
        """
        from .verify import verify  # lazily: verify imports this module

        check = verify(model, self, **kwargs)
        self.verification = check.to_dict()  # the summary and the page show it from here
        return check

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TraceResult":
        data = dict(data)
        data["beams"] = [BeamPath(**b) for b in data["beams"]]
        sankey = data["sankey"]
        data["sankey"] = SankeyData(nodes=[SankeyNode(**n) for n in sankey["nodes"]],
                                    links=[SankeyLink(**lk) for lk in sankey["links"]])
        return cls(**data)


    def to_html(self) -> str:
        """This trace as one self-contained interactive HTML page (see ``rat_lens.render``)."""
        from .render import to_html  # lazy: the renderer imports this module, not the reverse
        return to_html(self)

    def _repr_html_(self) -> str:
        from .render import html_fragment
        return html_fragment(self)


def node_layers(beam: Beam, mode: str, layer: int) -> list[int]:
    """The layer of each node: in chain mode all sit in ``layer``; in layers mode the target sits
    in ``layer`` and an edge through layer ``l`` lands on the residual stream below, ``l - 1``."""
    if mode == "chain" or not beam.layers:
        return [layer] * len(beam.positions)
    return beam.layers + [beam.layers[-1] - 1]


def beam_weights(beams: list[Beam]) -> list[float]:
    """softmax(score_norm) over beams: how much each beam counts in the Sankey link weights."""
    if not beams:
        return []
    top = max(b.score_norm for b in beams)
    exp = [math.exp(b.score_norm - top) for b in beams]
    return [e / sum(exp) for e in exp]


def build_sankey(beams: list[Beam], tokens: list[str], mode: str, layer: int) -> SankeyData:
    """Nodes are (layer, position); a link runs forward (key → query) and weighs
    Σ over the beams using it of softmax(score_norm) × edge attention (reverse-attention's rule)."""
    nodes: dict[str, SankeyNode] = {}
    links: dict[tuple[str, str], SankeyLink] = {}
    for b, (beam, weight) in enumerate(zip(beams, beam_weights(beams))):
        ids = []
        for pos, lay in zip(beam.positions, node_layers(beam, mode, layer)):
            ids.append(f"L{lay}_P{pos}")
            nodes.setdefault(ids[-1], SankeyNode(ids[-1], tokens[pos], pos, lay))
        for i, attn in enumerate(beam.edge_attns):
            link = links.setdefault((ids[i + 1], ids[i]),
                                    SankeyLink(ids[i + 1], ids[i], 0.0, layer=beam.layers[i]))
            link.value += weight * attn
            if b not in link.beam_indices:
                link.beam_indices.append(b)
            if beam.heads[i] not in link.heads:
                link.heads.append(beam.heads[i])
    ordered = sorted(nodes.values(), key=lambda n: (-n.layer, n.position))
    return SankeyData(nodes=ordered, links=list(links.values()))


def path_text(beam: BeamPath) -> str:
    """Earliest token first, as reverse-attention prints it; edges carry layer/head when the
    trace spans layers or heads: ``a -[L0.H3 0.38]-> b (score: -0.97)``."""
    shown = [_show(t) for t in beam.tokens]
    plain = len(set(beam.layers)) <= 1 and all(h is None for h in beam.heads)
    if plain:
        text = " -> ".join(reversed(shown))
    else:
        text = shown[-1]
        for i in reversed(range(beam.num_edges)):
            head = "" if beam.heads[i] is None else f".H{beam.heads[i]}"
            text += f" -[L{beam.layers[i]}{head} {beam.edge_attns[i]:.2f}]-> {shown[i]}"
    return f"{text} (score: {beam.score_norm:.4f})"


def _show(token: str) -> str:
    token = token.replace("\n", "\\n").replace("\t", "\\t")
    return f'"{token}"' if " " in token or token == "" else token
