"""The last step of a trace: beams and the capture record become :class:`TraceResult` s.

Per prompt: the fields every target shares (tokens, mode, the resolved options, the strip),
the rollout rows of all its targets in one pass; per target: the beams with their tokens and
each head edge's attention (whatever weight the search used), the Sankey graph, the path
texts, the traced heads' attention rows (the page's heatmap) and the model's predictions when
the record holds logits.
"""

import numpy as np
import torch

from .plan import TracePlan
from .record import Record
from .result import Beam, BeamPath, TraceResult, build_sankey, path_text
from .search.beam import with_attention
from .search.stats import predictions_of, rollout_rows_top_down
from .search.store import TopKeys

__all__ = ["assemble", "HEAD_ROW_KEYS", "HEAD_ROWS_MAX"]

# The page's heatmap: per traced row its strongest keys (and the beams' own keys), for at most
# this many rows per trace. The bounded store keeps at least as many (search.store.STORE_KEYS).
HEAD_ROW_KEYS, HEAD_ROWS_MAX = 32, 512


def assemble(
    plan: TracePlan,
    record: Record,
    b: int,
    beams: list[list[Beam]],
    prompt: tuple[list[str], list[int]],
    tokenizer,
) -> list[TraceResult]:
    """Prompt ``b``'s results, one per target of the plan (``beams[i]`` for the i-th);
    ``prompt`` is its tokens as strings and as ids."""
    tokens, ids = prompt
    shared = _shared_fields(plan, record, b, tokens, ids)
    results = []
    attention = [a[b] for a in record.attention]
    for target, found, rollout in zip(plan.targets[b], beams, _rollouts(plan, record, b)):
        found = with_attention(found, attention, plan.layer_ids)
        paths = [BeamPath.from_beam(beam, tokens, ids) for beam in found]
        result = TraceResult(
            target_pos=target,
            beams=paths,
            paths_text=[path_text(p) for p in paths],
            sankey=build_sankey(paths, tokens, shared["mode"], shared["layer"]),
            rollout=rollout,
            **shared,
        )
        result.head_rows = _head_rows(found, attention, plan.layer_ids)
        if record.top is not None and plan.inputs.predictions:
            result.predictions = predictions_of(
                result, record.top, tokenizer, plan.inputs.predictions
            )
        results.append(result)
    return results


def _shared_fields(plan: TracePlan, record: Record, b: int, tokens, ids) -> dict:
    options = plan.options
    return dict(
        tokens=tokens,
        token_ids=ids,
        seq_len=len(ids),
        batch_index=b,
        top_attention=record.strips[b],
        mode="chain" if options.chain else "layers",
        layer=plan.layer_ids[0],
        layer_lo=plan.layer_ids[-1],
        agg_heads=options.agg_heads,
        residual=options.residual,
        exclude_bos=options.exclude_bos,
        top_beam=options.top_beam,
        top_k=options.top_k,
        length_norm=options.length_norm,
        edge_weight=options.edge_weight,
        move_threshold=options.move_threshold if options.stays else None,
        depth_discount=options.depth_discount if options.stays else None,
    )


def _rollouts(plan: TracePlan, record: Record, b: int) -> list[list[float]]:
    """Each target's rollout row, all in one pass. Not defined for max-aggregated heads, nor
    without every head-mean (a bounded trace over the budget): empty lists there."""
    targets = plan.targets[b]
    if plan.options.agg_heads == "max" or record.head_means is None:
        return [[] for _ in targets]
    top_down = (mean[b] for mean in record.head_means)  # one layer dense at a time
    return rollout_rows_top_down(top_down, targets).tolist()


def _head_rows(beams: list[Beam], attention: list, layer_ids: list[int]) -> list[dict]:
    """The attention row each head edge leaves from, compactly: per distinct (layer, head,
    query), best beams first, the row's ``HEAD_ROW_KEYS`` strongest keys (equal weights: the
    earlier key first) and the beams' own keys (at most ``HEAD_ROWS_MAX`` rows).
    ``attention[t]`` is layer ``layer_ids[t]``'s pattern ``[head, query, key]`` (one channel,
    head None, when heads were aggregated), dense or a bounded ``TopKeys`` (which holds every
    row's strongest keys)."""
    index = {layer: t for t, layer in enumerate(layer_ids)}
    wanted: dict[tuple, set] = {}
    for beam in beams:
        for i in range(beam.num_edges):
            if not beam.is_residual(i) and len(wanted) < HEAD_ROWS_MAX:
                edge = (beam.layers[i], beam.heads[i], beam.positions[i])
                wanted.setdefault(edge, set()).add(beam.positions[i + 1])
    return [
        _head_row(attention[index[layer]], layer, head, query, keys)
        for (layer, head, query), keys in wanted.items()
    ]


def _head_row(pattern, layer: int, head, query: int, keys: set) -> dict:
    channel = 0 if head is None else head
    if isinstance(pattern, TopKeys):
        row_keys, row_weights = pattern.row(channel, query)
    else:
        row_keys, row_weights = torch.arange(query + 1), pattern[channel, query, : query + 1]
    row_keys, row_weights = row_keys.numpy(), row_weights.double().numpy()
    strongest = row_keys[np.lexsort((row_keys, -row_weights))[:HEAD_ROW_KEYS]]
    weight_of = dict(zip(row_keys.tolist(), row_weights.tolist()))
    chosen = sorted(set(strongest.tolist()) | keys)
    return {
        "layer": layer,
        "head": head,
        "query": query,
        "keys": chosen,
        "weights": [round(weight_of[k], 6) for k in chosen],
    }
