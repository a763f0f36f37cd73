"""What rat_lens returns: plain dataclasses with JSON round trips, at the bottom of the package.

A trace gives a :class:`TraceResult` (its :class:`BeamPath` beams, the :class:`SankeyData`
graph built from them, :class:`Prediction` records), a causal check gives a
:class:`Verification`, statistics and head roles come as a :class:`HeadTable`. Everything else
in rat_lens produces or reads these; this module imports neither torch nor TransformerLens
(``rat-lens render`` loads saved traces without them).

Field names follow reverse-attention 0.1.0 (``BeamPath.positions``, ``TraceResult.sankey``...),
so code written against it reads ours; the multi-layer and per-head modes add ``layers`` and
``heads`` per edge.
"""

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Union

from .errors import RatLensError
from .sankey import (
    SankeyData,
    SankeyLink,
    SankeyNode,
    beam_weights,
    build_sankey,
    node_id,
    node_layers,
)
from .schema import (
    FORMAT_VERSION,
    PEER_METADATA,
    check_trace,
    from_reverse_attention,
    is_reverse_attention_trace,
)
from .text import head_label, num, path_text, verification_text

__all__ = [
    "TraceResult",
    "Beam",
    "BeamPath",
    "Move",
    "Stay",
    "SankeyData",
    "SankeyNode",
    "SankeyLink",
    "Prediction",
    "LensRecord",
    "HeadWrite",
    "Verification",
    "BeamEffect",
    "PathEffect",
    "Faithfulness",
    "TokenImportance",
    "HeadTable",
    "JsonRoundTrip",
    "node_id",
    "node_layers",
    "beam_weights",
    "build_sankey",
    "path_text",
    "head_label",
    "NOISE",
    "check_result",
    "SAVED_CHARS_BUDGET",
    "SAVED_BEAM_BUDGET",
]

NOISE = 1e-5  # nats: causal effects below this are float noise, not effects
# Saved JSON is refused past these sizes before any object is built (a million beams, 410 MB,
# took 59 s to load): the text's length is checked before parsing, the beams' count before
# building. A 20,000-beam trace (8 MB) loads in about 3 s. Raise them with
# ``rat_lens.result.SAVED_CHARS_BUDGET = n`` / ``SAVED_BEAM_BUDGET = n`` if you mean it.
SAVED_CHARS_BUDGET = 64 * 2**20
SAVED_BEAM_BUDGET = 20_000


class JsonRoundTrip:
    """Mixin: ``to_json()`` and ``from_json()`` for a class with ``to_dict`` / ``from_dict``.

    ``to_json`` writes strict JSON (no NaN); ``from_json`` turns text that is not JSON (or
    nested too deeply to parse) into one RatLensError."""

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **{"allow_nan": False, **kwargs})

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(parse_json(text, cls.__name__))


def parse_json(text, what: str = "JSON"):
    """``json.loads`` with every failure as one RatLensError (NaN/Infinity are not JSON)."""
    if isinstance(text, (bytes, bytearray)):
        text = text.decode("utf-8", errors="replace")
    if not isinstance(text, str):
        raise RatLensError(f"{what}: expected JSON text, got {type(text).__name__}")
    if len(text) > SAVED_CHARS_BUDGET:
        raise RatLensError(
            f"{what}: {len(text):,} characters, over the budget of {SAVED_CHARS_BUDGET:,}: "
            f"raise rat_lens.result.SAVED_CHARS_BUDGET if you mean it"
        )

    def no_constant(name):
        raise RatLensError(f"{what}: {name} is not a JSON number")

    try:
        return json.loads(text, parse_constant=no_constant)
    except json.JSONDecodeError as err:
        raise RatLensError(f"{what}: not valid JSON ({err})") from None
    except RecursionError:
        raise RatLensError(f"{what}: nested too deeply to be a saved trace") from None


@dataclass
class Beam:
    """One path backward from the target: ``positions[0]`` is the target, each edge steps back.

    Edge ``i`` goes from query ``positions[i]`` to key ``positions[i + 1]`` through layer
    ``layers[i]`` (and head ``heads[i]``; ``None`` when heads were aggregated). Two numbers
    describe it:

    - ``edge_weights[i]``: the weight the search used, the trace's ``edge_weight``: the
      attention weight itself (``"attention"``; half attention, half identity with
      ``residual="rollout"``), or the edge's share of what its layer wrote at the query
      (``"value_norm"`` / ``"contribution"``);
    - ``edge_attns[i]``: that head's attention weight from the query to the key (the heads'
      mean or max when they were aggregated), whatever the edge weight; ``None`` for a stay.
      Empty when not recorded (a beam straight from :func:`~rat_lens.search.beam_search`,
      before a trace assembles it, or a file saved before format 2 with share weights).

    ``bos_mass[i]`` is how much of that edge's row sat on BOS / position 0. ``kinds[i]`` is
    ``"head"`` or ``"residual"`` (a stay through the residual stream, head ``None``, in
    share-weighted layers traces); empty = every edge a head's.

    The score: with attention weights ``score_raw`` = Σ log ``edge_weights`` (each at least
    1e-12), reverse-attention's; with share weights a stay is free and the ``i``-th move adds
    ``depth_discount**(i-1) · log(weight / move_threshold)``, so a route of strong moves
    scores above 0 (:mod:`rat_lens.search.beam`). ``score_norm`` is ``score_raw`` over the
    trace's ``length_norm`` of the number of moves: beams are ranked by it.
    """

    positions: list[int]
    edge_weights: list[float]
    layers: list[int]
    heads: list[Optional[int]]
    bos_mass: list[float]
    score_raw: float
    score_norm: float
    kinds: list[str] = field(default_factory=list, kw_only=True)  # keeps BeamPath positional
    edge_attns: list[Optional[float]] = field(default_factory=list, kw_only=True)

    def is_residual(self, i: int) -> bool:
        return bool(self.kinds) and self.kinds[i] == "residual"

    @property
    def num_edges(self) -> int:
        return len(self.edge_weights)

    def route(self) -> list[Union["Move", "Stay"]]:
        """The path as a researcher reads it, target first: each head :class:`Move` in turn,
        each run of residual stays between them as one :class:`Stay`.

        Examples:
            >>> beam = Beam(positions=[9, 9, 9, 4, 3], edge_weights=[0.7, 0.6, 0.12, 0.3],
            ...             layers=[3, 2, 1, 0], heads=[None, None, 6, 2], bos_mass=[0.0] * 4,
            ...             score_raw=0.0, score_norm=0.0, kinds=["residual"] * 2 + ["head"] * 2)
            >>> beam.route()[0], beam.route()[1].key
            (Stay(position=9, top=3, bottom=2, edges=(0, 1)), 4)
        """
        steps: list[Union[Move, Stay]] = []
        for i in range(self.num_edges):
            query, layer = self.positions[i], self.layers[i]
            if not self.is_residual(i):
                key, weight = self.positions[i + 1], self.edge_weights[i]
                attention = self.edge_attns[i] if self.edge_attns else None
                steps.append(Move(i, layer, self.heads[i], query, key, weight, attention))
            elif steps and isinstance(steps[-1], Stay):  # the run goes on one layer lower
                steps[-1] = Stay(query, steps[-1].top, layer, steps[-1].edges + (i,))
            else:
                steps.append(Stay(query, layer, layer, (i,)))
        return steps

    def moves(self) -> list["Move"]:
        """The head moves of :meth:`route`, target first (every edge when there are no stays)."""
        return [step for step in self.route() if isinstance(step, Move)]


class Move(NamedTuple):
    """A head move: at ``layer`` the ``query`` position reads ``key`` through ``head`` (None:
    heads aggregated), with the edge ``weight`` the search used and the head's ``attention``
    (None where not recorded); ``edge`` indexes the beam's per-edge lists (``bos_mass``,
    ``kinds``...)."""

    edge: int
    layer: int
    head: Optional[int]
    query: int
    key: int
    weight: float
    attention: Optional[float] = None


class Stay(NamedTuple):
    """A run of residual stays: the route keeps ``position`` through layers ``top`` down to
    ``bottom``; ``edges`` index the beam's per-edge lists."""

    position: int
    top: int
    bottom: int
    edges: tuple[int, ...]


@dataclass(init=False)
class BeamPath(Beam):
    """A :class:`Beam` with the token text and ids at each of its positions.

    Built in reverse-attention 0.1.0's field order, positionally or by name:
    ``BeamPath(positions, tokens, token_ids, edge_attns, score_raw, score_norm)``. The peer's
    ``edge_attns`` are attention weights and the weights its search used, so a beam given only
    them has ``edge_weights`` equal to them; one given only ``edge_weights`` records no
    attention (``edge_attns`` empty). What the peer's beam does not
    carry comes by keyword (``edge_weights``, ``layers``, ``heads``, ``bos_mass``, ``kinds``)
    and is an empty list when not given: a beam built from the peer's six fields records no
    layer, head or BOS mass (``rat_lens.compat`` fills them where it needs them).

    Examples:
        >>> beam = BeamPath([2, 0], ["c", "a"], [7, 5], [0.9], -0.105, -0.105)
        >>> beam.tokens, beam.edge_attns, beam.edge_weights, beam.layers
        (['c', 'a'], [0.9], [0.9], [])
    """

    tokens: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)

    def __init__(
        self,
        positions: list[int],
        tokens: Optional[list[str]] = None,
        token_ids: Optional[list[int]] = None,
        edge_attns: Optional[list[Optional[float]]] = None,
        score_raw: Optional[float] = None,
        score_norm: Optional[float] = None,
        *,
        edge_weights: Optional[list[float]] = None,
        layers: Optional[list[int]] = None,
        heads: Optional[list[Optional[int]]] = None,
        bos_mass: Optional[list[float]] = None,
        kinds: Optional[list[str]] = None,
    ):
        # tokens and ids may be absent from a saved beam (its dict has no "tokens"); the edges
        # (edge_attns, the peer's name, or edge_weights) and scores never are, so they are
        # required as Python requires an argument.
        edges = edge_weights if edge_weights is not None else edge_attns
        given = {"edge_attns": edges, "score_raw": score_raw, "score_norm": score_norm}
        missing = [name for name, value in given.items() if value is None]
        if missing:
            raise TypeError(f"BeamPath() missing required argument(s): {', '.join(missing)}")
        self.positions, self.edge_weights = positions, edges
        self.edge_attns = [] if edge_attns is None else edge_attns
        self.score_raw, self.score_norm = score_raw, score_norm
        self.tokens = [] if tokens is None else tokens
        self.token_ids = [] if token_ids is None else token_ids
        self.layers = [] if layers is None else layers
        self.heads = [] if heads is None else heads
        self.bos_mass = [] if bos_mass is None else bos_mass
        self.kinds = [] if kinds is None else kinds

    @classmethod
    def from_beam(cls, beam: Beam, tokens: list[str], token_ids: list[int]) -> "BeamPath":
        return cls(
            **dataclasses.asdict(beam),
            tokens=[tokens[p] for p in beam.positions],
            token_ids=[token_ids[p] for p in beam.positions],
        )


@dataclass
class Prediction:
    """The model's top next tokens at a traced position."""

    position: int
    token: str
    token_ids: list[int]
    tokens: list[str]
    probs: list[float]


@dataclass
class LensRecord:
    """The logit lens at one node a beam visits: the residual stream at ``position`` after
    ``layer`` (``-1``: the embeddings) through the model's final norm and unembedding. ``tokens``
    / ``token_ids`` / ``probs`` are its top tokens; ``target_rank`` (0 = top) and
    ``target_prob`` are the trace's target token's there."""

    layer: int
    position: int
    tokens: list[str]
    token_ids: list[int]
    probs: list[float]
    target_rank: int
    target_prob: float


@dataclass
class HeadWrite:
    """What a head move wrote: head ``head`` of ``layer`` at the query ``position`` (reading
    ``key``), its output ``z · W_O`` through the final norm at that position (its scale held
    fixed) onto the unembedding: the direct logits. ``promoted`` / ``suppressed`` are the tokens
    with the largest and the most negative ones (``*_ids``, ``*_logits`` beside them); ``dla``
    is the direct logit of the target token, ``dla_diff`` of target minus foil (None: no foil)."""

    layer: int
    head: int
    position: int
    key: int
    promoted: list[str]
    promoted_ids: list[int]
    promoted_logits: list[float]
    suppressed: list[str]
    suppressed_ids: list[int]
    suppressed_logits: list[float]
    dla: float
    dla_diff: Optional[float] = None


@dataclass
class BlockWrite:
    """One block's write at a stayed position: layer ``layer``'s ``"attn"`` (all its heads and
    ``b_O``) or ``"mlp"``, with ``share``, its norm over the sum of the span's block norms."""

    layer: int
    block: str
    share: float


@dataclass
class StayWrite:
    """What was written at ``position`` while a route kept it through the residual stream,
    layers ``top`` down to ``bottom``: the blocks that wrote most there (``blocks``, strongest
    first, at most five), and the MLP layer of the span with the largest direct logit of the
    target (``mlp_layer``, ``mlp_dla``; of target minus foil with a foil: ``mlp_dla_diff``, which
    then picks it), through the final norm's scale at ``position``. No MLP (attention-only
    models): ``mlp_layer`` None."""

    position: int
    top: int
    bottom: int
    blocks: list[BlockWrite]
    mlp_layer: Optional[int] = None
    mlp_dla: Optional[float] = None
    mlp_dla_diff: Optional[float] = None

    @classmethod
    def from_dict(cls, data: dict) -> "StayWrite":
        return cls(**{**data, "blocks": [BlockWrite(**b) for b in data["blocks"]]})


@dataclass
class PathEffect:
    """One beam's effect on one metric, against random paths of the same shape.

    ``ratio`` = effect / mean |random effect| (None when that mean is below :data:`NOISE`,
    i.e. the random paths had no measurable effect: float32 log-probabilities carry ~1e-6);
    ``p_value`` = (1 + #random paths with effect >= this one) / (1 + #random paths), so it is
    never below 1 / (1 + #random paths): 19 random paths can reach 0.05, 99 reach 0.01.
    """

    effect: float
    baseline_mean: Optional[float] = None
    baseline_std: Optional[float] = None
    ratio: Optional[float] = None
    p_value: Optional[float] = None
    baseline: list[float] = field(default_factory=list)

    @classmethod
    def against(cls, effect: float, baseline: list[float]) -> "PathEffect":
        if not baseline:
            return cls(effect)
        n = len(baseline)
        mean = sum(baseline) / n
        std = math.sqrt(sum((b - mean) ** 2 for b in baseline) / (n - 1)) if n > 1 else 0.0
        scale = sum(abs(b) for b in baseline) / n
        ratio = effect / scale if scale >= NOISE else None
        p_value = (1 + sum(b >= effect for b in baseline)) / (1 + n)
        return cls(effect, mean, std, ratio, p_value, list(baseline))


@dataclass
class BeamEffect:
    """Ablating beam ``rank`` (1 = best): ``edges`` are ``[layer, head, query, key]`` (head None
    when heads were aggregated: every head's entry was ablated)."""

    rank: int
    edges: list[list[Optional[int]]]
    effect: PathEffect  # on the check's metric (Verification.metric)
    token_effect: Optional[PathEffect] = None  # on log p of the token asked for


@dataclass
class Faithfulness:
    """Keep the top ``percents`` of traced edges (by traced mass), ablate every other entry of
    the rows they leave from, in every head: ``faithfulness[i]`` = (m(kept) − m(empty)) /
    (m(full) − m(empty)), m = the check's metric (Hanna, Pezzelle & Belinkov 2024).
    ``area`` is under the curve over the kept fraction, from (0, 0) to (1, f(100%))."""

    percents: list[float]
    kept_edges: list[int]
    total_edges: int
    rows: int
    metric: list[float]
    full: float
    empty: float
    faithfulness: list[Optional[float]]
    area: Optional[float]


@dataclass
class TokenImportance:
    """Blank-out importance of each position (its drop in log p of the top prediction when its
    token is blanked) and its Spearman correlation with the trace's token importances."""

    positions: list[int]
    tokens: list[str]
    blank: str
    blank_effect: list[float]
    beam_mass: list[float]
    rollout: list[float] = field(default_factory=list)
    spearman: dict[str, Optional[float]] = field(default_factory=dict)


@dataclass
class Verification(JsonRoundTrip):
    """Causal checks of one trace (see :func:`rat_lens.verify`); ``to_json()`` /
    ``from_json()`` come from :class:`JsonRoundTrip`.

    ``metric`` is what every effect, baseline, the faithfulness curve and the blank-out
    importance measure: ``"logp"``, log p of the top prediction (``prediction_id``), or
    ``"logit_diff"``, logit(``token_id``) − logit(``foil_id``), whose clean value is
    ``logit_diff``. ``token_*`` is the token asked for (with a foil: the difference's token),
    whose log p each ``BeamEffect.token_effect`` measures; ``alpha`` the significance level
    asked for (``n_random`` can reach it). A check saved before these fields loads as
    ``"logp"``."""

    target_pos: int
    target_token: str
    prediction_id: int
    prediction: str
    prediction_logp: float
    ablation: str
    n_random: int
    seed: int
    beams: list[BeamEffect]
    faithfulness: Optional[Faithfulness] = None
    token_importance: Optional[TokenImportance] = None
    token_id: Optional[int] = None
    token: Optional[str] = None
    token_logp: Optional[float] = None
    metric: str = "logp"
    foil_id: Optional[int] = None
    foil: Optional[str] = None
    logit_diff: Optional[float] = None
    alpha: Optional[float] = None

    METRICS = ("logp", "logit_diff")

    def __repr__(self) -> str:
        best = f"{self.beams[0].effect.effect:.3f}" if self.beams else "-"
        ratio = self.beams[0].effect.ratio if self.beams else None
        area = self.faithfulness.area if self.faithfulness else None
        return (
            f"Verification(target_pos={self.target_pos}, prediction={self.prediction!r}, "
            f"ablation={self.ablation!r}, beams={len(self.beams)}, top_effect={best}, "
            f"top_ratio={num(ratio)}, faithfulness_area={num(area)})"
        )

    def to_text(self) -> str:
        """Plain text, every line under 100 columns."""
        return verification_text(self, markdown=False)

    def to_markdown(self) -> str:
        """The same as GitHub-flavoured markdown tables."""
        return verification_text(self, markdown=True)

    def __str__(self) -> str:
        return self.to_text()

    def _repr_markdown_(self) -> str:
        return self.to_markdown()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Verification":
        """A check from ``to_dict()`` output (new fields missing: a check saved before them);
        fields that are unknown, missing, or say no metric consistently raise RatLensError."""
        data = dict(data)
        cls._check_fields(data)
        data["beams"] = [
            BeamEffect(
                b["rank"],
                [list(e) for e in b["edges"]],
                PathEffect(**b["effect"]),
                None if b.get("token_effect") is None else PathEffect(**b["token_effect"]),
            )
            for b in data["beams"]
        ]
        if data.get("faithfulness") is not None:
            data["faithfulness"] = Faithfulness(**data["faithfulness"])
        if data.get("token_importance") is not None:
            data["token_importance"] = TokenImportance(**data["token_importance"])
        return cls(**data)

    @classmethod
    def _check_fields(cls, data: dict) -> None:
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(names))
        missing = [n for n, f in names.items() if f.default is dataclasses.MISSING]
        missing = [n for n in missing if n not in data]
        if unknown or missing:
            raise RatLensError(
                f"Verification: unknown fields {unknown}, missing fields {missing} "
                f"(fields: {', '.join(names)})"
            )
        metric = data.get("metric", "logp")
        if metric not in cls.METRICS:
            raise RatLensError(f"Verification: metric={metric!r} not in {cls.METRICS}")
        given = {n: data.get(n) for n in ("token_id", "foil_id", "logit_diff")}
        known = {n for n, value in given.items() if value is not None}
        # a logit difference names its two tokens and its value; log p names neither foil nor value
        if (known != set(given)) if metric == "logit_diff" else (known - {"token_id"}):
            raise RatLensError(
                f"Verification: metric={metric!r} with {given}: 'logit_diff' needs all three, "
                "'logp' neither foil_id nor logit_diff"
            )


@dataclass
class HeadTable:
    """Named values per (layer, head): ``scores[name][i][h]`` belongs to layer ``layers[i]``.

    Holds attention statistics or head-role scores as plain lists (JSON-ready). ``head`` is
    ``None`` when the values describe heads aggregated into one (``agg_heads="mean"``).

    Examples:
        >>> import torch
        >>> table = HeadTable.from_tensors([3], {"entropy": torch.tensor([[0.5, 1.5]])})
        >>> table.get("entropy", 3, 1), table.n_heads, HeadTable.from_dict(table.to_dict()) == table
        (1.5, 2, True)
    """

    layers: list[int]
    scores: dict[str, list[list[float]]] = field(default_factory=dict)
    aggregated: bool = False

    @classmethod
    def from_tensors(
        cls, layers: Sequence[int], scores: dict, aggregated: bool = False
    ) -> "HeadTable":
        """From ``[layer, head]`` tensors (anything with ``ndim``, ``shape`` and torch's
        ``detach().double().cpu().tolist()``: this module does not import torch)."""
        for name, value in scores.items():
            if value.ndim != 2 or value.shape[0] != len(layers):
                raise RatLensError(
                    f"scores[{name!r}] has shape {tuple(value.shape)}, expected "
                    f"[layer, head] with {len(layers)} layers"
                )
        return cls(
            [int(x) for x in layers],
            {name: value.detach().double().cpu().tolist() for name, value in scores.items()},
            aggregated,
        )

    @property
    def n_heads(self) -> int:
        return len(next(iter(self.scores.values()))[0]) if self.scores and self.layers else 0

    def get(self, name: str, layer: int, head: Optional[int]) -> Optional[float]:
        """The value for (layer, head), or None when the table does not hold it."""
        if name not in self.scores or layer not in self.layers:
            return None
        row = self.scores[name][self.layers.index(layer)]
        index = 0 if head is None and self.aggregated else head
        return row[index] if index is not None and 0 <= index < len(row) else None

    def to_dict(self) -> dict:
        return {
            "layers": list(self.layers),
            "scores": {k: [list(r) for r in v] for k, v in self.scores.items()},
            "aggregated": self.aggregated,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "HeadTable":
        scores = {name: [list(row) for row in rows] for name, rows in data["scores"].items()}
        return cls(list(data["layers"]), scores, bool(data.get("aggregated", False)))


@dataclass
class TraceResult(JsonRoundTrip):
    """Beams traced backward from one target token of one prompt, ranked best first.

    ``mode`` is ``"chain"`` (every edge in ``layer``, the reverse-attention semantics) or
    ``"layers"`` (one edge per layer from ``layer`` down to ``layer_lo``). ``top_attention``
    holds ``[query, key, weight]`` for the strongest keys of every query, in the captured
    patterns averaged over the traced layers and heads (the renderer's token strip).
    ``predictions`` (when traced with ``predictions=k``) are the model's top-k next tokens at the
    traced positions; ``verification`` is a causal check (``rat_lens.verify``) kept with the
    trace, which the summary and the page then show; ``rollout`` is the target's
    attention-rollout importance over positions
    (Abnar & Zuidema 2020) across the traced layers (head-mean; empty for ``agg_heads="max"``
    and for bounded traces whose head-means exceed ``rat_lens.options.PATTERN_BUDGET``).
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
    predictions: list[Prediction] = field(default_factory=list)
    rollout: list[float] = field(default_factory=list)
    # The traced heads' attention rows, compactly: {layer, head, query, keys, weights} per
    # (layer, head, query) an edge leaves from; the row's strongest keys and the beam's key.
    head_rows: list[dict] = field(default_factory=list)
    edge_weight: str = "attention"  # what the beams' edge_weights are: attention, or shares
    # How contribution routes were scored (TraceOptions); None for attention edges.
    move_threshold: Optional[float] = None
    depth_discount: Optional[float] = None
    verification: Optional[Verification] = None  # result.verification = rat_lens.verify(...)
    # After generate(): how many tokens were the prompt (the page marks the generated ones).
    prompt_len: Optional[int] = None
    # What the route carried (rat_lens.lens): the token explained (the model's top prediction
    # at the target unless given), the foil it is explained against, the logit lens at every
    # node a beam visits and every head move's write.
    target_token: Optional[str] = None
    target_id: Optional[int] = None
    foil_token: Optional[str] = None
    foil_id: Optional[int] = None
    lens: list[LensRecord] = field(default_factory=list)
    writes: list[HeadWrite] = field(default_factory=list)
    stays: list[StayWrite] = field(default_factory=list)
    format_version: int = FORMAT_VERSION

    def __repr__(self) -> str:
        layers = (
            f"layer={self.layer}"
            if self.mode == "chain"
            else f"layers={self.layer_lo}..{self.layer}"
        )
        best = f"{self.beams[0].score_norm:.3f}" if self.beams else "-"
        return (
            f"TraceResult(target_pos={self.target_pos}, {layers}, mode={self.mode!r}, "
            f"agg_heads={self.agg_heads!r}, top_beam={self.top_beam}, top_k={self.top_k}, "
            f"beams={len(self.beams)}, best_score={best})"
        )

    def to_dict(self) -> dict:
        """Every field, plus reverse-attention's ``metadata`` block (its readers find it)."""
        data = dataclasses.asdict(self)
        data["metadata"] = {name: data[name] for name in PEER_METADATA}
        return data

    @classmethod
    def from_dict(cls, data) -> "TraceResult":
        """A result from ``to_dict()`` output, or from reverse-attention 0.1.0's ``trace.json``;
        every field is checked first (:func:`rat_lens.schema.check_trace`): a bad one is named
        in one RatLensError."""
        _check_beam_count([data], "trace")
        peer = is_reverse_attention_trace(data)
        data = dict(check_trace(from_reverse_attention(data) if peer else data))
        data.pop("metadata", None)
        data["beams"] = [BeamPath(**b) for b in data["beams"]]
        sankey = data["sankey"]
        data["sankey"] = (
            # the peer's own graph has other ids: ours, by the same rule, from its beams
            build_sankey(data["beams"], data["tokens"], "chain", data["layer"])
            if peer
            else SankeyData(
                nodes=[SankeyNode(**n) for n in sankey["nodes"]],
                links=[SankeyLink(**lk) for lk in sankey["links"]],
            )
        )
        data["predictions"] = [Prediction(**p) for p in data.get("predictions", [])]
        data["lens"] = [LensRecord(**r) for r in data.get("lens", [])]
        data["writes"] = [HeadWrite(**w) for w in data.get("writes", [])]
        data["stays"] = [StayWrite.from_dict(s) for s in data.get("stays", [])]
        if data.get("verification") is not None:
            try:
                data["verification"] = Verification.from_dict(data["verification"])
            except (KeyError, TypeError, ValueError, AttributeError) as err:
                raise RatLensError(
                    f"trace: verification is not a saved Verification ({type(err).__name__}: {err})"
                ) from None
        return cls(**data)

    def _repr_html_(self) -> str:
        # The one import upward in the package (documented in CONTRIBUTING.md): a notebook
        # shows a result by asking the result itself.
        from .render import html_fragment

        return html_fragment(self)


def dump_traces(results) -> str:
    """``trace.json`` text: one result's ``to_json()``, or a list of them for several."""
    if isinstance(results, TraceResult):
        return results.to_json()
    return "[" + ", ".join(r.to_json() for r in results) + "]"


def load_traces(text, where: str = "trace.json") -> list["TraceResult"]:
    """Every result in ``trace.json`` text (ours, one or a list, or reverse-attention's), each
    checked; a bad one is named by its index and field in one RatLensError."""
    data = parse_json(text, where)
    items = data if isinstance(data, list) else [data]
    if not items:
        raise RatLensError(f"{where}: an empty list holds no trace")
    _check_beam_count(items, where)
    results = []
    for i, item in enumerate(items):
        try:
            results.append(TraceResult.from_dict(item))
        except RatLensError as err:
            label = f"{where}[{i}]" if isinstance(data, list) else where
            raise RatLensError(f"{label}: {err}") from None
    return results


def _check_beam_count(items: list, where: str) -> None:
    """Refuse saved traces holding more than ``SAVED_BEAM_BUDGET`` beams, before building any."""
    beams = sum(
        len(item["beams"])
        for item in items
        if isinstance(item, dict) and isinstance(item.get("beams"), list)
    )
    if beams > SAVED_BEAM_BUDGET:
        raise RatLensError(
            f"{where}: {beams:,} beams, over the budget of {SAVED_BEAM_BUDGET:,}: raise "
            f"rat_lens.result.SAVED_BEAM_BUDGET if you mean it"
        )


def check_result(result, where: str) -> TraceResult:
    """``result`` if it is a :class:`TraceResult` whose fields pass the saved-trace checks
    (:func:`rat_lens.schema.check_trace`: a hand-edited position, layer, head, score or token
    list is named as it would be in a ``trace.json``); else one RatLensError. Every reader of
    a result (``verify``, ``summarize``, ``render_html``) calls it before using one."""
    if not isinstance(result, TraceResult):
        kind = f"{type(result).__module__}.{type(result).__name__}"
        hint = (
            ": read reverse-attention's results from its trace.json (load_traces), or trace "
            "with rat_lens.compat.ReverseAttentionTracer"
            if kind.startswith("reverse_attention")
            else ""
        )
        raise RatLensError(f"{where}: result must be a rat_lens TraceResult, got {kind}{hint}")
    check_trace(result.to_dict(), f"{where}: result")
    return result
