"""Properties every trace has, whatever the attention: hypothesis draws the matrices and options."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rat_lens.options import length_norm_denominator
from rat_lens.search.beam import trace_attention
from rat_lens.search.pattern import aggregate_heads


@st.composite
def traces(draw):
    n_layers, n_heads = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    n = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([0.5, 2.0, 6.0]))
    logits = torch.randn(n_layers, n_heads, n, n, generator=gen) * scale
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    attn = logits.masked_fill(~causal, float("-inf")).softmax(-1)
    chain = draw(st.booleans())
    lo = draw(st.integers(0, n_layers - 1))
    layer = draw(st.integers(0, n_layers - 1))
    options = dict(
        target_pos=draw(st.integers(0, n - 1)),
        layer=layer if chain else None,  # layer and layers together are refused
        layers=None if chain else (lo, draw(st.integers(lo, n_layers - 1))),
        top_beam=draw(st.integers(1, 6)),
        top_k=draw(st.integers(1, 6)),
        min_attn=draw(st.sampled_from([0.0, 0.05, 0.3])),
        agg_heads=draw(st.sampled_from(["mean", "max", "none"])),
        length_norm=draw(st.sampled_from(["none", "avg_logprob", "sqrt", "pow:0.6"])),
        stop_at_bos=draw(st.booleans()),
        bos_positions=draw(st.lists(st.integers(0, n - 1), max_size=2, unique=True)),
        residual=None if chain else draw(st.sampled_from([None, "rollout"])),
        exclude_bos=draw(st.booleans()),
    )
    return attn, options


@settings(max_examples=300, deadline=None)
@given(traces())
def test_trace_invariants(case):
    attn, opts = case
    beams = trace_attention(attn, **opts)
    chain = opts["layers"] is None
    agg = aggregate_heads(attn, opts["agg_heads"])
    n = attn.shape[-1]
    assert 1 <= len(beams) <= opts["top_beam"]

    scores = [b.score_norm for b in beams]
    assert scores == sorted(scores, reverse=True)
    for b in beams:
        assert b.positions[0] == opts["target_pos"]
        steps = list(zip(b.positions, b.positions[1:]))
        if chain:
            assert all(q > k for q, k in steps)  # strictly earlier at every hop
            assert set(b.layers) <= {opts["layer"]}
        else:
            assert all(q >= k for q, k in steps)
            hi = opts["layers"][1]
            assert b.layers == list(range(hi, hi - b.num_edges, -1))  # one layer down per edge
            assert b.layers == [] or b.layers[-1] >= opts["layers"][0]
        for (q, k), w, layer, head in zip(steps, b.edge_weights, b.layers, b.heads):
            # Every edge weight is the attention entry it names.
            entry = agg[layer, 0 if head is None else head, q, k]
            if opts["residual"] == "rollout":
                entry = 0.5 * entry + 0.5 * (q == k)
            assert math.isclose(w, float(entry), rel_tol=1e-6)
            assert w >= opts["min_attn"] and w > 0
            if opts["exclude_bos"]:
                assert k != 0 and k not in opts["bos_positions"]
        assert (opts["agg_heads"] == "none") == all(h is not None for h in b.heads) or not b.heads
        # Scores recompute from the edges.
        raw = sum(math.log(w) for w in b.edge_weights)
        assert math.isclose(b.score_raw, raw, rel_tol=1e-9, abs_tol=1e-9)
        norm = raw / length_norm_denominator(opts["length_norm"], b.num_edges)
        assert math.isclose(b.score_norm, norm, rel_tol=1e-9, abs_tol=1e-9)
        # A path ends only where it must: position 0, a BOS it may stop at, the lowest layer,
        # or a row with no candidate left.
        last = b.positions[-1]
        at_stop = last == 0 or (
            opts["stop_at_bos"] and b.num_edges and last in opts["bos_positions"]
        )
        bottom = not chain and b.num_edges == opts["layers"][1] - opts["layers"][0] + 1
        if not (at_stop or bottom):
            layer = opts["layer"] if chain else opts["layers"][1] - b.num_edges
            row = agg[layer, :, last].clone()
            if opts["residual"] == "rollout":
                row = 0.5 * row + 0.5 * torch.nn.functional.one_hot(torch.tensor(last), n)
            keys = torch.arange(n)
            ok = (keys < last) if chain else (keys <= last)
            if opts["exclude_bos"]:
                ok &= (keys != 0) & ~torch.isin(
                    keys, torch.tensor(opts["bos_positions"], dtype=torch.long)
                )
            candidates = row[:, ok]
            assert not ((candidates >= opts["min_attn"]) & (candidates > 0)).any()
