"""Attention statistics and token importance: pure tensor functions, no model in sight.

Every function takes patterns as TransformerLens gives them (``[..., head, query, key]``, rows
summing to 1 over the keys a query may see) and returns a tensor. The per-head statistics are
means over query rows, so they read as "on average, a row of this head ...":

=============== ===========================================================================
``entropy``     −Σ_k A[q, k] · ln A[q, k] (nats; 0 for a one-hot row, ln n for uniform over n)
``max_weight``  max_k A[q, k]
``sink_mass``   Σ over sink keys (BOS / position 0) of A[q, k]
``self_mass``   A[q, q], the diagonal
``prev_mass``   A[q, q − 1], the previous token (rows q ≥ 1 only)
=============== ===========================================================================

Token importance for one target: attention rollout (Abnar & Zuidema 2020) and the beam mass
that a trace put on each position. :class:`rat_lens.result.HeadTable` carries named
``[layer][head]`` values (statistics, head-role scores) as plain lists, so results holding them
round-trip through JSON.

Half-precision patterns are upcast before any sum
(:func:`rat_lens.search.pattern.at_least_float32`):
every statistic and rollout comes out in float32 whatever the model's dtype.
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Optional, Union

import torch
from einops import reduce
from jaxtyping import Bool, Float, Int, Shaped
from torch import Tensor

from ..errors import RatLensError
from ..result import Prediction, TraceResult
from .pattern import at_least_float32

__all__ = [
    "STAT_NAMES",
    "entropy",
    "max_weight",
    "sink_mass",
    "self_mass",
    "prev_mass",
    "attention_stats",
    "attention_rollout",
    "rollout_importance",
    "rollout_rows_top_down",
    "rollout_rows",
    "TopTokens",
    "beam_mass_importance",
    "top_attention",
    "top_predictions",
    "predictions_at",
    "predictions_of",
]

STAT_NAMES = ("entropy", "max_weight", "sink_mass", "self_mass", "prev_mass")

# A mask over query rows broadcasts right-aligned against [..., head, query]: [batch, query]
# works for [batch, head, q, k] and for stacked [layer, batch, head, q, k] alike.
QueryMask = Optional[Bool[Tensor, "*mask_lead query"]]


def _row_mean(
    per_row: Float[Tensor, "*lead head query"], query_mask: QueryMask
) -> Float[Tensor, "*lead head"]:
    """Mean over query rows, counting only rows where ``query_mask`` is True."""
    per_row = at_least_float32(per_row)
    if query_mask is None:
        return reduce(per_row, "... query -> ...", "mean")
    keep = query_mask.to(per_row.device).unsqueeze(-2).to(per_row.dtype)  # [..., 1, query]
    keep = keep.expand_as(per_row)
    # A head with no counted row gets 0, not NaN: it has nothing to average.
    return (per_row * keep).sum(-1) / keep.sum(-1).clamp(min=1)


def entropy(
    pattern: Float[Tensor, "*lead head query key"], query_mask: QueryMask = None
) -> Float[Tensor, "*lead head"]:
    """Mean row entropy in nats (0·ln 0 = 0).

    Examples:
        >>> causal_uniform = torch.tril(torch.ones(3, 3)) / torch.arange(1, 4.0)[:, None]
        >>> entropy(causal_uniform[None])                     # rows: ln 1, ln 2, ln 3
        tensor([0.5973])
    """
    return _row_mean(torch.special.entr(at_least_float32(pattern)).sum(-1), query_mask)


def max_weight(
    pattern: Float[Tensor, "*lead head query key"], query_mask: QueryMask = None
) -> Float[Tensor, "*lead head"]:
    """Mean over rows of the largest weight in the row.

    Examples:
        >>> max_weight(torch.eye(4)[None])
        tensor([1.])
    """
    return _row_mean(pattern.amax(-1), query_mask)


def sink_mass(
    pattern: Float[Tensor, "*lead head query key"],
    query_mask: QueryMask = None,
    sink: Optional[Bool[Tensor, "*sink_lead key"]] = None,
) -> Float[Tensor, "*lead head"]:
    """Mean over rows of the mass on sink keys: ``sink`` (e.g. BOS positions), else position 0.

    Examples:
        >>> causal_uniform = torch.tril(torch.ones(4, 4)) / torch.arange(1, 5.0)[:, None]
        >>> sink_mass(causal_uniform[None])                   # (1 + 1/2 + 1/3 + 1/4) / 4
        tensor([0.5208])
    """
    if sink is None:
        return _row_mean(pattern[..., 0], query_mask)
    pattern = at_least_float32(pattern)
    on_sink = sink.to(pattern.device).unsqueeze(-2).to(pattern.dtype)  # [..., 1, key]
    return _row_mean((pattern * on_sink).sum(-1), query_mask)


def self_mass(
    pattern: Float[Tensor, "*lead head query key"], query_mask: QueryMask = None
) -> Float[Tensor, "*lead head"]:
    """Mean over rows of the diagonal ``A[q, q]``: how much a token reads itself.

    Examples:
        >>> self_mass(torch.eye(3)[None])
        tensor([1.])
    """
    return _row_mean(torch.diagonal(pattern, dim1=-2, dim2=-1), query_mask)


def prev_mass(
    pattern: Float[Tensor, "*lead head query key"], query_mask: QueryMask = None
) -> Float[Tensor, "*lead head"]:
    """Mean over rows q ≥ 1 of ``A[q, q - 1]`` (row 0 has no previous token, so it is left out).

    Examples:
        >>> previous = torch.eye(4).roll(-1, dims=1).tril()   # every row q >= 1 reads q - 1
        >>> prev_mass(previous[None]), self_mass(previous[None])
        (tensor([1.]), tensor([0.]))
    """
    n = pattern.shape[-1]
    below = torch.diagonal(pattern, offset=-1, dim1=-2, dim2=-1)  # [..., head, query - 1]
    if n < 2:
        return at_least_float32(pattern.new_zeros(pattern.shape[:-2]))
    mask = None if query_mask is None else query_mask[..., 1:]
    return _row_mean(below, mask)


def attention_stats(
    pattern: Float[Tensor, "*lead head query key"],
    query_mask: QueryMask = None,
    sink: Optional[Bool[Tensor, "*sink_lead key"]] = None,
) -> dict[str, Float[Tensor, "*lead head"]]:
    """All five statistics of :data:`STAT_NAMES`, per head, for one layer or stacked layers.

    Cheap enough to run inside a ``hook_pattern`` hook on the full pattern before heads are
    aggregated ([batch, head] numbers out of [batch, head, seq, seq]).

    Examples:
        >>> stats = attention_stats(torch.eye(3).expand(2, 1, 3, 3))      # [batch 2, head 1]
        >>> for name, value in stats.items():
        ...     print(f"{name:10} {[round(v, 3) for v in value.flatten().tolist()]}")
        entropy    [0.0, 0.0]
        max_weight [1.0, 1.0]
        sink_mass  [0.333, 0.333]
        self_mass  [1.0, 1.0]
        prev_mass  [0.0, 0.0]
    """
    return {
        "entropy": entropy(pattern, query_mask),
        "max_weight": max_weight(pattern, query_mask),
        "sink_mass": sink_mass(pattern, query_mask, sink),
        "self_mass": self_mass(pattern, query_mask),
        "prev_mass": prev_mass(pattern, query_mask),
    }


def _check_residual(residual_share: float) -> None:
    if not 0.0 <= residual_share <= 1.0:
        raise RatLensError(f"residual_share={residual_share} must be within [0, 1]")


def _with_residual(
    attn: Float[Tensor, "*lead query key"], residual_share: float
) -> Float[Tensor, "*lead query key"]:
    _check_residual(residual_share)
    eye = torch.eye(attn.shape[-1], dtype=attn.dtype, device=attn.device)
    mixed = (1.0 - residual_share) * attn + residual_share * eye
    # Re-normalised as in the paper; a no-op for rows that already sum to 1.
    return mixed / mixed.sum(-1, keepdim=True).clamp(min=torch.finfo(attn.dtype).tiny)


def _head_mean(
    patterns: Float[Tensor, "layer *batch head query key"],
) -> Float[Tensor, "layer *batch query key"]:
    return reduce(at_least_float32(patterns), "layer ... head q k -> layer ... q k", "mean")


def attention_rollout(
    patterns: Float[Tensor, "layer *batch head query key"], residual_share: float = 0.5
) -> Float[Tensor, "*batch query key"]:
    """Attention rollout (Abnar & Zuidema 2020) through the stacked layers, lowest first.

    Heads are averaged, each layer becomes ``Ã = (1 - residual_share)·A + residual_share·I`` (rows
    re-normalised), and ``R = Ã_top ··· Ã_bottom``: ``R[q, k]`` is how much of position ``q``
    after the top layer traces back to token ``k`` before the bottom one.

    Examples:
        >>> A = torch.tensor([[1.0, 0.0], [1.0, 0.0]])                    # everyone reads token 0
        >>> attention_rollout(A[None, None])                              # [layer 1, head 1, q, k]
        tensor([[1.0000, 0.0000],
                [0.5000, 0.5000]])
        >>> attention_rollout(torch.stack([A, A])[:, None])               # two layers
        tensor([[1.0000, 0.0000],
                [0.7500, 0.2500]])
    """
    mixed = _with_residual(_head_mean(patterns), residual_share)
    rollout = mixed[0]
    for layer_attn in mixed[1:]:
        rollout = layer_attn @ rollout
    return rollout


def rollout_importance(
    patterns: Float[Tensor, "layer *batch head query key"], target: int, residual_share: float = 0.5
) -> Float[Tensor, "*batch key"]:
    """Row ``target`` of :func:`attention_rollout`, computed as vector × matrix products.

    O(layers · seq²) instead of O(layers · seq³): only the target's row is ever formed.

    Examples:
        >>> A = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
        >>> rollout_importance(torch.stack([A, A])[:, None], target=1)
        tensor([0.7500, 0.2500])
    """
    return rollout_rows(patterns, [target], residual_share)[..., 0, :]


def rollout_rows(
    patterns: Float[Tensor, "layer *batch head query key"],
    targets: Sequence[int],
    residual_share: float = 0.5,
) -> Float[Tensor, "*batch target key"]:
    """Rows ``targets`` of :func:`attention_rollout`: every target of a prompt in one pass.

    Each layer's mixed matrix ``Ã`` is never formed: ``rows @ Ã`` is computed from ``A`` and its
    row sums, so N targets cost one pass over the layers (the tracer's many-target case).

    Examples:
        >>> A = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
        >>> rollout_rows(torch.stack([A, A])[:, None], targets=[1, 0])
        tensor([[0.7500, 0.2500],
                [1.0000, 0.0000]])
    """
    return rollout_rows_top_down(_head_mean(patterns).unbind(0)[::-1], targets, residual_share)


def rollout_rows_top_down(
    head_means: Iterable[Float[Tensor, "*batch query key"]],
    targets: Sequence[int],
    residual_share: float = 0.5,
) -> Float[Tensor, "*batch target key"]:
    """:func:`rollout_rows` from each layer's head-mean, top layer first, read one layer at a
    time (an iterator may make each as it is read: the tracer's head-means of 30 layers at
    2,048 tokens are 0.5 GB dense), each in at least float32.

    Examples:
        >>> A = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
        >>> rollout_rows_top_down(iter([A, A]), targets=[1])
        tensor([[0.7500, 0.2500]])
    """
    _check_residual(residual_share)
    rows = None
    for layer_attn in head_means:
        layer_attn = at_least_float32(layer_attn)
        if rows is None:
            rows = layer_attn.new_zeros(*layer_attn.shape[:-2], len(targets), layer_attn.shape[-1])
            rows[..., torch.arange(len(targets)), list(targets)] = 1.0
        # Ã = ((1 - r)·A + r·I) / rowsum, so rows @ Ã = (1 - r)·(w @ A) + r·w, w = rows / rowsum.
        rowsum = (1.0 - residual_share) * layer_attn.sum(-1) + residual_share
        w = rows / rowsum.clamp(min=torch.finfo(rows.dtype).tiny).unsqueeze(-2)
        rows = (1.0 - residual_share) * (w @ layer_attn) + residual_share * w
    return rows


def beam_mass_importance(
    keys: Int[Tensor, " edge"], mass: Float[Tensor, " edge"], seq_len: int
) -> Float[Tensor, " seq"]:
    """Sum of edge mass landing on each key position (a trace's edges, flattened over beams).

    With ``mass`` = softmax(score_norm) of the beam × edge attention this is the Sankey link
    weight summed per source token.

    Examples:
        >>> beam_mass_importance(torch.tensor([2, 0, 2]), torch.tensor([0.5, 0.25, 0.125]), 4)
        tensor([0.2500, 0.0000, 0.6250, 0.0000])
    """
    out = torch.zeros(seq_len, dtype=mass.dtype, device=mass.device)
    return out.index_add_(0, keys.to(mass.device), mass)


def top_attention(
    rows: Float[Tensor, "query key"], mask: Shaped[Tensor, " seq"], first_row: int = 0, k: int = 4
) -> list[list]:
    """``[query, key, weight]`` (weight rounded to 4 places) for the ``k`` strongest positive
    keys of each unmasked query; ``rows`` are queries ``first_row, first_row + 1, ...`` (a trace's
    token strip, row block by row block).

    Examples:
        >>> rows = torch.tensor([[1.0, 0.0, 0.0], [0.25, 0.75, 0.0]])
        >>> top_attention(rows, torch.tensor([1, 1, 1]), first_row=1, k=1)
        [[1, 0, 1.0], [2, 1, 0.75]]
    """
    weights, keys = rows.topk(min(k, rows.shape[-1]), dim=-1)
    return [
        [first_row + i, key, round(w, 4)]
        for i in mask[first_row : first_row + len(rows)].nonzero()[:, 0].tolist()
        for key, w in zip(keys[i].tolist(), weights[i].tolist())
        if w > 0
    ]


def top_predictions(
    logits: Float[Tensor, "seq vocab"], positions: Union[Sequence[int], Tensor], k: int = 3
) -> tuple[Float[Tensor, "n k"], Int[Tensor, "n k"]]:
    """The model's top-``k`` next tokens (probabilities, ids) at each of ``positions``.

    Examples:
        >>> logits = torch.log(torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]]))
        >>> probs, ids = top_predictions(logits, [1, 0], k=2)
        >>> ids.tolist(), [[round(p, 2) for p in row] for row in probs.tolist()]
        ([[0, 2], [1, 2]], [[0.5, 0.3], [0.7, 0.2]])
    """
    index = torch.as_tensor(positions, dtype=torch.long, device=logits.device)
    return _top_probs(logits[index], k)


def _top_probs(
    logits: Float[Tensor, "*rows vocab"], k: int
) -> tuple[Float[Tensor, "*rows k"], Int[Tensor, "*rows k"]]:
    """The ``k`` most likely tokens of each row and their probabilities, ``exp(logit -
    logsumexp)`` of the top logits alone, in float32 (no softmax of the whole rows kept)."""
    logits = logits.float()
    top = logits.topk(min(k, logits.shape[-1]), dim=-1)
    return (top.values - logits.logsumexp(-1, keepdim=True)).exp(), top.indices


@dataclass
class TopTokens:
    """Each position's top-``k`` next tokens (probabilities, ids) and the vocabulary's size:
    what a trace keeps of the logits (``[seq, vocab]`` is 0.4 GB at 2,048 tokens on a 49k
    vocabulary; the predictions and the token explained read only these). Filled query chunk
    by query chunk (:meth:`add`) or at once (:meth:`of`).

    Examples:
        >>> logits = torch.log(torch.tensor([[[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]]]))
        >>> top = TopTokens.of(logits, k=2)
        >>> top.ids.tolist(), top.vocab
        ([[[1, 2], [0, 2]]], 3)
    """

    probs: Float[Tensor, "batch seq k"]
    ids: Int[Tensor, "batch seq k"]
    vocab: int

    ROWS = 64

    @classmethod
    def of(cls, logits: Float[Tensor, "batch seq vocab"], k: int) -> "TopTokens":
        batch, seq, vocab = logits.shape
        top = cls.empty(batch, seq, vocab, k, logits.device)
        top.add(logits, 0)
        return top

    @classmethod
    def empty(cls, batch: int, seq: int, vocab: int, k: int, device=None) -> "TopTokens":
        k = min(k, vocab)
        probs = torch.zeros(batch, seq, k, device=device)
        return cls(probs, torch.zeros(batch, seq, k, dtype=torch.long, device=device), vocab)

    def add(self, logits: Float[Tensor, "batch chunk vocab"], start: int) -> None:
        """The top tokens of the query chunk starting at ``start``, ``ROWS`` positions at a time
        (a block's logsumexp works on a temporary of the block's size)."""
        for first in range(0, logits.shape[1], self.ROWS):
            block = logits[:, first : first + self.ROWS]
            rows = slice(start + first, start + first + block.shape[1])
            self.probs[:, rows], self.ids[:, rows] = _top_probs(block, self.probs.shape[-1])


def decode_each(tokenizer, ids: list[int]) -> list[str]:
    """Each id decoded alone: ``batch_decode`` where the tokenizer has it, else ``decode`` one
    by one (reverse-attention's tokenizers may have only that), else the ids themselves."""
    if tokenizer is None:
        return [str(i) for i in ids]
    if hasattr(tokenizer, "batch_decode"):
        return tokenizer.batch_decode([[i] for i in ids])
    return [tokenizer.decode([i]) for i in ids]


def predictions_at(
    result: TraceResult, logits: Float[Tensor, "*batch seq vocab"], tokenizer, k: int
) -> list[Prediction]:
    """The top-``k`` next tokens at the target and every traced position, from final logits
    (decoded by ``tokenizer`` when there is one, else shown as ids). The logits stay where they
    are (a GPU): only the ``k`` probabilities and ids of the traced positions are copied to the
    host, never the ``[seq, vocab]`` rows."""
    if logits.ndim == 3:
        logits = logits[result.batch_index if logits.shape[0] > 1 else 0]
    if logits.ndim != 2 or logits.shape[0] != result.seq_len:
        raise RatLensError(
            f"logits have shape {tuple(logits.shape)}; expected [seq, vocab] or "
            f"[batch, seq, vocab] with seq = {result.seq_len}"
        )
    positions = _traced_positions(result)
    probs, ids = top_predictions(logits.detach(), positions, k)
    return _predictions(result, positions, probs, ids, tokenizer)


def predictions_of(result: TraceResult, top: TopTokens, tokenizer, k: int) -> list[Prediction]:
    """:func:`predictions_at` from the top tokens a trace kept of its prompt's logits."""
    positions = _traced_positions(result)
    index = torch.as_tensor(positions, dtype=torch.long, device=top.ids.device)
    b = result.batch_index
    return _predictions(
        result, positions, top.probs[b, index, :k], top.ids[b, index, :k], tokenizer
    )


def _traced_positions(result: TraceResult) -> list[int]:
    positions = list(dict.fromkeys(p for beam in result.beams for p in beam.positions))
    return positions or [result.target_pos]


def _predictions(result: TraceResult, positions, probs, ids, tokenizer) -> list[Prediction]:
    out = []
    for p, row_probs, row_ids in zip(positions, probs.cpu().tolist(), ids.cpu().tolist()):
        out.append(
            Prediction(p, result.tokens[p], row_ids, decode_each(tokenizer, row_ids), row_probs)
        )
    return out
