"""The Sankey graph of a trace: (layer, position) nodes, key -> query links, built from beams.

Plain data and one rule (reverse-attention's): a link weighs, over the beams that use it,
softmax(score_norm) × the edge's weight. Beams are read by their fields alone (positions,
layers, heads, edge weights, score_norm), so this module imports nothing of rat_lens and the
result types, the tracer and the page all build the graph the same way.
"""

import math
from dataclasses import dataclass, field
from typing import Optional

__all__ = [
    "SankeyData",
    "SankeyNode",
    "SankeyLink",
    "node_id",
    "node_layers",
    "beam_weights",
    "build_sankey",
]


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


def node_id(layer: int, position: int) -> str:
    """The id of a Sankey node, the one place it is made: ``node_id(1, 7) == "L1_P7"``."""
    return f"L{layer}_P{position}"


def node_layers(beam, mode: str, layer: int) -> list[int]:
    """The layer of each node: in chain mode all sit in ``layer``; in layers mode the target sits
    in ``layer`` and an edge through layer ``l`` lands on the residual stream below, ``l - 1``."""
    if mode == "chain" or not beam.layers:
        return [layer] * len(beam.positions)
    return beam.layers + [beam.layers[-1] - 1]


def beam_weights(beams: list) -> list[float]:
    """softmax(score_norm) over beams: how much each beam counts in the Sankey link weights."""
    if not beams:
        return []
    top = max(b.score_norm for b in beams)
    exp = [math.exp(b.score_norm - top) for b in beams]
    return [e / sum(exp) for e in exp]


def build_sankey(beams: list, tokens: list[str], mode: str, layer: int) -> SankeyData:
    """Nodes are (layer, position); a link runs forward (key → query) and weighs
    Σ over the beams using it of softmax(score_norm) × the edge's weight (reverse-attention's
    rule, whose weights are attention; a share under share weights)."""
    nodes: dict[str, SankeyNode] = {}
    links: dict[tuple[str, str], SankeyLink] = {}
    for b, (beam, weight) in enumerate(zip(beams, beam_weights(beams))):
        ids = []
        for pos, lay in zip(beam.positions, node_layers(beam, mode, layer)):
            ids.append(node_id(lay, pos))
            nodes.setdefault(ids[-1], SankeyNode(ids[-1], tokens[pos], pos, lay))
        for i, edge_weight in enumerate(beam.edge_weights):
            link = links.setdefault(
                (ids[i + 1], ids[i]), SankeyLink(ids[i + 1], ids[i], 0.0, layer=beam.layers[i])
            )
            link.value += weight * edge_weight
            if b not in link.beam_indices:
                link.beam_indices.append(b)
            if beam.heads[i] not in link.heads:
                link.heads.append(beam.heads[i])
    ordered = sorted(nodes.values(), key=lambda n: (-n.layer, n.position))
    return SankeyData(nodes=ordered, links=list(links.values()))
