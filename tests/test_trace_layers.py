"""Layers mode, per-head edges and the residual rollout, against hand-computed tiny matrices and an
exhaustive enumeration of every path (with top_beam and top_k large enough, beam search is
exact)."""

import math
import random

import pytest
import torch

from rat_lens import RatLensError, trace_attention
from rat_lens.options import length_norm_denominator

A1 = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])  # layer 1
A0 = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.4, 0.0], [0.1, 0.7, 0.2]])  # layer 0
STACK = torch.stack([A0, A1])
ln = math.log


def summary(beams):
    return [(b.positions, [round(w, 6) for w in b.edge_weights], b.layers, b.heads) for b in beams]


def test_layers_mode_by_hand():
    beams = trace_attention(STACK, 2, layers=(0, 1), top_beam=10, top_k=3)
    # Every path from (layer 1, pos 2) down through layer 0, written out by hand; paths that
    # reach position 0 end there (nothing earlier to attend to).
    assert summary(beams) == [
        ([2, 2, 1], [0.5, 0.7], [1, 0], [None, None]),
        ([2, 1, 0], [0.3, 0.6], [1, 0], [None, None]),
        ([2, 1, 1], [0.3, 0.4], [1, 0], [None, None]),
        ([2, 2, 2], [0.5, 0.2], [1, 0], [None, None]),
        ([2, 2, 0], [0.5, 0.1], [1, 0], [None, None]),
        ([2, 0], [0.2], [1], [None]),
    ]
    assert beams[0].score_raw == pytest.approx(ln(0.5) + ln(0.7))
    assert beams[0].score_norm == pytest.approx((ln(0.5) + ln(0.7)) / 2)
    assert beams[-1].score_norm == pytest.approx(ln(0.2))


def test_layers_mode_beam_width_prunes_by_normalised_score():
    beams = trace_attention(STACK, 2, layers=(0, 1), top_beam=1, top_k=3)
    # After layer 1 the live beams are [2,2] (0.5) and [2,1] (0.3); top_beam=1 keeps [2,2];
    # [2,0] already ended. Final ranking keeps the single best: [2,2,1].
    assert summary(beams) == [([2, 2, 1], [0.5, 0.7], [1, 0], [None, None])]


def test_rollout_adds_the_residual_stream_as_an_edge():
    beams = trace_attention(STACK, 2, layers=(0, 1), top_beam=10, top_k=3, residual="rollout")
    # 0.5·A + 0.5·I: row 2 of layer 1 becomes [0.1, 0.15, 0.75]; rows of layer 0:
    # row 2 → [0.05, 0.35, 0.6], row 1 → [0.3, 0.7, 0].
    best = beams[0]
    assert best.positions == [2, 2, 2]
    assert best.edge_weights == pytest.approx([0.75, 0.6])
    got = {tuple(b.positions): b.edge_weights for b in beams}
    assert got[(2, 1, 1)] == pytest.approx([0.15, 0.7])
    assert got[(2, 0)] == pytest.approx([0.1])


def test_per_head_edges_record_their_head():
    heads = torch.stack(
        [
            torch.stack([A0, torch.tensor([[1.0, 0, 0], [0.1, 0.9, 0], [0.05, 0.05, 0.9]])]),
            torch.stack([A1, torch.tensor([[1.0, 0, 0], [0.8, 0.2, 0], [0.0, 0.95, 0.05]])]),
        ]
    )  # [layer, head, query, key]
    best = trace_attention(heads, 2, layers=(0, 1), agg_heads="none", top_beam=3, top_k=4)[0]
    # Layer 1 head 1 sends 0.95 from 2 to 1, then layer 0 head 1 keeps 0.9 on 1 itself.
    assert (best.positions, best.heads, best.layers) == ([2, 1, 1], [1, 1], [1, 0])
    assert best.edge_weights == pytest.approx([0.95, 0.9])
    chain = trace_attention(heads, 2, layer=1, agg_heads="none", top_beam=2, top_k=4)
    # Chain mode in layer 1, per head: 2 →(h1 .95) 1 →(h1 .8) 0, scoring (ln .95 + ln .8)/2.
    assert (chain[0].positions, chain[0].heads) == ([2, 1, 0], [1, 1])
    assert chain[0].score_norm == pytest.approx((ln(0.95) + ln(0.8)) / 2)


def all_paths(stack, target, chain, per_head, rollout, stop):
    """Every complete path, by recursion (the independent oracle)."""
    n_layers, n_heads, n, _ = stack.shape
    out = []

    def walk(step, pos, path):
        layer = n_layers - 1 if chain else n_layers - 1 - step
        if (chain and pos == 0) or (not chain and step == n_layers):
            out.append(path)
            return
        extended = False
        rows = stack[layer, :, pos].clone()
        if rollout:
            rows = 0.5 * rows + 0.5 * torch.nn.functional.one_hot(torch.tensor(pos), n)
        for k in range(pos if chain else pos + 1):
            # one edge per key: its strongest head, the lowest among equals
            weights = [float(rows[h, k]) for h in range(n_heads)]
            h = weights.index(max(weights))
            if weights[h] > 0:
                extended = True
                edge = (layer, h if per_head else None, k, weights[h])
                if k in stop:
                    out.append(path + [edge])
                else:
                    walk(step + 1, k, path + [edge])
        if not extended:
            out.append(path)

    walk(0, target, [])
    return out


@pytest.mark.parametrize("seed", range(40))
def test_exhaustive_beam_search_equals_path_enumeration(seed):
    gen = torch.Generator().manual_seed(seed)
    chain = seed % 2 == 0
    per_head = seed % 4 < 2
    rollout = not chain and seed % 3 == 0
    n, n_heads = 5, 2
    logits = torch.randn(2, n_heads, n, n, generator=gen) * 2
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    stack = logits.masked_fill(~causal, float("-inf")).softmax(-1)
    stack[stack < 0.08] = 0.0  # some zero entries: fewer candidates, some dead ends
    stack = stack if per_head else stack.mean(1, keepdim=True)
    paths = all_paths(stack, n - 1, chain, per_head, rollout, stop={0})
    beams = trace_attention(
        stack,
        n - 1,
        layer=1 if chain else None,
        layers=None if chain else (0, 1),
        agg_heads="none" if per_head else "mean",
        top_beam=10_000,
        top_k=n * n_heads,
        residual="rollout" if rollout else None,
    )
    expected = sorted(
        (
            (
                sum(ln(w) for *_, w in p) / max(len(p), 1),
                [n - 1] + [k for _, _, k, _ in p],
                [h for _, h, _, _ in p],
            )
            for p in paths
        ),
        key=lambda e: -e[0],
    )
    assert len(beams) == len(expected)
    assert [b.score_norm for b in beams] == pytest.approx([e[0] for e in expected])
    assert sorted((b.positions, b.heads) for b in beams) == sorted((e[1], e[2]) for e in expected)


def test_stop_at_bos_and_exclude_bos():
    A = torch.tensor([[1.0, 0, 0, 0], [0.9, 0.1, 0, 0], [0.1, 0.8, 0.1, 0], [0.6, 0.1, 0.3, 0.0]])
    # Position 1 is a BOS: with stop_at_bos the best path ends there, without it goes on to 0.
    assert trace_attention(A, 3, top_beam=1, bos_positions=[1])[0].positions == [3, 0]
    stop = trace_attention(A, 3, top_beam=5, bos_positions=[1])
    assert [3, 2, 1] in [b.positions for b in stop]
    assert [3, 2, 1, 0] not in [b.positions for b in stop]
    go_on = trace_attention(A, 3, top_beam=5, bos_positions=[1], stop_at_bos=False)
    assert [3, 2, 1, 0] in [b.positions for b in go_on]
    # exclude_bos leaves BOS and position 0 out: the sink edge 3→0 (0.6) is gone, and each edge
    # reports how much of its row sat on the sinks.
    ex = trace_attention(A, 3, top_beam=5, bos_positions=[1], exclude_bos=True)
    assert [b.positions for b in ex] == [[3, 2]]
    assert ex[0].bos_mass == pytest.approx([0.7])


def test_min_attn_and_mask_remove_candidates():
    A = torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0], [0.45, 0.1, 0.45]])
    assert [b.positions for b in trace_attention(A, 2, top_beam=5, min_attn=0.2)] == [[2, 0]]
    masked = trace_attention(A, 2, top_beam=5, attention_mask=torch.tensor([0, 1, 1]))
    assert [b.positions for b in masked] == [[2, 1]]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(agg_heads="sum"), "agg_heads='sum' not in"),
        (dict(length_norm="avg"), "length_norm='avg' not in"),
        (dict(length_norm="pow:x"), "length_norm='pow:x' is malformed"),
        (dict(length_norm="pow:"), "length_norm='pow:' is malformed"),
        (dict(residual="skip", layers=(0, 1)), "residual='skip' not in"),
        (dict(residual="rollout"), "residual='rollout' needs layers mode"),
        (dict(top_beam=0), "top_beam must be >= 1, got 0"),
        (dict(top_k=-1), "top_k must be >= 1, got -1"),
        (dict(layer=2), "layer=2 out of range for n_layers 2"),
        (dict(layers=(1, 0)), "layers=(1, 0) is empty"),
        (dict(layers=(0, 5)), "layers[1]=5 out of range"),
        (dict(target=3), "target_pos=3 out of range for sequence length 3"),
        (dict(target=-4), "target_pos=-4 out of range"),
        (dict(attention_mask=torch.ones(4)), "attention_mask has shape (4,)"),
    ],
)
def test_bad_options_raise_one_clear_error(kwargs, message):
    target = kwargs.pop("target", -1)
    with pytest.raises(
        RatLensError,
        match=message.replace("(", r"\(")
        .replace(")", r"\)")
        .replace("[", r"\[")
        .replace("]", r"\]"),
    ):
        trace_attention(STACK, target, **kwargs)


def test_bad_tensors_raise_one_clear_error():
    with pytest.raises(RatLensError, match="NaN"):
        trace_attention(torch.tensor([[1.0, 0.0], [float("nan"), 0.5]]))
    with pytest.raises(RatLensError, match=r"got shape \(2, 3\)"):
        trace_attention(torch.ones(2, 3))


def test_bad_types_raise_one_error_class_naming_the_value(no_typecheck):
    with pytest.raises(RatLensError, match="target_pos must be an int, got 1.5"):
        trace_attention(A0, 1.5)
    with pytest.raises(RatLensError, match="attn must be a torch.Tensor, got list"):
        trace_attention(A0.tolist())


# Ties in layers mode and per-head chains (reverse-attention has neither, so the rule is ours):
# among equal weights the lower head comes first, then the earlier key (a stable sort over the
# head·key axis); equal scores keep that expansion order in every cut and in the final ranking.


def test_layers_mode_ties_go_to_the_lower_head_then_the_earlier_key():
    row_h0 = torch.full((5,), 0.2)  # five keys tied at 0.2
    row_h1 = torch.tensor([0.1, 0.2, 0.3, 0.2, 0.2])  # 0.3 best; three more ties at 0.2
    stack = torch.zeros(1, 2, 5, 5)
    stack[0, 0, 4], stack[0, 1, 4] = row_h0, row_h1
    beams = trace_attention(stack, 4, layers=(0, 0), agg_heads="none", top_beam=10, top_k=6)
    # One edge per key, through its strongest head: key 2 by head 1 (0.3); keys 0, 1, 3, 4 by
    # head 0 (0.2; on keys 1, 3, 4 head 1 ties, and the lower head wins). The four tied beams
    # end after the one layer, in expansion order (earlier key first).
    assert summary(beams) == [
        ([4, 2], [0.3], [0], [1]),
        ([4, 0], [0.2], [0], [0]),
        ([4, 1], [0.2], [0], [0]),
        ([4, 3], [0.2], [0], [0]),
        ([4, 4], [0.2], [0], [0]),
    ]
    mean = trace_attention(stack, 4, layers=(0, 0), top_beam=10, top_k=3)
    # Head mean [0.15, 0.2, 0.25, 0.2, 0.2]: 0.25, then keys 1 and 3 of the three tied at 0.2.
    assert [b.positions for b in mean] == [[4, 2], [4, 1], [4, 3]]


def test_per_head_chain_ties_go_to_the_lower_head_then_the_earlier_key():
    uniform = torch.ones(4, 4).tril()
    uniform = uniform / uniform.sum(-1, keepdim=True)
    stack = torch.stack([uniform, uniform])[None]  # two identical heads: all tied twice
    beams = trace_attention(stack, 3, agg_heads="none", top_beam=1, top_k=3)
    # Row 3 (1/4 each): (h0, 0), (h0, 1), (h0, 2). [3, 0] ends; [3, 1] and [3, 2] tie and the
    # cut to one beam keeps [3, 1], which goes to 0 by (h0, 0) then (h1, 0), both 1/2: of the
    # tied finished beams the first one wins.
    assert summary(beams) == [([3, 1, 0], [0.25, 0.5], [0, 0], [0, 0])]


def reference_search(mats, target, *, chain, top_beam, top_k, min_attn, stops, rollout, norm):
    """The documented rule on Python lists, one beam at a time: candidates sorted by (weight
    descending, head, key); stable cuts by normalised score; ended beams in the order they end."""
    n_heads, n = mats[0].shape[0], mats[0].shape[-1]
    score = lambda b: b[3] / length_norm_denominator(norm, len(b[1]))  # noqa: E731
    live, ended = [([target], [], [], 0.0)], []
    n_steps = target + 1 if chain else len(mats)
    if target == 0:
        live, ended = [], live
    for t in range(n_steps):
        new = []
        for beam in live:
            pos = beam[0][-1]
            best = {}  # key -> (-w, h): each key's strongest head, the lowest among equals
            for h in range(n_heads):
                row = mats[0 if chain else t][h, pos]
                if rollout:
                    row = 0.5 * row + 0.5 * torch.nn.functional.one_hot(torch.tensor(pos), n)
                for k, w in enumerate(row.tolist()[: pos if chain else pos + 1]):
                    if w > 0 and w >= min_attn and (k not in best or -w < best[k][0]):
                        best[k] = (-w, h)
            cands = [(w, h, k) for k, (w, h) in best.items()]
            if not cands:
                ended.append(beam)
            for w, h, k in sorted(cands)[:top_k]:
                positions, weights, heads, raw = beam
                new.append(([*positions, k], [*weights, -w], [*heads, h], raw + math.log(-w)))
        done = [b[0][-1] in stops or (not chain and t == n_steps - 1) for b in new]
        ended += [b for b, d in zip(new, done) if d]
        live = sorted([b for b, d in zip(new, done) if not d], key=lambda b: -score(b))
        live = live[:top_beam]
        if not live:
            break
    return [(*b, score(b)) for b in sorted(ended, key=lambda b: -score(b))[:top_beam]]


def tied_stack(gen, kind, n_layers, n_heads, n):
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    if kind == "uniform":
        raw = causal.float().expand(n_layers, n_heads, n, n)
    else:  # weights on 2 or 3 levels (some exact zeros), so rows and heads share values
        raw = torch.randint(0, 3, (n_layers, n_heads, n, n), generator=gen).float() * causal
        raw = raw + torch.eye(n)  # no empty row
    return raw / raw.sum(-1, keepdim=True)


@pytest.mark.parametrize("seed", range(120))
def test_tie_order_matches_the_reference_on_tied_attention(seed):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    # Chains only per head, two heads or more: a chain in one matrix is the peer's mode.
    chain = seed % 3 == 0
    per_head = chain or seed % 3 == 1
    n_layers, n_heads, n = 3, rng.choice([2, 3] if chain else [1, 2, 3]), rng.randint(2, 12)
    kind = rng.choice(["uniform", "levels", "levels"])
    stack = tied_stack(gen, kind, n_layers, n_heads, n)
    stack = stack.double() if rng.random() < 0.15 else stack
    bos = rng.sample(range(1, n), 1) if rng.random() < 0.3 else []
    opts = dict(
        top_beam=rng.randint(1, 4),
        top_k=rng.randint(1, 4),
        min_attn=rng.choice([0.0, 0.0, 0.1]),
        length_norm=rng.choice(["avg_logprob", "none", "sqrt"]),
        stop_at_bos=rng.random() < 0.8,
        residual="rollout" if not chain and rng.random() < 0.3 else None,
    )
    target = rng.randint(n // 2, n - 1)
    beams = trace_attention(
        stack,
        target,
        layer=1 if chain else None,
        layers=None if chain else (0, 2),
        agg_heads="none" if per_head else "mean",
        bos_positions=bos,
        **opts,
    )
    agg = stack if per_head else stack.mean(1, keepdim=True)
    expected = reference_search(
        [agg[1]] if chain else [agg[2], agg[1], agg[0]],
        target,
        chain=chain,
        top_beam=opts["top_beam"],
        top_k=opts["top_k"],
        min_attn=opts["min_attn"],
        stops={0, *bos} if opts["stop_at_bos"] else {0},
        rollout=opts["residual"] == "rollout",
        norm=opts["length_norm"],
    )
    got = [(b.positions, b.edge_weights, b.heads, b.score_raw, b.score_norm) for b in beams]
    assert got == [
        (pos, weights, heads if per_head else [None] * len(heads), raw, norm)
        for pos, weights, heads, raw, norm in expected
    ]
