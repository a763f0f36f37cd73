"""The second step of a trace: one capture, whatever its source, as one :class:`Record`.

A :class:`~rat_lens.plan.TracePlan` names the source; :func:`capture_record` runs it:

- ``"dense"``: each traced layer's pattern, reduced over heads as the plan says, from one
  forward (:class:`~rat_lens.capture.PatternCapture`) or the user's ``cache=``;
- ``"bounded"``: per (layer, head, query) row only its strongest keys, filled as the forward
  runs (:class:`~rat_lens.capture.BoundedCapture`);
- ``"contribution"`` / ``"contribution_bounded"``: each part's share of every row's block
  output (heads and the residual stream, :class:`~rat_lens.capture.ContributionCapture`),
  from every head's whole pattern, or from the bounded store and each layer's queries and
  keys (the rows read recomputed).

Every source fills the same fields, so the search and the assembly never ask where they came
from.
"""

import warnings
from dataclasses import dataclass, replace
from typing import Optional

from . import options as budgets
from .capture import (
    BoundedCapture,
    ContributionCapture,
    Forward,
    Joined,
    PatternCapture,
    ValueNormCapture,
    hook_name,
    input_device,
    patterns_from_cache,
    run_forward,
)
from .plan import TracePlan, dense_bytes
from .search.pattern import check_pattern_values
from .search.recompute import CHECKED_KEYS
from .search.stats import TopTokens, top_attention
from .search.store import head_mean, layer_mean

__all__ = ["Record", "capture_record"]


@dataclass
class Record:
    """What one capture of a batch leaves for the search and the assembly.

    Attributes:
        weights: per traced layer (top first), what the search reads: ``weights[t][b]`` is
            prompt ``b``'s ``[channel, query, key]`` (heads, one aggregated channel, or heads
            and the residual stream for contribution shares), dense or a bounded ``TopKeys``.
        attention: the same layout, the attention patterns themselves (the page's head rows).
        head_means: per traced layer (top first) its ``[batch, query, key]`` head-mean (dense,
            or a bounded trace's ``CausalRows``), or None where a bounded trace's would not
            fit ``PATTERN_BUDGET`` (then there is no rollout).
        strips: per prompt, the token strip (each query's strongest keys in the head-mean
            averaged over the traced layers).
        top: each position's top next tokens (``TopTokens``, what the predictions and the token
            explained read of the logits) when either was asked for.
    """

    weights: list
    attention: list
    head_means: Optional[list]
    strips: list
    top: Optional[TopTokens] = None


def capture_record(model, tokens, plan: TracePlan, also=None) -> Record:
    """Run the plan's capture source on ``tokens`` (``[batch, seq]``). ``also``: another
    capture (the explanation's, :mod:`rat_lens.lens`) filled by the same forward, which then
    runs to the logits."""
    source = {
        "dense": _dense,
        "bounded": _bounded,
        "contribution": _contribution,
        "contribution_bounded": _contribution,
    }
    return source[plan.source](model, tokens, plan, also)


def _forward(plan: TracePlan, also=None) -> Forward:
    inputs = plan.inputs
    logits = bool(inputs.predictions) or also is not None
    k = max(inputs.predictions or 0, 1)  # the token explained is the top one
    return Forward(plan.forward_mask, inputs.query_chunk, logits, inputs.progress, k)


def _forward_with(model, tokens, capture, plan: TracePlan, also):
    """The one forward of a source, ``also`` hooked in beside its capture."""
    joined = capture if also is None else Joined([capture, also])
    return run_forward(model, tokens, joined, _forward(plan, also))


def _dense(model, tokens, plan: TracePlan, also=None) -> Record:
    """Each traced layer's reduced pattern (and its value-norm shares, read by rows), from one
    forward or the user's cache."""
    layers, agg = plan.layer_ids, plan.options.agg_heads
    top = None
    if plan.options.edge_weight == "value_norm":
        attention = PatternCapture(layers, "none", device=input_device(model))
        capture = ValueNormCapture.of(model, layers, attention)
        top = _run(model, tokens, capture, plan, also)
        kept = attention.to_cache(model)
    elif plan.inputs.cache is not None:
        kept = patterns_from_cache(plan.inputs.cache, layers, agg, tuple(tokens.shape))
    else:
        capture = PatternCapture(layers, agg, device=input_device(model))
        top = _forward_with(model, tokens, capture, plan, also)
        kept = capture.to_cache(model)
    stacked = [kept[hook_name(layer)].float().cpu() for layer in layers]
    for layer, pattern in zip(layers, stacked):
        check_pattern_values(pattern, hook_name(layer))
    weights = stacked
    if plan.options.edge_weight == "value_norm":  # computed for the rows the search reads
        weights = [capture.rows(layer, pattern) for layer, pattern in zip(layers, stacked)]
    return _with_overview(weights, stacked, top, plan)


def _run(model, tokens, capture, plan: TracePlan, also=None):
    """The forward of ``capture``, or the user's cache fed to it (no logits then)."""
    if plan.inputs.cache is None:
        return _forward_with(model, tokens, capture, plan, also)
    capture.add_cache(plan.inputs.cache, tuple(tokens.shape))
    return None


def _with_overview(weights: list, attention: list, top, plan: TracePlan) -> Record:
    """A dense record, with the head-means (the rollout's) and the strips taken from the
    attention: the layers summed bottom up, as a forward delivers them to the bounded strip."""
    means = [head_mean(p) for p in attention]
    overview = layer_mean(means[::-1])
    strips = [top_attention(overview[b], plan.mask[b]) for b in range(len(plan.mask))]
    return Record(weights, attention, means, strips, top)


def _bounded(model, tokens, plan: TracePlan, also=None) -> Record:
    """Per layer one ``TopKeys`` per prompt, filled as the forward runs (or from the cache): of
    the attention, and of the value-norm shares when those are the edges. The shares' store
    keeps what the search reads of a row (``top_k`` keys; the store's width with a foil, whose
    rescoring of the target row reads further), the attention's the page's head rows and the
    attention of every key the shares' keeps."""
    capture = attention = _bounded_capture(plan)
    if plan.options.edge_weight == "value_norm":
        foil = plan.inputs.foil_token is not None
        shares = _bounded_capture(plan, overview=False, keep=plan.keep if foil else None)
        capture = ValueNormCapture.of(model, plan.layer_ids, attention, shares)
        top = _run(model, tokens, capture, plan, also)
    elif plan.inputs.cache is not None:
        batch_seq = tuple(tokens.shape)
        patterns = patterns_from_cache(plan.inputs.cache, plan.layer_ids, "none", batch_seq)
        for layer in sorted(plan.layer_ids):  # in a forward's order
            attention.add(hook_name(layer), patterns[hook_name(layer)])
        top = None
    else:
        top = _forward_with(model, tokens, attention, plan, also)
    stores = attention.stores()
    stacked = [stores[layer] for layer in plan.layer_ids]
    weights = stacked
    if capture is not attention:
        share_stores = capture.shares.stores()
        weights = [share_stores[layer] for layer in plan.layer_ids]
    means = attention.head_mean_list(plan.layer_ids)
    return Record(weights, stacked, means, attention.strips, top)


def _bounded_capture(
    plan: TracePlan, overview: bool = True, keep: Optional[int] = None
) -> BoundedCapture:
    """The bounded store's hooks: candidates are unmasked keys, sinks unless excluded; the
    head-means kept only where they fit ``PATTERN_BUDGET`` (the rollout reads all of them).
    Without ``overview``: a store only (of edge shares), of ``keep`` keys per row (default:
    ``top_k``, what a search step reads)."""
    # Head-means are kept by row blocks (CausalRows): about their lower triangles.
    means = dense_bytes(plan.mask, plan.layer_ids, 1) // 2
    if overview and means > budgets.PATTERN_BUDGET:
        warnings.warn(
            f"no rollout: it reads every traced layer's head-mean ({means / 2**30:.1f} "
            f"GB here), over rat_lens.options.PATTERN_BUDGET; raise that to have it",
            RuntimeWarning,
            stacklevel=6,
        )
    key_ok = plan.mask.bool()
    if plan.options.exclude_bos:
        key_ok[:, 0] = False
        for b, positions in enumerate(plan.bos):
            key_ok[b, positions] = False
    return BoundedCapture(
        plan.layer_ids,
        key_ok,
        sink_keys=sorted({p for positions in plan.bos for p in positions}),
        keep=plan.keep if overview else keep or plan.options.top_k,
        query_mask=plan.mask,
        head_means=overview and means <= budgets.PATTERN_BUDGET,
        overview=overview,
    )


def _contribution(model, tokens, plan: TracePlan, also=None) -> Record:
    """Per layer and prompt the parts' shares, computed only for the rows the search reads
    (:class:`~rat_lens.search.contrib.ShareRows`), from one forward (or the cache) as any
    source runs it: padded prompts masked, long ones in query chunks. Source
    ``"contribution"`` keeps every traced head's whole pattern; ``"contribution_bounded"``
    keeps the layers' queries and keys, from which each row read is recomputed exactly
    (:class:`~rat_lens.search.recompute.AttentionRows`: the search's, the page's, the foil's
    rows), and a bounded store's overview (strips, head-means) and ``CHECKED_KEYS`` strongest
    keys per row, the forward's own weights each recomputed row is checked against."""
    layers = plan.layer_ids
    if plan.source == "contribution_bounded":  # its store only checks the rows recomputed
        attention = _bounded_capture(replace(plan, keep=CHECKED_KEYS))
    else:
        attention = PatternCapture(layers, "none", device=input_device(model))
    capture = ContributionCapture.of(model, layers, attention, plan.forward_mask)
    top = _run(model, tokens, capture, plan, also)
    if plan.source == "contribution_bounded":
        stores = attention.stores()
        patterns = [capture.attention_rows(layer, stores[layer]) for layer in layers]
        weights = [capture.rows(model, layer, p) for layer, p in zip(layers, patterns)]
        means = attention.head_mean_list(layers)
        return Record(weights, patterns, means, attention.strips, top)
    kept = attention.to_cache(model)
    patterns = [kept[hook_name(layer)].float().cpu() for layer in layers]
    for layer, pattern in zip(layers, patterns):
        check_pattern_values(pattern, hook_name(layer))
    weights = [capture.rows(model, layer, p) for layer, p in zip(layers, patterns)]
    return _with_overview(weights, patterns, top, plan)
