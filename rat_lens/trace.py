"""Beam search backward through attention: pure tensor functions, no model in sight.

Two walks share one search. ``chain``: every step uses the same layer's matrix and goes to a
strictly earlier key (reverse-attention's semantics, reproduced exactly). ``layers``: step ``t``
uses layer ``hi - t`` and may stay on the same position (attention to itself), so a path descends
one layer per edge. Candidates at a step are (head, key) pairs of the beam's current query row;
all beams of a step are expanded with one ``topk`` over a ``[beam, head·key]`` matrix, and paths
are kept as parent pointers, rebuilt only for the beams returned.
"""

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from einops import rearrange
from jaxtyping import Float, Shaped
from torch import Tensor

from ._errors import RatLensError
from ._pattern import (aggregate_heads, check_length_norm, check_pattern_values,
                       check_positive_int, check_residual, length_norm_denominator,
                       resolve_index)
from .result import Beam

__all__ = ["beam_search", "trace_attention", "resolve_layers"]


def trace_attention(
    attn: Float[Tensor, "*layer_head query key"],
    target_pos: int = -1,
    *,
    layer: int = -1,
    layers: Optional[tuple[int, int]] = None,
    top_beam: int = 5,
    top_k: int = 5,
    min_attn: float = 0.0,
    agg_heads: str = "mean",
    length_norm: str = "avg_logprob",
    stop_at_bos: bool = True,
    bos_positions: Sequence[int] = (),
    attention_mask: Optional[Shaped[Tensor, " seq"]] = None,
    residual: Optional[str] = None,
    exclude_bos: bool = False,
) -> list[Beam]:
    """Trace backward from ``target_pos`` through any attention tensor; best beam first.

    ``attn`` is ``[query, key]`` (one matrix), ``[layer, query, key]`` (heads already
    aggregated) or ``[layer, head, query, key]``. Without ``layers`` the trace is a chain in
    ``layer``; with ``layers=(lo, hi)`` it descends one layer per edge from ``hi`` to ``lo``.

    >>> A = torch.tensor([[1.0, 0.0, 0.0], [0.7, 0.3, 0.0], [0.1, 0.6, 0.3]])
    >>> [(b.positions, [round(w, 2) for w in b.edge_attns]) for b in trace_attention(A, top_beam=2)]
    [([2, 1, 0], [0.6, 0.7]), ([2, 0], [0.1])]
    >>> stack = torch.stack([A, torch.eye(3)])          # layer 0: A, layer 1: attend to self
    >>> best = trace_attention(stack, layers=(0, 1), top_beam=1)[0]
    >>> best.positions, best.layers
    ([2, 2, 1], [1, 0])
    """
    if not isinstance(attn, Tensor):
        raise TypeError(f"attn must be a torch.Tensor, got {type(attn).__name__}")
    if attn.ndim not in (2, 3, 4) or attn.shape[-1] != attn.shape[-2]:
        raise RatLensError(
            f"attn must be [query, key], [layer, query, key] or [layer, head, query, key] with "
            f"query == key, got shape {tuple(attn.shape)}")
    check_pattern_values(attn, "trace_attention")
    stack = attn.reshape(-1, 1, *attn.shape[-2:]) if attn.ndim < 4 else attn
    stack = aggregate_heads(stack, agg_heads)
    chain = layers is None
    layer_ids = [resolve_index("layer", layer, stack.shape[0], "n_layers")] if chain \
        else resolve_layers(layers, stack.shape[0])
    if attention_mask is not None and attention_mask.shape != stack.shape[-1:]:
        raise RatLensError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected "
                           f"({stack.shape[-1]},) to match the attention's key axis")
    return beam_search(
        [stack[i] for i in layer_ids], layer_ids,
        resolve_index("target_pos", target_pos, stack.shape[-1], "sequence length"),
        chain=chain, per_head=agg_heads == "none", top_beam=top_beam, top_k=top_k,
        min_attn=min_attn, length_norm=length_norm, stop_at_bos=stop_at_bos,
        bos_positions=bos_positions, attention_mask=attention_mask, residual=residual,
        exclude_bos=exclude_bos)


def resolve_layers(layers, n_layers: int) -> list[int]:
    """``(lo, hi)`` with Python-style indices → the layers a path walks, top first."""
    if not (isinstance(layers, (tuple, list)) and len(layers) == 2):
        raise RatLensError(f"layers={layers!r} must be a pair (lo, hi) of layer indices")
    lo = resolve_index("layers[0]", layers[0], n_layers, "n_layers")
    hi = resolve_index("layers[1]", layers[1], n_layers, "n_layers")
    if lo > hi:
        raise RatLensError(f"layers={tuple(layers)} is empty: lo={lo} > hi={hi}")
    return list(range(hi, lo - 1, -1))


@dataclass
class _Steps:
    """Per search step, one row per candidate kept: where it went and who its parent was."""
    keys: list[Tensor]
    parents: list[Tensor]
    heads: list[Tensor]
    weights: list[Tensor]
    bos_mass: list[Tensor]

    def add(self, keys, parents, heads, weights, bos_mass) -> None:
        for name, value in zip(("keys", "parents", "heads", "weights", "bos_mass"),
                               (keys, parents, heads, weights, bos_mass)):
            getattr(self, name).append(value)


def beam_search(
    patterns: Sequence[Float[Tensor, "head query key"]],
    layer_ids: Sequence[int],
    target_pos: int,
    *,
    chain: bool,
    per_head: bool = False,
    top_beam: int = 5,
    top_k: int = 5,
    min_attn: float = 0.0,
    length_norm: str = "avg_logprob",
    stop_at_bos: bool = True,
    bos_positions: Sequence[int] = (),
    attention_mask: Optional[Shaped[Tensor, " seq"]] = None,
    residual: Optional[str] = None,
    exclude_bos: bool = False,
) -> list[Beam]:
    """The search itself, on one prompt: ``patterns[t]`` is the ``[head, query, key]`` matrix of
    layer ``layer_ids[t]`` (chain mode uses ``patterns[0]`` at every step).

    Scores and pruning follow reverse-attention 0.1.0 exactly: a step expands every live beam by
    its ``top_k`` positive candidates (``>= min_attn``, unmasked), beams without candidates end,
    beams reaching position 0 or a BOS position (``stop_at_bos``) end, and the rest are cut to
    ``top_beam`` by normalised score (stable, so ties keep expansion order).
    """
    check_positive_int("top_beam", top_beam)
    check_positive_int("top_k", top_k)
    check_length_norm(length_norm)
    residual = check_residual(residual)
    if chain and residual != "none":
        raise RatLensError(f"residual={residual!r} needs layers mode: a chain stays in one layer")
    if not isinstance(min_attn, (int, float)) or min_attn != min_attn:
        raise RatLensError(f"min_attn must be a number, got {min_attn!r}")

    n = patterns[0].shape[-1]
    device = patterns[0].device
    is_sink = torch.zeros(n, dtype=torch.bool, device=device)
    is_sink[0] = True
    is_sink[list(bos_positions)] = True
    stops = is_sink if stop_at_bos else torch.arange(n, device=device) == 0
    key_ok = torch.ones(n, dtype=torch.bool, device=device)
    if attention_mask is not None:
        key_ok &= attention_mask.to(device) != 0
    if exclude_bos:
        key_ok &= ~is_sink
    keys = torch.arange(n, device=device)
    n_steps = target_pos + 1 if chain else len(patterns)

    empty_f = torch.zeros(0, dtype=torch.float64, device=device)
    steps = _Steps([torch.tensor([target_pos], device=device)], [keys[:1] * 0 - 1],
                   [keys[:1] * 0 - 1], [empty_f], [empty_f])
    ended: list[tuple[int, Tensor, Tensor]] = []  # (step, candidate ids, raw scores)
    live = keys[:1] * 0
    live_pos = steps.keys[0]
    live_score = torch.zeros(1, dtype=torch.float64, device=device)
    if target_pos == 0:  # nothing earlier to trace to
        n_steps = 0
        ended.append((0, live, live_score))

    for t in range(n_steps):
        if live.numel() == 0:
            break
        rows = rearrange(patterns[0 if chain else t][:, live_pos], "head beam key -> beam head key")
        if residual == "rollout":  # Abnar & Zuidema: half the mass stays in the residual stream
            rows = 0.5 * rows + 0.5 * (keys == live_pos[:, None]).to(rows.dtype)[:, None]
        bos_mass = (rows * is_sink).sum(-1)
        earlier = keys < live_pos[:, None] if chain else keys <= live_pos[:, None]
        w = rows.masked_fill(~(earlier & key_ok)[:, None], 0.0)
        w = w.masked_fill(w < min_attn, 0.0)
        vals, flat_idx = rearrange(w, "beam head key -> beam (head key)").topk(
            min(top_k, w.shape[1] * n))
        ok = vals > 0
        dead = ~ok.any(1)  # end before the new beams, in beam order (as the peer does)
        if dead.any():
            ended.append((t, live[dead], live_score[dead]))
        parent, j = ok.nonzero(as_tuple=True)
        head, key = flat_idx[parent, j].div(n, rounding_mode="floor"), flat_idx[parent, j] % n
        weight = vals[parent, j].double()
        score = live_score[parent] + weight.clamp_min(1e-12).log()
        steps.add(key, live[parent], head, weight, bos_mass[parent, head].double())

        ends = stops[key] | (not chain and t == n_steps - 1)
        if ends.any():
            ended.append((t + 1, ends.nonzero()[:, 0], score[ends]))
        live = (~ends).nonzero()[:, 0]
        if live.numel() > top_beam:
            norm = score[live] / length_norm_denominator(length_norm, t + 1)
            live = live[norm.argsort(descending=True, stable=True)[:top_beam]]
        live_pos, live_score = key[live], score[live]

    return _best_beams(ended, steps, layer_ids, chain, per_head, top_beam, length_norm)


def _best_beams(ended, steps: _Steps, layer_ids, chain, per_head, top_beam, length_norm
                ) -> list[Beam]:
    """Rank the ended beams by normalised score and rebuild the best ``top_beam`` paths."""
    if not ended:
        return []
    n_edges = torch.cat([torch.full_like(ids, s) for s, ids, _ in ended])
    ids = torch.cat([ids for _, ids, _ in ended])
    raw = torch.cat([score for _, _, score in ended])
    denom = torch.tensor([length_norm_denominator(length_norm, int(s)) for s in n_edges],
                         dtype=torch.float64, device=raw.device)
    norm = raw / denom
    best = norm.argsort(descending=True, stable=True)[:top_beam]
    n_edges, cur, raw, norm = n_edges[best], ids[best].clone(), raw[best], norm[best]

    longest = int(n_edges.max())
    nb = len(best)
    positions = torch.zeros(nb, longest + 1, dtype=torch.long)
    positions[:, 0] = steps.keys[0]
    heads = torch.zeros(nb, longest, dtype=torch.long)
    weights = torch.zeros(nb, longest, dtype=torch.float64)
    bos_mass = torch.zeros(nb, longest, dtype=torch.float64)
    for s in range(longest, 0, -1):  # follow parent pointers, all beams at once
        on = n_edges >= s
        c = cur[on]
        positions[on, s] = steps.keys[s][c].cpu()
        heads[on, s - 1] = steps.heads[s][c].cpu()
        weights[on, s - 1] = steps.weights[s][c].cpu()
        bos_mass[on, s - 1] = steps.bos_mass[s][c].cpu()
        cur[on] = steps.parents[s][c]

    beams = []
    for i in range(nb):
        e = int(n_edges[i])
        beams.append(Beam(
            positions=positions[i, :e + 1].tolist(),
            edge_attns=weights[i, :e].tolist(),
            layers=[layer_ids[0] if chain else layer_ids[s] for s in range(e)],
            heads=heads[i, :e].tolist() if per_head else [None] * e,
            bos_mass=bos_mass[i, :e].tolist(),
            score_raw=float(raw[i]),
            score_norm=float(norm[i])))
    return beams
