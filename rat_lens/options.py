"""How a trace searches: one frozen, validated :class:`TraceOptions`, defined once.

Every entry point (``rat_lens.trace``, ``ReverseAttentionTracer.trace`` / ``trace_batch``,
``trace_attention``, the CLI) builds one from its keyword arguments and hands it to the beam
search; the defaults below are the only place they are written. Nothing here imports torch.

Examples:
    >>> TraceOptions(layers=(0, 11), agg_heads="none").chain
    False
    >>> TraceOptions(top_k=0)
    Traceback (most recent call last):
    ...
    rat_lens.errors.RatLensError: top_k must be >= 1, got 0
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Optional

from .errors import RatLensError, check_bool, check_choice, check_int, check_number, resolve_index

__all__ = [
    "TraceOptions",
    "AGG_HEADS",
    "AUTO_EDGE_WEIGHT",
    "LENGTH_NORMS",
    "RESIDUALS",
    "SEARCH_BUDGET",
    "PATTERN_BUDGET",
    "length_norm_denominator",
]

AGG_HEADS = ("mean", "max", "none")
# A search expands at most top_beam × top_k candidates per step: above this many in all it is
# refused before any work (a few seconds of CPU; reverse-attention took 34 s and 3.3 GB for
# top_beam=10**6 on 32 tokens). Raise it with ``rat_lens.options.SEARCH_BUDGET = n``.
SEARCH_BUDGET = 20_000_000
# Beams one page draws, over all its results (a beam costs ~1.4 ms to lay out and ~250 bytes of
# page; 200,000 took 4 min 44 s and 49 MB). Raise it with ``rat_lens.options.PAGE_BEAM_BUDGET``.
PAGE_BEAM_BUDGET = 5_000
# Bytes of dense float32 attention a trace may keep (per-head patterns, and the head-means its
# rollout reads). Over it a per-head trace keeps each row's strongest keys instead (the tracer's
# store="auto"), and has no rollout if the head-means are over it too. 1 GiB: a 12 x 12 trace of
# 1,024 tokens stays dense, of 2,048 not. Raise it with ``rat_lens.options.PATTERN_BUDGET = n``.
PATTERN_BUDGET = 2**30
LENGTH_NORMS = ("none", "avg_logprob", "sqrt", "pow:<alpha>")
RESIDUALS = ("none", "rollout")
EDGE_WEIGHTS = ("attention", "value_norm", "contribution")
# What per-head layers traces weigh edges by unless told: the winner of the comparison in
# docs/concepts.md (SmolLM2 at full depth: induction circuits and verify against random paths).
AUTO_EDGE_WEIGHT = "value_norm"


@dataclass(frozen=True)
class TraceOptions:
    """The beam search's options, checked once when built.

    Attributes:
        layer: chain mode: the one layer whose attention every step reads (``-1``: last).
        layers: ``(lo, hi)``: layers mode, one edge per layer from ``hi`` down to ``lo``
            (Python-style indices). Give ``layer`` or ``layers``, not both.
        top_beam: beams kept after every step (and returned).
        top_k: candidates (head, key) each beam expands to per step.
        min_attn: candidates below this weight are dropped.
        agg_heads: ``"mean"`` / ``"max"`` over heads, or ``"none"``: per-head edges.
        length_norm: how a path's score is normalised: ``"none"``, ``"avg_logprob"``
            (÷ edges), ``"sqrt"`` (÷ √edges) or ``"pow:α"`` (÷ edges^α). ``None`` (the
            default): ``"avg_logprob"`` for attention edges (reverse-attention's), ``"none"``
            for contribution edges, whose routes are scored by ``move_threshold`` and
            ``depth_discount`` instead.
        stop_at_bos: a beam ends when it reaches a BOS position (position 0 always ends it).
        residual: ``"rollout"`` (layers mode) adds the residual stream, 0.5·A + 0.5·I.
        exclude_bos: leave BOS / position 0 out of the candidates (attention sinks).
        edge_weight: what an edge weighs: ``"attention"`` (the pattern, reverse-attention's), or
            what the head wrote, as a share of the block's output at the query:
            ``"contribution"`` (proximity, Ferrando & Voita 2024) or ``"value_norm"``
            (Kobayashi et al. 2020). ``None`` (the default): ``"value_norm"`` for per-head
            layers traces (``layers=...``, ``agg_heads="none"``, no rollout), else
            ``"attention"``. The two need layers mode and ``agg_heads="none"``, and
            add stays: a path may keep its position (the residual stream, with every head's
            read of that same position), free in the score (docs/concepts.md).
        move_threshold: contribution edges only: a move scores ``log(share / move_threshold)``,
            so moves stronger than this lengthen a route's lead and weaker ones cost.
        depth_discount: contribution edges only: the ``i``-th move of a route counts
            ``depth_discount ** (i - 1)``: the first move out of the target weighs most, deeper
            moves reach the target only through the ones before them.
    """

    layer: int = -1
    layers: Optional[Sequence[int]] = None  # (lo, hi); kept as a tuple
    top_beam: int = 5
    top_k: int = 5
    min_attn: float = 0.0
    agg_heads: str = "mean"
    length_norm: Optional[str] = None  # resolved by edge_weight (see above)
    stop_at_bos: bool = True
    residual: Optional[str] = "none"  # None reads as "none"
    exclude_bos: bool = False
    edge_weight: Optional[str] = None  # resolved by the mode (see above)
    move_threshold: float = 0.04
    depth_discount: float = 0.5

    def __post_init__(self):
        if isinstance(self.layer, bool) or not isinstance(self.layer, int):
            raise RatLensError(f"layer must be an int, got {self.layer!r}")
        if self.layers is not None:
            if not (
                isinstance(self.layers, (tuple, list))
                and len(self.layers) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) for x in self.layers)
            ):
                raise RatLensError(
                    f"layers={self.layers!r} must be a pair (lo, hi) of layer indices, e.g. (0, 11)"
                )
            if self.layer != -1:
                raise RatLensError(
                    f"give either layer={self.layer} (chain mode) or "
                    f"layers={tuple(self.layers)} (layers mode), not both"
                )
            object.__setattr__(self, "layers", tuple(self.layers))
        check_int("top_beam", self.top_beam)
        check_int("top_k", self.top_k)
        if (
            isinstance(self.min_attn, bool)
            or not isinstance(self.min_attn, (int, float))
            or self.min_attn != self.min_attn
        ):
            raise RatLensError(f"min_attn must be a number, got {self.min_attn!r}")
        check_choice("agg_heads", self.agg_heads, AGG_HEADS)
        check_bool("stop_at_bos", self.stop_at_bos)
        check_bool("exclude_bos", self.exclude_bos)
        residual = "none" if self.residual is None else self.residual
        check_choice("residual", residual, RESIDUALS)
        if self.chain and residual != "none":
            raise RatLensError(
                f"residual={residual!r} needs layers mode (layers=(lo, hi)): a "
                "chain stays in one layer"
            )
        object.__setattr__(self, "residual", residual)
        # which of the two were left to the mode (a trace may fall back: attention_fallback)
        auto = frozenset(n for n in ("edge_weight", "length_norm") if getattr(self, n) is None)
        object.__setattr__(self, "_auto", auto)
        if self.edge_weight is None:  # per-head layers traces find circuits by what heads wrote
            per_head_layers = not self.chain and self.per_head and residual == "none"
            object.__setattr__(
                self, "edge_weight", AUTO_EDGE_WEIGHT if per_head_layers else "attention"
            )
        check_choice("edge_weight", self.edge_weight, EDGE_WEIGHTS)
        if self.length_norm is None:
            auto = "avg_logprob" if self.edge_weight == "attention" else "none"
            object.__setattr__(self, "length_norm", auto)
        check_length_norm(self.length_norm)
        for name in ("move_threshold", "depth_discount"):
            value = check_number(name, getattr(self, name))
            if not 0 < value <= 1:
                raise RatLensError(f"{name} must be in (0, 1], got {value!r}")
        if self.edge_weight == "attention" and (
            self.move_threshold != TraceOptions.move_threshold
            or self.depth_discount != TraceOptions.depth_discount
        ):
            raise RatLensError(
                f"move_threshold={self.move_threshold!r} and depth_discount="
                f"{self.depth_discount!r} score contribution routes: they need "
                "edge_weight='contribution' or 'value_norm', got edge_weight='attention'"
            )
        if self.edge_weight != "attention" and (
            self.chain or self.agg_heads != "none" or residual != "none"
        ):
            raise RatLensError(
                f"edge_weight={self.edge_weight!r} needs layers mode (layers=(lo, hi)), "
                f"agg_heads='none' and residual='none' (the residual stream is an edge of "
                f"its own), got layers={self.layers}, agg_heads={self.agg_heads!r}, "
                f"residual={residual!r}"
            )

    @property
    def chain(self) -> bool:
        """Chain mode (one layer, reverse-attention's semantics) rather than layers mode."""
        return self.layers is None

    @property
    def per_head(self) -> bool:
        return self.agg_heads == "none"

    @property
    def stays(self) -> bool:
        """Whether edges include residual stays (contribution-weighted traces)."""
        return self.edge_weight != "attention"

    @property
    def auto_edge_weight(self) -> bool:
        """Whether ``edge_weight`` was left to the mode (not given)."""
        return "edge_weight" in self._auto

    def attention_fallback(self) -> "TraceOptions":
        """These options with attention edges, as if ``edge_weight="attention"`` had been given
        (``length_norm`` follows unless it was given too): what a per-head layers trace uses
        where the default contribution edges cannot run (a ``cache=``, query chunks, more
        shares than ``PATTERN_BUDGET``).

        Examples:
            >>> auto = TraceOptions(layers=(0, 1), agg_heads="none")
            >>> auto.edge_weight, auto.attention_fallback().edge_weight
            ('value_norm', 'attention')
            >>> auto.attention_fallback().length_norm
            'avg_logprob'
        """
        return replace(
            self,
            edge_weight="attention",
            length_norm=None if "length_norm" in self._auto else self.length_norm,
            move_threshold=TraceOptions.move_threshold,
            depth_discount=TraceOptions.depth_discount,
        )

    def layer_ids(self, n_layers: int) -> list[int]:
        """The layers a path reads, top first: ``[layer]`` in chain mode, else hi..lo.

        Examples:
            >>> TraceOptions(layers=(-3, -1)).layer_ids(12)
            [11, 10, 9]
        """
        if self.chain:
            return [resolve_index("layer", self.layer, n_layers, "n_layers")]
        lo = resolve_index("layers[0]", self.layers[0], n_layers, "n_layers")
        hi = resolve_index("layers[1]", self.layers[1], n_layers, "n_layers")
        if lo > hi:
            raise RatLensError(f"layers={self.layers} is empty: lo={lo} > hi={hi}")
        return list(range(hi, lo - 1, -1))

    def check_budget(self, n_steps: int) -> None:
        """Refuse a search that could expand more than ``SEARCH_BUDGET`` candidates.

        Examples:
            >>> TraceOptions(top_beam=10**6).check_budget(31)
            Traceback (most recent call last):
            ...
            rat_lens.errors.RatLensError: top_beam=1000000 × top_k=5 × 31 steps = 155,000,000 ...
        """
        work = self.top_beam * self.top_k * max(n_steps, 1)
        if work > SEARCH_BUDGET:
            raise RatLensError(
                f"top_beam={self.top_beam} × top_k={self.top_k} × {n_steps} steps = {work:,} "
                f"candidate expansions, over the search budget of {SEARCH_BUDGET:,}: lower "
                f"top_beam or top_k, or raise rat_lens.options.SEARCH_BUDGET if you mean it"
            )

    def to_dict(self) -> dict:
        """Plain JSON types (``layers`` as a list): ``TraceOptions(**d)`` reads it back."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["layers"] = None if self.layers is None else list(self.layers)
        return data


def check_length_norm(length_norm) -> str:
    """``length_norm`` if it is ``none``, ``avg_logprob``, ``sqrt`` or ``pow:α`` (finite α)."""
    if isinstance(length_norm, str) and length_norm.startswith("pow:"):
        parse_pow(length_norm)
        return length_norm
    return check_choice("length_norm", length_norm, LENGTH_NORMS)


def parse_pow(length_norm: str) -> float:
    try:
        alpha = float(length_norm[len("pow:") :])
    except ValueError:
        alpha = math.nan
    if not math.isfinite(alpha):
        raise RatLensError(
            f"length_norm={length_norm!r} is malformed: expected 'pow:<alpha>' with a finite "
            "number, e.g. 'pow:0.7'"
        )
    return alpha


def length_norm_denominator(length_norm: str, n_edges: int) -> float:
    """What a path's summed log-attention is divided by, as reverse-attention computes it.

    Python floats on purpose: the score order must match the peer's bit for bit.

    Examples:
        >>> [length_norm_denominator(m, 4) for m in ("none", "avg_logprob", "sqrt", "pow:0.5")]
        [1.0, 4.0, 2.0, 2.0]
    """
    if n_edges == 0 or length_norm == "none":
        return 1.0
    if length_norm == "avg_logprob":
        return float(n_edges)
    if length_norm == "sqrt":
        return math.sqrt(n_edges)
    return n_edges ** parse_pow(length_norm)
