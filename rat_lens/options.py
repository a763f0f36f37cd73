"""How a trace searches and runs, each said once: :class:`TraceOptions` (the beam search) and
:class:`TraceInputs` (what a run reads besides the prompt).

Every entry point (``rat_lens.trace``, ``Tracer.trace`` / ``trace_batch``, ``trace_attention``,
``census``, the CLI) takes ``options=TraceOptions(...)`` plus keyword overrides, checked here
against the fields (:func:`merge_keywords`); the CLI builds its flags from the fields' metadata.
Fields left ``None`` stay ``None`` (so ``TraceOptions(**o.to_dict())`` is ``o``) until
:meth:`TraceOptions.resolve` fills them for one trace. Nothing here imports torch.

Examples:
    >>> TraceOptions().chain, TraceOptions(layer=3).chain   # full depth per head, or a chain
    (False, True)
    >>> TraceOptions(top_k=0)
    Traceback (most recent call last):
    ...
    rat_lens.errors.RatLensError: top_k must be >= 1, got 0
"""

import difflib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Optional, Union

from .errors import (
    RatLensError,
    check_bool,
    check_choice,
    check_int,
    check_number,
    checked_call,
    resolve_index,
)

__all__ = [
    "TraceOptions",
    "TraceInputs",
    "merge_keywords",
    "AGG_HEADS",
    "AUTO_EDGE_WEIGHT",
    "EDGE_WEIGHTS",
    "LENGTH_NORMS",
    "RESIDUALS",
    "STORES",
    "SEARCH_BUDGET",
    "PATTERN_BUDGET",
    "length_norm_denominator",
    "parse_layers",
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
STORES = ("auto", "dense", "bounded")
# What per-head layers traces weigh edges by unless told: the winner of the comparison in
# docs/concepts.md (SmolLM2 at full depth: induction circuits and verify against random paths).
AUTO_EDGE_WEIGHT = "value_norm"
# The model's top next tokens a trace records at its traced positions unless told (the page
# shows them on the target node).
DEFAULT_PREDICTIONS = 3


def parse_layers(text: str) -> tuple[int, int]:
    """``"LO:HI"`` as ``(lo, hi)`` (the CLI's ``--layers``); negative counts from the last.

    Examples:
        >>> parse_layers("0:-1")
        (0, -1)
    """
    try:
        lo, hi = (int(part) for part in text.split(":"))
    except ValueError:
        raise RatLensError(f"layers {text!r} is not LO:HI, e.g. 0:11") from None
    return lo, hi


def _option(default, help: str, **cli):
    """A field with its help text and CLI spelling (``flag``, ``parse``, ``choices``,
    ``metavar``, ``const``: a flag that stores ``const``), read by the CLI's parser."""
    return field(default=default, metadata={"help": help, **cli})


@checked_call
@dataclass(frozen=True)
class TraceOptions:
    """The beam search's options, checked once when built; ``None`` = decided by the mode
    (:meth:`resolve`).

    Attributes:
        layer: chain mode: the one layer whose attention every step reads (``-1``: last).
        layers: ``(lo, hi)``: layers mode, one edge per layer from ``hi`` down to ``lo``
            (Python-style indices). Give ``layer`` or ``layers``, not both; with neither (the
            default) a trace runs layers mode at full depth, ``(0, -1)``.
        top_beam: beams kept after every step (and returned).
        top_k: candidates (head, key) each beam expands to per step.
        min_attn: candidates below this weight are dropped.
        agg_heads: ``"mean"`` / ``"max"`` over heads, or ``"none"``: per-head edges.
            ``None`` (the default): per-head edges in layers mode, the mean in chain mode
            (reverse-attention's).
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

    layer: Optional[int] = _option(
        None, "chain mode in this layer (-1: the last)", group="mode", parse=int
    )
    layers: Optional[Sequence[int]] = _option(
        None, "layers mode: one edge per layer from HI down to LO", group="mode",
        parse=parse_layers, metavar="LO:HI",
    )  # fmt: skip
    top_beam: int = _option(5, "beams kept")
    top_k: int = _option(5, "candidates per step")
    min_attn: float = _option(0.0, "minimum edge weight")
    agg_heads: Optional[str] = _option(
        None, "how heads combine; none = per-head edges (default: none in layers mode, mean "
        "in chain mode)", choices=AGG_HEADS,
    )  # fmt: skip
    length_norm: Optional[str] = _option(
        None, "none, avg_logprob, sqrt or pow:ALPHA (default: avg_logprob for attention edges, "
        "none for contribution edges)",
    )  # fmt: skip
    stop_at_bos: bool = _option(
        True, "walk on past BOS tokens", flag="--no-stop-at-bos", const=False
    )
    residual: Optional[str] = _option(
        "none", "rollout: 0.5*A + 0.5*I, needs --layers", choices=RESIDUALS
    )
    exclude_bos: bool = _option(
        False, "leave BOS / position 0 (attention sinks) out of the candidates", const=True
    )
    edge_weight: Optional[str] = _option(
        None, "attention, or what each head wrote: contribution / value_norm (need --layers "
        "and --agg-heads none; paths may keep their position). Default: value_norm with "
        "--layers and --agg-heads none, else attention", choices=EDGE_WEIGHTS,
    )  # fmt: skip
    move_threshold: float = _option(
        0.04, "contribution edges: a move scores log(share / SHARE)", metavar="SHARE"
    )
    depth_discount: float = _option(
        0.5, "contribution edges: the i-th move of a route counts G**(i-1)", metavar="G"
    )

    def __post_init__(self):
        self._check_mode()
        check_int("top_beam", self.top_beam)
        check_int("top_k", self.top_k)
        if (
            isinstance(self.min_attn, bool)
            or not isinstance(self.min_attn, (int, float))
            or self.min_attn != self.min_attn
        ):
            raise RatLensError(f"min_attn must be a number, got {self.min_attn!r}")
        if self.agg_heads is not None:
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
        if self.edge_weight is not None:
            check_choice("edge_weight", self.edge_weight, EDGE_WEIGHTS)
        if self.length_norm is not None:
            check_length_norm(self.length_norm)
        for name in ("move_threshold", "depth_discount"):
            value = check_number(name, getattr(self, name))
            if not 0 < value <= 1:
                raise RatLensError(f"{name} must be in (0, 1], got {value!r}")
        self.resolve()  # what the mode decides must make sense with what was given

    def _check_mode(self) -> None:
        if self.layer is not None and (
            isinstance(self.layer, bool) or not isinstance(self.layer, int)
        ):
            raise RatLensError(f"layer must be an int, got {self.layer!r}")
        if self.layers is None:
            return
        if not (
            isinstance(self.layers, (tuple, list))
            and len(self.layers) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in self.layers)
        ):
            raise RatLensError(
                f"layers={self.layers!r} must be a pair (lo, hi) of layer indices, e.g. (0, 11)"
            )
        if self.layer is not None:
            raise RatLensError(
                f"give either layer={self.layer} (chain mode) or "
                f"layers={tuple(self.layers)} (layers mode), not both"
            )
        object.__setattr__(self, "layers", tuple(self.layers))

    @property
    def chain(self) -> bool:
        """Chain mode (one layer, reverse-attention's semantics): ``layer`` given."""
        return self.layer is not None

    @property
    def per_head(self) -> bool:
        """Per-head edges, ``agg_heads`` as resolved."""
        return (self.agg_heads or ("mean" if self.chain else "none")) == "none"

    @property
    def stays(self) -> bool:
        """Whether edges include residual stays (contribution-weighted traces); ``edge_weight``
        as resolved."""
        return self.resolve().edge_weight != "attention"

    @property
    def auto_edge_weight(self) -> bool:
        """Whether ``edge_weight`` is left to the mode (not given)."""
        return self.edge_weight is None

    def resolve(self) -> "TraceOptions":
        """These options with every ``None`` decided, as one trace runs them: ``agg_heads`` by
        the mode (per head in layers mode, the mean in a chain); ``edge_weight`` by the mode
        (``AUTO_EDGE_WEIGHT`` for per-head layers traces, else attention), then
        ``length_norm`` by the edge weight.

        Examples:
            >>> auto = TraceOptions()
            >>> auto.resolve().agg_heads, auto.resolve().edge_weight, auto.resolve().length_norm
            ('none', 'value_norm', 'none')
            >>> chain = TraceOptions(layer=-1).resolve()
            >>> chain.agg_heads, chain.edge_weight, chain.length_norm
            ('mean', 'attention', 'avg_logprob')
        """
        agg_heads = self.agg_heads or ("mean" if self.chain else "none")
        edge_weight = self.edge_weight
        if edge_weight is None:
            by_mode = not self.chain and self.per_head and self.residual == "none"
            edge_weight = AUTO_EDGE_WEIGHT if by_mode else "attention"
        length_norm = self.length_norm
        if length_norm is None:
            length_norm = "avg_logprob" if edge_weight == "attention" else "none"
        self._check_edge_weight(edge_weight)
        resolved = dict(edge_weight=edge_weight, length_norm=length_norm, agg_heads=agg_heads)
        if all(getattr(self, name) == value for name, value in resolved.items()):
            return self
        return replace(self, **resolved)

    def _check_edge_weight(self, edge_weight: str) -> None:
        defaults = (_DEFAULTS["move_threshold"], _DEFAULTS["depth_discount"])
        if edge_weight == "attention" and (self.move_threshold, self.depth_discount) != defaults:
            raise RatLensError(
                f"move_threshold={self.move_threshold!r} and depth_discount="
                f"{self.depth_discount!r} score contribution routes: they need "
                f"edge_weight='contribution' or 'value_norm', got edge_weight='attention'"
            )
        if edge_weight != "attention" and (
            self.chain or not self.per_head or self.residual != "none"
        ):
            raise RatLensError(
                f"edge_weight={edge_weight!r} needs layers mode (layers=(lo, hi)), "
                f"agg_heads='none' and residual='none' (the residual stream is an edge of "
                f"its own), got layers={self.layers}, agg_heads={self.agg_heads!r}, "
                f"residual={self.residual!r}"
            )

    def layer_ids(self, n_layers: int) -> list[int]:
        """The layers a path reads, top first: ``[layer]`` in chain mode, else hi..lo.

        Examples:
            >>> TraceOptions(layers=(-3, -1)).layer_ids(12)
            [11, 10, 9]
        """
        if self.chain:
            return [resolve_index("layer", self.layer, n_layers, "n_layers")]
        lo, hi = self.layers or (0, -1)
        lo = resolve_index("layers[0]", lo, n_layers, "n_layers")
        hi = resolve_index("layers[1]", hi, n_layers, "n_layers")
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
        """Plain JSON types (``layers`` as a list), unresolved fields ``None``:
        ``TraceOptions(**d)`` traces exactly as these options do."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["layers"] = None if self.layers is None else list(self.layers)
        return data


_DEFAULTS = {f.name: f.default for f in fields(TraceOptions)}
QueryChunk = Union[int, str, None]


@dataclass(frozen=True)
class TraceInputs:
    """What a run reads besides the prompt and the search options.

    Attributes:
        cache: a ``run_with_cache`` cache of these tokens: the trace reads its patterns and
            runs no forward.
        predictions: record the model's top-k next tokens at every traced position (runs the
            whole forward); ``None`` (the default): ``DEFAULT_PREDICTIONS`` where a forward
            runs, none from a ``cache=`` (which holds no logits); ``0``: none.
        query_chunk: ``N`` runs the forward N positions at a time over the model's KV cache
            (long contexts; unpadded prompts; same patterns); ``"auto"`` does so for unpadded
            prompts over 512 tokens where a probe shows it exact; ``None``: one forward.
        store: what a per-head trace keeps of the attention: ``"dense"`` every head's whole
            pattern; ``"bounded"`` per (layer, head, query) row its strongest keys, the
            diagonal and the BOS columns (memory ∝ seq·heads; same beams); ``"auto"``: bounded
            when the dense patterns would exceed ``PATTERN_BUDGET``.
        bos_token_id: marks BOS positions (default: the tokenizer's).
        target_token: the token each target is explained as (text that is one token, or an
            id; default: the model's top prediction there): lens ranks and writes' ``dla``.
        foil_token: explain ``target_token`` against this one: writes' ``dla_diff`` and the
            first move's score read ``logit(target) - logit(foil)`` (``rat_lens.lens``).
        explain: the logit lens at visited nodes and head moves' writes, kept in the trace's
            own forward (``rat_lens.lens``; it then runs to the logits and holds
            ``[batch, seq, d_model]`` per traced layer); ``None``: on when ``target_token`` or
            ``foil_token`` is given.
        progress: a forward that runs more than a few seconds shows its layers done, rate and
            ETA on stderr (rich; terminals only); False: never.
    """

    cache: Any = None
    predictions: Optional[int] = None
    query_chunk: QueryChunk = "auto"
    store: str = "auto"
    bos_token_id: Optional[int] = None
    target_token: Union[str, int, None] = None
    foil_token: Union[str, int, None] = None
    explain: Optional[bool] = None
    progress: bool = True

    def __post_init__(self):
        if self.predictions is not None:
            check_int("predictions", self.predictions, minimum=0)
        check_choice("store", self.store, STORES)
        if isinstance(self.query_chunk, str) and self.query_chunk != "auto":
            raise RatLensError(
                f"query_chunk must be an int, 'auto' or None, got {self.query_chunk!r}"
            )
        if isinstance(self.query_chunk, int) or (
            self.query_chunk is not None and not isinstance(self.query_chunk, str)
        ):
            check_int("query_chunk", self.query_chunk)
        if self.bos_token_id is not None:
            check_int("bos_token_id", self.bos_token_id, minimum=0)
        check_bool("progress", self.progress)
        if self.predictions and self.cache is not None:
            raise RatLensError(
                "predictions need the model's logits, which a cache does not "
                "hold: trace without cache=, or pass logits to summarize()"
            )
        if isinstance(self.query_chunk, int) and self.cache is not None:
            raise RatLensError(
                "query_chunk splits the forward, and a trace from cache= runs "
                "none: give one or the other"
            )
        self._check_explain()

    def _check_explain(self) -> None:
        for name in ("target_token", "foil_token"):
            value = getattr(self, name)
            is_id = isinstance(value, int) and not isinstance(value, bool) and value >= 0
            if value is not None and not isinstance(value, str) and not is_id:
                raise RatLensError(
                    f"{name} must be text that is one token or a token id >= 0, got {value!r}"
                )
        if self.explain is not None:
            check_bool("explain", self.explain)
        tokens = self.target_token is not None or self.foil_token is not None
        if tokens and self.explain is False:
            raise RatLensError(
                "target_token / foil_token are explained by the lens and the writes: "
                "drop explain=False"
            )
        if (tokens or self.explain) and self.cache is not None:
            raise RatLensError(
                "explain (and target_token / foil_token) runs one forward, and a trace from "
                "cache= runs none: give one or the other"
            )


OPTION_NAMES = tuple(f.name for f in fields(TraceOptions))
INPUT_NAMES = tuple(f.name for f in fields(TraceInputs))


def merge_keywords(
    options: Optional[TraceOptions], keywords: dict, where: str, inputs: bool = True
) -> Union[TraceOptions, tuple[TraceOptions, TraceInputs]]:
    """The options an entry point was given: ``options`` (default ``TraceOptions()``) with the
    keywords that name its fields put over it, and (with ``inputs``) a :class:`TraceInputs`
    of the others. A keyword that is neither is one error, with the closest name.

    Examples:
        >>> merge_keywords(TraceOptions(top_k=3), {"top_beam": 2}, "trace", inputs=False)
        TraceOptions(layer=None, layers=None, top_beam=2, top_k=3, ...)
        >>> merge_keywords(None, {"topbeam": 3}, "trace")
        Traceback (most recent call last):
        ...
        rat_lens.errors.RatLensError: trace() got an unknown keyword 'topbeam' (did you mean ...
    """
    known = OPTION_NAMES + (INPUT_NAMES if inputs else ())
    for name in keywords:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RatLensError(
                f"{where}() got an unknown keyword {name!r}{hint}; it takes options= and "
                f"these keywords: {', '.join(known)}"
            )
    if options is not None and not isinstance(options, TraceOptions):
        raise RatLensError(f"options must be a TraceOptions, got {type(options).__name__}")
    given = {k: v for k, v in keywords.items() if k in OPTION_NAMES}
    if "layers" in given and "layer" not in given:  # a mode given replaces the other one
        given["layer"] = None
    elif "layer" in given and "layers" not in given:
        given["layers"] = None
    merged = replace(options, **given) if options is not None else TraceOptions(**given)
    if not inputs:
        return merged
    return merged, TraceInputs(**{k: v for k, v in keywords.items() if k in INPUT_NAMES})


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
