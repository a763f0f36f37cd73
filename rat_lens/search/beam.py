"""Beam search backward through attention: pure tensor functions, no model in sight.

Two walks share one search. ``chain``: every step uses the same layer's matrix and goes to a
strictly earlier key (reverse-attention's semantics, reproduced exactly). ``layers``: step ``t``
uses layer ``hi - t`` and may stay on the same position (attention to itself), so a path descends
one layer per edge. Candidates at a step are (head, key) pairs of the beam's current query row,
found by one ``topk`` over ``[row, head·key]`` for all rows at once (in chain mode for every row
before the search starts, since the matrix never changes). The step loop then works on small
arrays, and paths are kept as parent pointers, rebuilt only for the beams returned. Over two
heads or more each key keeps only its strongest head, so a row's ``top_k`` candidates are
``top_k`` different keys and no two beams differ only in the head of an edge.

Contribution edges (``edge_weight`` other than attention, layers mode) add *stays*: the last
channel is the residual stream, joined by every head's read of the row's own position. A stay is
free; the ``i``-th move (an edge to an earlier position) adds
``depth_discount**(i-1) · log(share / move_threshold)``. Averaging log shares, as attention
traces do, would end every route after its strongest move (a second move helps an average only
when it is stronger than the first); a plain sum would rank short routes first. Against a
threshold, each move above it lengthens a route's lead and each below it costs, and the discount
keeps the first move out of the target, the one the target reads directly, the heaviest. The one
beam still at the target is never pruned: its first move may come at a lower layer.

Ties (equal weights in a row: uniform early or padded rows, the even rest of a sink-heavy row,
quantised patterns) decide which beams exist, so their order is a rule, not an accident of
``topk``. The ``topk`` above asks for one candidate more than kept; a row is *tied* when two
neighbours among those are equal and positive (two kept weights equal, or the last kept one equal
to one left out). Untied rows have one answer; tied rows (only those) are redone by the rule:

* chain mode in one matrix (heads aggregated, or a single head: reverse-attention's mode): the
  peer's choice, which is
  ``torch.topk(row[:q], min(top_k, #positive))`` on CPU with masked and sub-``min_attn`` keys
  zeroed. That is libstdc++'s ``std::nth_element`` then ``std::sort`` of the first ``k - 1``
  (``std::partial_sort`` when ``64·k <= q``) over (weight, key) pairs compared by weight only
  (ATen ``TopKImpl.h``): deterministic on CPU for a given row, but no index order (uniform row of
  six keys, ``k = 3``: keys 3, 5, 4). So the tied rows are handed to exactly that call, on CPU
  whatever the pattern's device (``_peer_order``).
* layers mode, and chains over two heads or more (no peer): weight descending, then lower head,
  then earlier key, the order of a stable sort over ``head·key`` (``_index_order``, without a
  full sort).

Equal scores keep expansion order, in the cut to ``top_beam`` and in the final ranking (stable
sorts, like the peer's Python ``sort``): live beams in their order, each one's candidates in the
order above; ended beams in the order they ended (per step: beams left without candidates, then
new beams that reached 0 / BOS or the last layer). Scores add ``math.log`` of the weights, as the
peer does: NumPy's vectorised ``log`` differs from it by one ulp on ~0.2 % of weights (AVX-512),
enough to split a tie the peer keeps (or the reverse).
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np
import torch
from einops import rearrange
from jaxtyping import Float, Shaped
from torch import Tensor

from ..errors import checked_call, resolve_index
from ..options import TraceOptions, length_norm_denominator, merge_keywords
from ..result import Beam
from .pattern import aggregate_heads, check_attention, check_keys

__all__ = ["beam_search", "trace_attention", "with_attention"]


@checked_call
def trace_attention(
    attn: Float[Tensor, "*layer_head query key"],
    target_pos: int = -1,
    *,
    options: Optional[TraceOptions] = None,
    bos_positions: Sequence[int] = (),
    attention_mask: Optional[Shaped[Tensor, " seq"]] = None,
    **keywords,
) -> list[Beam]:
    """Trace backward from ``target_pos`` through any attention tensor; best beam first.

    ``attn`` is ``[query, key]`` (one matrix), ``[layer, query, key]`` (heads already
    aggregated) or ``[layer, head, query, key]``. Without ``layers`` the trace is a chain in
    ``layer``; with ``layers=(lo, hi)`` it descends one layer per edge from ``hi`` to ``lo``.
    The search options are :class:`~rat_lens.options.TraceOptions`'s (``options=`` and/or its
    fields as keywords), but with neither ``layer`` nor ``layers`` the trace is a chain in the
    last layer (reverse-attention's), and ``edge_weight`` defaults to ``"attention"``, whatever
    the mode: ``attn`` holds the weights. Pass
    ``"contribution"`` / ``"value_norm"`` when it holds shares whose last head channel is the
    residual stream (:func:`rat_lens.search.contrib.edge_shares`).

    Every input is checked first (:func:`~rat_lens.search.pattern.check_attention`,
    :func:`~rat_lens.search.pattern.check_keys`): an empty, negative or unnormalised ``attn``
    is an error, not an empty trace; one that requires grad is traced detached; a mask on
    another device is moved to ``attn``'s.

    Examples:
        >>> A = torch.tensor([[1.0, 0.0, 0.0], [0.7, 0.3, 0.0], [0.1, 0.6, 0.3]])
        >>> beams = trace_attention(A, top_beam=2)
        >>> [(b.positions, [round(w, 2) for w in b.edge_weights]) for b in beams]
        [([2, 1, 0], [0.6, 0.7]), ([2, 0], [0.1])]
        >>> stack = torch.stack([A, torch.eye(3)])          # layer 0: A, layer 1: attend to self
        >>> best = trace_attention(stack, layers=(0, 1), top_beam=1)[0]
        >>> best.positions, best.layers
        ([2, 2, 1], [1, 0])
    """
    options = merge_keywords(options, keywords, "trace_attention", inputs=False)
    if options.layer is None and options.layers is None:  # a tensor: the peer's chain, last layer
        options = replace(options, layer=-1)
    if options.agg_heads is None:  # whatever the tensor holds, averaged as the peer does
        options = replace(options, agg_heads="mean")
    if options.edge_weight is None:  # attn holds the weights, unless told it holds shares
        options = replace(options, edge_weight="attention")
    options = options.resolve()
    attn = check_attention(attn, shares=options.edge_weight != "attention")
    mask, bos = check_keys(attention_mask, bos_positions, attn.shape[-1], attn.device)
    stack = attn.reshape(-1, 1, *attn.shape[-2:]) if attn.ndim < 4 else attn
    stack = aggregate_heads(stack, options.agg_heads)
    layer_ids = options.layer_ids(stack.shape[0])
    target = resolve_index("target_pos", target_pos, stack.shape[-1], "sequence length")
    options.check_budget(target + 1 if options.chain else len(layer_ids))
    patterns = [stack[i] for i in layer_ids]
    beams = beam_search(
        patterns, layer_ids, target, options, bos_positions=bos, attention_mask=mask
    )
    # Shares say nothing of the attention they came from: their beams record none.
    return (
        with_attention(beams, patterns, layer_ids) if options.edge_weight == "attention" else beams
    )


def with_attention(
    beams: Sequence[Beam], attention: Sequence[Float[Tensor, "channel query key"]], layer_ids
) -> list[Beam]:
    """``beams`` with ``edge_attns`` filled: each head edge's attention weight, read from
    ``attention[t]``, layer ``layer_ids[t]``'s pattern (per head, or one channel of heads
    aggregated; dense, or a bounded store read by rows); None for a stay.

    Examples:
        >>> A = torch.tensor([[[1.0, 0.0], [0.4, 0.6]]])          # [head, query, key]
        >>> beam = Beam([1, 0], [0.9], [3], [0], [0.0], 0.0, 0.0)   # searched on other weights
        >>> with_attention([beam], [A], [3])[0].edge_attns
        [0.4000000059604645]
    """
    index = {layer: t for t, layer in enumerate(layer_ids)}

    def attention_of(beam: Beam, i: int) -> Optional[float]:
        if beam.is_residual(i):
            return None
        row = attention[index[beam.layers[i]]][:, [beam.positions[i]]]
        return float(row[beam.heads[i] or 0, 0, beam.positions[i + 1]])

    return [
        replace(beam, edge_attns=[attention_of(beam, i) for i in range(beam.num_edges)])
        for beam in beams
    ]


@dataclass
class _Candidates:
    """The ``top_k`` (head, key) candidates of some query rows, best first (weight 0 = none)."""

    weights: np.ndarray  # [row, k] float64
    flat: np.ndarray  # [row, k] head * n_keys + key
    log_weights: np.ndarray  # [row, k] math.log(max(weight, 1e-12)), the peer's safe_log
    bos_mass: np.ndarray  # [row, head] attention of the row on BOS / position 0

    FIELDS = ("weights", "flat", "log_weights", "bos_mass")

    def __getitem__(self, rows) -> "_Candidates":  # once per step: spelled out, no getattr loop
        return _Candidates(
            self.weights[rows], self.flat[rows], self.log_weights[rows], self.bos_mass[rows]
        )


def _top_candidates(
    rows: Float[Tensor, "head row key"],
    row_pos: Tensor,
    *,
    chain: bool,
    key_ok: Tensor,
    is_sink: Tensor,
    min_attn: float,
    top_k: int,
    rollout: bool,
    stays: bool = False,
) -> _Candidates:
    keys = torch.arange(rows.shape[-1], device=rows.device)
    if rollout:  # Abnar & Zuidema: half the mass stays in the residual stream
        rows = 0.5 * rows + 0.5 * (keys == row_pos[:, None]).to(rows.dtype)
    bos_mass = (rows * is_sink).sum(-1)
    if stays:
        rows = _merge_self_reads(rows, row_pos)
    earlier = keys < row_pos[:, None] if chain else keys <= row_pos[:, None]
    w = rows.masked_fill(~(earlier & key_ok), 0.0)
    w = w.masked_fill(w < min_attn, 0.0)
    peer = chain and w.shape[0] == 1  # a chain in one matrix, the peer's mode: its tie order
    if not peer:
        w = _strongest_head_per_key(w)
    w = rearrange(w, "head row key -> row (head key)")
    k = min(top_k, w.shape[-1])
    vals, flat = w.topk(min(k + 1, w.shape[-1]))  # one more: is the last kept one tied?
    tied = ((vals[:, 1:] == vals[:, :-1]) & (vals[:, 1:] > 0)).any(-1).cpu().numpy()
    weights, flat = vals[:, :k].double().cpu().numpy(), flat[:, :k].cpu().numpy()
    if tied.any():
        rows_t = np.flatnonzero(tied)
        w_t = w[torch.as_tensor(rows_t, device=w.device)]
        if peer:
            weights[rows_t], flat[rows_t] = _peer_order(w_t, row_pos.cpu().numpy()[rows_t], k)
        else:
            kth = vals[torch.as_tensor(rows_t, device=w.device), k - 1]
            weights[rows_t], flat[rows_t] = _index_order(w_t, kth, k)
    return _Candidates(
        weights,
        flat,
        _safe_log(weights),
        rearrange(bos_mass, "head row -> row head").double().cpu().numpy(),
    )


def _merge_self_reads(
    rows: Float[Tensor, "part row key"], row_pos: Tensor
) -> Float[Tensor, "part row key"]:
    """With contribution weights the last channel is the residual stream (on the diagonal). A
    head reading its own position moves nothing between tokens either, so its share joins the
    stay: one way to keep a position, and routes that differ only in how they stayed are one."""
    row = torch.arange(rows.shape[1], device=rows.device)
    own = rows[:, row, row_pos]  # [part, row]
    rows = rows.clone()
    rows[:-1, row, row_pos] = 0.0
    rows[-1, row, row_pos] = own.sum(0)
    return rows


def _strongest_head_per_key(w: Float[Tensor, "head row key"]) -> Float[Tensor, "head row key"]:
    """Keep each key's strongest head only (the lowest one among equals): beams that would
    differ only in the head of an edge are one route, so a row's ``top_k`` candidates are
    ``top_k`` different keys."""
    if w.shape[0] == 1:
        return w
    strongest = w.max(0, keepdim=True).values
    first = (w == strongest).to(torch.uint8).argmax(0, keepdim=True)  # argmax: first maximum
    heads = torch.arange(w.shape[0], device=w.device)[:, None, None]
    return w.masked_fill(heads != first, 0.0)


def _peer_order(w: Float[Tensor, "row key"], row_pos: np.ndarray, k: int):
    """reverse-attention's candidates of each row: ``torch.topk(row[:q], m)`` on CPU, ``m`` =
    ``min(k, #positive)``, the very call the peer makes (keys ``>= q`` are zero in ``w``). In
    float64: the order is decided by comparisons alone, which every float dtype's values keep."""
    w = w.double().cpu()
    count = (w > 0).sum(-1).clamp(max=k).tolist()
    weights, flat = np.zeros((len(row_pos), k)), np.zeros((len(row_pos), k), dtype=np.int64)
    for i, (q, m) in enumerate(zip(row_pos.tolist(), count)):
        vals, keys = w[i, :q].topk(m)
        weights[i, :m], flat[i, :m] = vals.numpy(), keys.numpy()
    return weights, flat


def _index_order(w: Float[Tensor, "row flat"], kth: Float[Tensor, " row"], k: int):
    """The ``k`` largest positive weights of each row, by weight descending, then lower flat
    index (head, then key): a stable sort's order. ``kth`` is each row's ``k``-th largest weight:
    a row keeps every weight above it, then the lowest-index ones equal to it up to ``k``."""
    kth = kth[:, None]
    above = w > kth.clamp_min(0)  # kth <= 0: fewer than k positive weights, all kept
    at = (w == kth) & (kth > 0)
    need = k - above.sum(-1, keepdim=True, dtype=torch.int32)
    keep = above | (at & (at.cumsum(-1, dtype=torch.int32) <= need))
    row, idx = keep.nonzero(as_tuple=True)
    val = w[row, idx].double().cpu().numpy()
    row, idx = row.cpu().numpy(), idx.cpu().numpy()
    order = np.lexsort((idx, -val, row))  # row, then weight descending, then index
    row, idx, val = row[order], idx[order], val[order]
    slot = np.arange(len(row)) - np.searchsorted(row, row)  # rank within its row
    weights, flat = np.zeros((len(kth), k)), np.zeros((len(kth), k), dtype=np.int64)
    weights[row, slot], flat[row, slot] = val, idx
    return weights, flat


def _safe_log(weights: np.ndarray) -> np.ndarray:
    """``math.log(max(w, 1e-12))`` per weight, bit for bit the peer's ``safe_log`` (NumPy's
    vectorised ``log`` can differ by one ulp, which splits or makes exact score ties)."""
    flat = np.maximum(weights, 1e-12).ravel().tolist()
    return np.fromiter(map(math.log, flat), np.float64, len(flat)).reshape(weights.shape)


def _chain_table(
    pattern: Float[Tensor, "head query key"], last_row: int, chunk: int = 256, **kw
) -> _Candidates:
    """Chain mode reads one matrix, so each row's candidates are found once, for every row up to
    the target, in chunks (bounded memory) — the search loop then only gathers."""
    parts = []
    for start in range(0, last_row + 1, chunk):
        row_pos = torch.arange(start, min(start + chunk, last_row + 1), device=pattern.device)
        parts.append(
            _top_candidates(pattern[:, start : start + len(row_pos)], row_pos, chain=True, **kw)
        )
    return _Candidates(
        *(np.concatenate([getattr(p, f) for p in parts]) for f in _Candidates.FIELDS)
    )


def beam_search(
    patterns: Sequence[Float[Tensor, "head query key"]],
    layer_ids: Sequence[int],
    target_pos: int,
    options: TraceOptions,
    *,
    bos_positions: Sequence[int] = (),
    attention_mask: Optional[Shaped[Tensor, " seq"]] = None,
) -> list[Beam]:
    """The search itself, on one prompt: ``patterns[t]`` is the ``[head, query, key]`` matrix of
    layer ``layer_ids[t]`` (chain mode uses ``patterns[0]`` at every step).

    Scores and pruning follow reverse-attention 0.1.0 exactly: a step expands every live beam by
    its ``top_k`` positive candidates (``>= min_attn``, unmasked), beams without candidates end,
    beams reaching position 0 or a BOS position (``stop_at_bos``) end, and the rest are cut to
    ``top_beam`` by normalised score (stable, so ties keep expansion order). Equal weights and
    equal scores follow the tie rules of the module docstring (the peer's, for a chain in one
    matrix).
    """
    n, device = patterns[0].shape[-1], patterns[0].device
    find, stops = _candidate_rules(n, device, options, bos_positions, attention_mask)
    table = _chain_table(patterns[0], target_pos, **find) if options.chain else None
    n_steps = 0 if target_pos == 0 else target_pos + 1 if options.chain else len(patterns)
    rules = _Rules(
        options,
        stops,
        np.array([length_norm_denominator(options.length_norm, e) for e in range(n_steps + 1)]),
        stay_channel=patterns[0].shape[0] - 1 if options.stays else -1,
        n=n,
        last_step=n_steps - 1,
    )
    # Step s holds, for every beam it created, its key, parent (index into step s-1), head,
    # weight and BOS mass; a live beam is an index into the latest step.
    steps = [dict(key=np.array([target_pos]), parent=np.array([-1]))]
    live = _Live(np.array([0]), np.zeros(1), np.zeros(1, dtype=np.int64), np.zeros(1, dtype=bool))
    ended: list[tuple] = []  # (step, beam ids, raw scores, moves, moved)
    if target_pos == 0:  # nothing earlier to trace to
        ended.append((0, live.ids, live.score, live.moves, live.moved | (not options.stays)))
    for t in range(n_steps):
        if live.ids.size == 0:
            break
        live_pos = steps[t]["key"][live.ids]
        rows = torch.as_tensor(live_pos, device=device)
        cand = table[live_pos] if table is not None else _top_candidates(
            patterns[t][:, rows], rows, chain=False, **find
        )  # fmt: skip
        live = _step(rules, t, cand, live, live_pos, steps, ended)
    if options.stays:  # a route must reach an earlier token
        ended = [(s, ids[m], raw[m], mv[m], m[m]) for s, ids, raw, mv, m in ended if m.any()]
    return _best_beams(ended, steps, rules.denominators, layer_ids, options, options.top_beam)


@dataclass
class _Live:
    """The live beams: indices into the latest step, raw scores, moves made so far, and
    whether each has left the target at all (a beam that never did is no route)."""

    ids: np.ndarray
    score: np.ndarray
    moves: np.ndarray
    moved: np.ndarray

    def where(self, mask: np.ndarray) -> tuple:
        return self.ids[mask], self.score[mask], self.moves[mask], self.moved[mask]


@dataclass
class _Rules:
    """What every step of one search reads: the options, which keys end a beam, the length
    norm's denominators by number of moves, the stay channel (-1: none) and sizes."""

    options: TraceOptions
    stops: np.ndarray
    denominators: np.ndarray
    stay_channel: int
    n: int
    last_step: int


def _candidate_rules(n, device, options: TraceOptions, bos_positions, attention_mask):
    """The keys a step may pick and the sinks (``_top_candidates``' keywords), and the keys
    that end a beam."""
    is_sink = torch.zeros(n, dtype=torch.bool, device=device)
    is_sink[[0, *bos_positions]] = True
    key_ok = torch.ones(n, dtype=torch.bool, device=device)
    if attention_mask is not None:
        key_ok &= attention_mask.to(device) != 0
    if options.exclude_bos:
        key_ok &= ~is_sink
    stops = is_sink if options.stop_at_bos else torch.arange(n, device=device) == 0
    find = dict(
        key_ok=key_ok,
        is_sink=is_sink,
        min_attn=options.min_attn,
        top_k=options.top_k,
        rollout=options.residual == "rollout",
        stays=options.stays,
    )
    return find, stops.cpu().numpy()


def _step(rules: _Rules, t: int, cand, live: _Live, live_pos, steps: list, ended: list) -> _Live:
    """One step: every live beam expands by its candidates (beams with none end first, in beam
    order, as the peer does), beams reaching a stop or the last layer end, the rest are cut to
    ``top_beam`` by normalised score. With stays (contribution weights: the last channel is
    the residual stream) a stay is free and the ``i``-th move adds
    ``depth_discount**(i-1) · log(share / move_threshold)``; the length norm counts moves."""
    options = rules.options
    ok = cand.weights > 0
    dead = ~ok.any(1)
    if dead.any():
        ended.append((t, *live.where(dead)))
    parent, j = np.nonzero(ok)  # beam-major, best candidate first
    head, key = np.divmod(cand.flat[parent, j], rules.n)
    stay = head == rules.stay_channel
    if options.stays:
        gain = options.depth_discount ** live.moves[parent] * (
            cand.log_weights[parent, j] - math.log(options.move_threshold)
        )
        score = live.score[parent] + np.where(stay, 0.0, gain)
    else:
        score = live.score[parent] + cand.log_weights[parent, j]
    moves = live.moves[parent] + ~stay
    moved = live.moved[parent] | (key != live_pos[parent])
    steps.append(
        dict(
            key=key,
            parent=live.ids[parent],
            head=head,
            weight=cand.weights[parent, j],
            bos_mass=cand.bos_mass[parent, head],
            stay=stay,
        )
    )
    ends = rules.stops[key] | (not options.chain and t == rules.last_step)
    if ends.any():
        ended.append((t + 1, np.nonzero(ends)[0], score[ends], moves[ends], moved[ends]))
    survivors = np.nonzero(~ends)[0]
    if survivors.size > options.top_beam:
        norm = score[survivors] / rules.denominators[moves[survivors]]
        keep = np.argsort(-norm, kind="stable")[: options.top_beam]
        if options.stays:  # the beam still at the target may yet make the best first move
            waiting = np.flatnonzero(~moved[survivors])[:1]
            keep = np.concatenate([keep, np.setdiff1d(waiting, keep)])
        survivors = survivors[keep]
    return _Live(survivors, score[survivors], moves[survivors], moved[survivors])


def _best_beams(ended, steps, denominators, layer_ids, options, top_beam) -> list[Beam]:
    """Rank the ended beams by normalised score and rebuild the best ``top_beam`` paths by
    following parent pointers, all beams at once."""
    if not ended:
        return []
    chain, per_head = options.chain, options.per_head
    n_edges = np.concatenate([np.full(len(ids), s) for s, ids, *_ in ended])
    ids = np.concatenate([e[1] for e in ended])
    raw = np.concatenate([e[2] for e in ended])
    norm = raw / denominators[np.concatenate([e[3] for e in ended])]
    best = np.argsort(-norm, kind="stable")[:top_beam]
    n_edges, cur, raw, norm = n_edges[best], ids[best], raw[best], norm[best]

    longest = int(n_edges.max())
    positions = np.zeros((len(best), longest + 1), dtype=np.int64)
    positions[:, 0] = steps[0]["key"][0]
    names = ("head", "weight", "bos_mass") + (("stay",) if options.stays else ())
    fields = {f: np.zeros((len(best), longest)) for f in names}
    for s in range(longest, 0, -1):
        on = n_edges >= s
        c = cur[on]
        positions[on, s] = steps[s]["key"][c]
        for f, values in fields.items():
            values[on, s - 1] = steps[s][f][c]
        cur[on] = steps[s]["parent"][c]

    return [
        Beam(
            positions=positions[i, : e + 1].tolist(),
            edge_weights=fields["weight"][i, :e].tolist(),
            layers=[layer_ids[0] if chain else layer_ids[s] for s in range(e)],
            heads=[
                None if options.stays and s else h
                for h, s in zip(
                    fields["head"][i, :e].astype(int).tolist(),
                    fields.get("stay", np.zeros((1, e)))[i if options.stays else 0, :e],
                )
            ]
            if per_head
            else [None] * e,
            bos_mass=fields["bos_mass"][i, :e].tolist(),
            score_raw=float(raw[i]),
            score_norm=float(norm[i]),
            kinds=["residual" if s else "head" for s in fields["stay"][i, :e]]
            if options.stays
            else [],
        )
        for i, e in enumerate(n_edges.tolist())
    ]
