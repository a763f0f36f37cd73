"""The second step of a trace: one capture, whatever its source, as one :class:`Record`.

A :class:`~rat_lens.plan.TracePlan` names the source; :func:`capture_record` runs it:

- ``"dense"``: each traced layer's pattern, reduced over heads as the plan says, from one
  forward (:class:`~rat_lens.capture.PatternCapture`) or the user's ``cache=``;
- ``"bounded"``: per (layer, head, query) row only its strongest keys, filled as the forward
  runs (:class:`~rat_lens.capture.BoundedCapture`);
- ``"contribution"``: each part's share of every row's block output (heads and the residual
  stream, :class:`~rat_lens.capture.ContributionCapture`); a padded prompt runs alone on its
  real tokens, its shares placed back at their positions.

Every source fills the same fields, so the search and the assembly never ask where they came
from.
"""

import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import options as budgets
from .capture import (
    BoundedCapture,
    ContributionCapture,
    Forward,
    PatternCapture,
    check_contribution_hooks,
    hook_name,
    input_device,
    patterns_from_cache,
    run_forward,
)
from .plan import TracePlan, dense_bytes
from .search.pattern import check_pattern_values
from .search.stats import top_attention
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
        head_means: ``[layer (top first), batch, query, key]``, or None where a bounded trace's
            would not fit ``PATTERN_BUDGET`` (then there is no rollout).
        strips: per prompt, the token strip (each query's strongest keys in the head-mean
            averaged over the traced layers).
        logits: ``[batch, seq, vocab]`` when predictions were asked for.
    """

    weights: list
    attention: list
    head_means: Optional[Tensor]
    strips: list
    logits: Optional[Tensor] = None


def capture_record(model, tokens, plan: TracePlan) -> Record:
    """Run the plan's capture source on ``tokens`` (``[batch, seq]``)."""
    source = {"dense": _dense, "bounded": _bounded, "contribution": _contribution}
    return source[plan.source](model, tokens, plan)


def _forward(plan: TracePlan) -> Forward:
    return Forward(plan.forward_mask, plan.inputs.query_chunk, bool(plan.inputs.predictions))


def _dense(model, tokens, plan: TracePlan) -> Record:
    """Each traced layer's reduced pattern, from one forward or the user's cache."""
    layers, agg = plan.layer_ids, plan.options.agg_heads
    logits = None
    if plan.inputs.cache is not None:
        kept = patterns_from_cache(plan.inputs.cache, layers, agg, tuple(tokens.shape))
    else:
        capture = PatternCapture(layers, agg, device=input_device(model))
        logits = run_forward(model, tokens, capture, _forward(plan))
        kept = capture.to_cache(model)
    stacked = [kept[hook_name(layer)].float().cpu() for layer in layers]
    for layer, pattern in zip(layers, stacked):
        check_pattern_values(pattern, hook_name(layer))
    return _with_overview(stacked, stacked, logits, plan)


def _with_overview(weights: list, attention: list, logits, plan: TracePlan) -> Record:
    """A dense record, with the head-means (the rollout's) and the strips taken from the
    attention: the layers summed bottom up, as a forward delivers them to the bounded strip."""
    head_means = torch.stack([head_mean(p) for p in attention])
    overview = layer_mean(list(head_means.flip(0)))
    strips = [top_attention(overview[b], plan.mask[b]) for b in range(len(plan.mask))]
    return Record(weights, attention, head_means, strips, logits)


def _bounded(model, tokens, plan: TracePlan) -> Record:
    """Per layer one ``TopKeys`` per prompt, filled as the forward runs (or from the cache)."""
    capture = _bounded_capture(plan)
    logits = None
    if plan.inputs.cache is not None:
        batch_seq = tuple(tokens.shape)
        patterns = patterns_from_cache(plan.inputs.cache, plan.layer_ids, "none", batch_seq)
        for layer in sorted(plan.layer_ids):  # in a forward's order
            capture.add(hook_name(layer), patterns[hook_name(layer)])
    else:
        logits = run_forward(model, tokens, capture, _forward(plan))
    stores = capture.stores()
    stacked = [stores[layer] for layer in plan.layer_ids]
    return Record(stacked, stacked, capture.head_mean_stack(plan.layer_ids), capture.strips, logits)


def _bounded_capture(plan: TracePlan) -> BoundedCapture:
    """The bounded store's hooks: candidates are unmasked keys, sinks unless excluded; the
    head-means kept only where they fit ``PATTERN_BUDGET`` (the rollout reads all of them)."""
    means = dense_bytes(plan.mask, plan.layer_ids, 1)
    if means > budgets.PATTERN_BUDGET:
        warnings.warn(
            f"no rollout: it reads every traced layer's whole head-mean ({means / 2**30:.1f} "
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
        keep=plan.keep,
        query_mask=plan.mask,
        head_means=means <= budgets.PATTERN_BUDGET,
    )


def _contribution(model, tokens, plan: TracePlan) -> Record:
    """Per layer the parts' shares ``[batch, head + 1, query, key]`` and the patterns."""
    check_contribution_hooks(model, plan.layer_ids)
    if plan.forward_mask is None:
        shares, patterns, logits = _shares(model, tokens, plan)
    else:
        shares, patterns, logits = _padded_shares(model, tokens, plan)
    weights = [shares[layer].float().cpu() for layer in plan.layer_ids]
    for layer, share in zip(plan.layer_ids, weights):
        check_pattern_values(share, f"edge shares of layer {layer}")
    attention = [patterns[layer].float().cpu() for layer in plan.layer_ids]
    return _with_overview(weights, attention, logits, plan)


def _shares(model, tokens, plan: TracePlan) -> tuple[dict, dict, Optional[Tensor]]:
    """One whole forward of unpadded ``tokens`` (the shares read every row's values)."""
    capture = ContributionCapture(plan.layer_ids)
    forward = Forward(None, None, logits=bool(plan.inputs.predictions))
    logits = run_forward(model, tokens, capture, forward)
    weight = plan.options.edge_weight
    shares = {layer: capture.shares(model, layer, weight) for layer in plan.layer_ids}
    return shares, {layer: capture.pattern(layer) for layer in plan.layer_ids}, logits


def _padded_shares(model, tokens, plan: TracePlan) -> tuple[dict, dict, Optional[Tensor]]:
    """Each padded prompt alone, on its real tokens; zero rows and columns at the padding."""
    batch, seq = tokens.shape
    shares, patterns, logits = {}, {}, None
    for b in range(batch):
        real = plan.mask[b].nonzero().flatten()
        one = _shares(model, tokens[b : b + 1, real.to(tokens.device)], plan)
        for out, got in zip((shares, patterns), one[:2]):
            for layer, value in got.items():  # [1, channel, real, real]
                out.setdefault(layer, value.new_zeros(batch, value.shape[1], seq, seq))
                out[layer][b][:, real[:, None], real[None, :]] = value[0]
        if one[2] is not None:  # [1, real, vocab]
            logits = one[2].new_zeros(batch, seq, one[2].shape[-1]) if logits is None else logits
            logits[b, real] = one[2][0]
    return shares, patterns, logits
