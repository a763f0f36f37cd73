"""reverse-attention's ``beam`` module: its beam state, its search's steps and the search.

:func:`beam_search_backward` and :func:`get_top_k_predecessors` run rat_lens's own search
(:func:`rat_lens.search.beam.beam_search`), which reproduces the peer's chain mode exactly,
ties included; the result types are rat_lens's (:mod:`rat_lens.result`), whose fields are the
peer's.

Examples:
    >>> import torch
    >>> A = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.2, 0.7, 0.1]])
    >>> [(s.positions, round(s.log_score, 3)) for s in beam_search_backward(A, 2, top_beam=2)]
    [([2, 1, 0], -0.462), ([2, 0], -1.609)]
    >>> get_top_k_predecessors(A, 2, 1, 0.0, None)
    [(1, 0.699999988079071)]
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

from jaxtyping import Float, Shaped
from torch import Tensor

from ..errors import RatLensError, check_int
from ..options import TraceOptions
from ..result import Beam, BeamPath, SankeyData, SankeyLink, SankeyNode, TraceResult
from ..search.beam import beam_search, with_attention
from ..search.pattern import check_pattern_values
from .utils import normalize_score, safe_log

__all__ = [
    "BeamState",
    "BeamPath",
    "SankeyNode",
    "SankeyLink",
    "SankeyData",
    "TraceResult",
    "get_top_k_predecessors",
    "extend_beam",
    "prune_beams",
    "beam_search_backward",
]


@dataclass
class BeamState:
    """A beam during the search: ``positions`` from the target back to the current position,
    one weight per edge, the summed log weight, and whether it has ended."""

    positions: list[int]
    edge_attns: list[float]
    log_score: float
    is_terminal: bool = False

    @property
    def current_pos(self) -> int:
        return self.positions[-1]

    @property
    def num_edges(self) -> int:
        return len(self.edge_attns)


def get_top_k_predecessors(
    attn: Float[Tensor, "query key"],
    query_pos: int,
    k: int,
    min_attn: float,
    attention_mask: Optional[Shaped[Tensor, " key"]],
) -> list[tuple[int, float]]:
    """The ``k`` strongest keys before ``query_pos`` (unmasked, ``>= min_attn``, positive) with
    their weights, strongest first, equal weights in the peer's order."""
    # One step of the search in which every earlier position ends a beam: the beams it returns
    # are the row's candidates, in the order the step took them (ranked by log weight, a stable
    # sort of an order that is already descending).
    options = _options(top_beam=k, top_k=k, min_attn=min_attn, length_norm="none")
    beams = search(attn, query_pos, options, range(query_pos), attention_mask)
    return [(beam.positions[1], beam.edge_weights[0]) for beam in beams if beam.num_edges]


def extend_beam(beam: BeamState, pred_pos: int, attn_weight: float) -> BeamState:
    """``beam`` one edge longer, to ``pred_pos`` with weight ``attn_weight`` (not ended)."""
    return BeamState(
        beam.positions + [pred_pos],
        beam.edge_attns + [attn_weight],
        beam.log_score + safe_log(attn_weight),
    )


def prune_beams(beams: list[BeamState], top_beam: int, length_norm: str) -> list[BeamState]:
    """The ``top_beam`` best beams by normalised score (equal scores keep their order); fewer
    beams than that come back as given."""
    if len(beams) <= top_beam:
        return beams
    ranked = sorted(
        beams, key=lambda b: normalize_score(b.log_score, b.num_edges, length_norm), reverse=True
    )
    return ranked[:top_beam]


def beam_search_backward(
    attn: Float[Tensor, "query key"],
    target_pos: int,
    top_beam: int = 5,
    top_k: int = 5,
    min_attn: float = 0.0,
    length_norm: str = "avg_logprob",
    stop_at_bos: bool = True,
    bos_positions: Optional[Sequence[int]] = None,
    attention_mask: Optional[Shaped[Tensor, " key"]] = None,
) -> list[BeamState]:
    """Beam search backward from ``target_pos`` through one attention matrix: the ended beams,
    best normalised score first (at most ``top_beam``)."""
    options = _options(
        top_beam=top_beam,
        top_k=top_k,
        min_attn=min_attn,
        length_norm=length_norm,
        stop_at_bos=stop_at_bos,
    )
    beams = search(attn, target_pos, options, bos_positions or (), attention_mask)
    # The peer's edge_attns are the weights its search used: attention, here in one matrix.
    return [BeamState(b.positions, b.edge_weights, b.score_raw, is_terminal=True) for b in beams]


def _options(**given) -> TraceOptions:
    """The search options of one ``[query, key]`` matrix (heads already aggregated): a chain,
    as the peer's functions search."""
    return TraceOptions(**{"layer": -1, **given}, edge_weight="attention").resolve()


def search(
    attn: Float[Tensor, "*head query key"],
    target_pos: int,
    options: TraceOptions,
    bos_positions: Sequence[int],
    attention_mask: Optional[Shaped[Tensor, " key"]],
    layer: int = 0,
) -> list[Beam]:
    """rat_lens's chain search in ``attn`` (``[query, key]``, or ``[head, query, key]`` for
    per-head edges), its edges recorded in ``layer``, their attention the weights. Any
    non-negative weights: the peer's functions take matrices whose rows need not sum to 1."""
    if not isinstance(attn, Tensor) or attn.ndim not in (2, 3) or attn.shape[-1] != attn.shape[-2]:
        shape = tuple(attn.shape) if isinstance(attn, Tensor) else type(attn).__name__
        raise RatLensError(f"attn must be a [query, key] tensor with query == key, got {shape}")
    check_pattern_values(attn, "attn")
    n = attn.shape[-1]
    check_int("target_pos", target_pos, 0)
    if target_pos >= n:
        raise RatLensError(f"target_pos={target_pos} out of range for sequence length {n}")
    if attention_mask is not None:
        attention_mask = attention_mask.reshape(-1)
    pattern = attn if attn.ndim == 3 else attn[None]
    beams = beam_search(
        [pattern],
        [layer],
        target_pos,
        options,
        bos_positions=[p for p in bos_positions if 0 <= p < n],
        attention_mask=attention_mask,
    )
    return with_attention(beams, [pattern], [layer])  # the weights are the attention here
