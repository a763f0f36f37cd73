"""Contribution weights equal a straightforward full decomposition of the attention block."""

import math

import pytest
import torch
from conftest import hook_count
from test_capture import tiny_hf_bridge

from rat_lens import RatLensError
from rat_lens.capture import capture_contributions
from rat_lens.models import available_sources, load, repeated_tokens


def naive_parts(model, tokens, layer):
    """Every part of every row, by loops in float64: (terms [h, q, k, d], x [q, d], b_O, cache)."""
    _, cache = model.run_with_cache(tokens)
    A = cache[f"blocks.{layer}.attn.hook_pattern"][0].double()
    v = cache[f"blocks.{layer}.attn.hook_v"][0].double()
    x = cache[f"blocks.{layer}.hook_resid_pre"][0].double()
    attn = model.blocks[layer].attn
    W_O = attn.W_O.detach().double()
    b_O = getattr(attn, "b_O", None)
    n_heads, seq = A.shape[0], A.shape[-1]
    group = n_heads // v.shape[1]
    terms = torch.zeros(n_heads, seq, seq, W_O.shape[-1], dtype=torch.float64)
    for h in range(n_heads):
        for k in range(seq):
            written = v[k, h // group] @ W_O[h]
            for q in range(k, seq):
                terms[h, q, k] = A[h, q, k] * written
    return terms, x, None if b_O is None else b_O.detach().double(), cache


def naive_shares(terms, x, b_O, weight):
    n_heads, seq = terms.shape[:2]
    out = torch.zeros(n_heads + 1, seq, seq, dtype=torch.float64)
    for q in range(seq):
        parts = [(h, k, terms[h, q, k]) for h in range(n_heads) for k in range(q + 1)]
        y = x[q] + sum(t for _, _, t in parts) + (0 if b_O is None else b_O)
        if weight == "value_norm":
            score = {(h, k): float(t.norm()) for h, k, t in parts}
            stay = float(x[q].norm())
        else:
            score = {
                (h, k): max(0.0, float(y.abs().sum() - (y - t).abs().sum())) for h, k, t in parts
            }
            stay = max(0.0, float(y.abs().sum() - (y - x[q]).abs().sum()))
        total = sum(score.values()) + stay
        for (h, k), s in score.items():
            out[h, q, k] = s / total
        out[n_heads, q, q] = stay / total
    return out


@pytest.fixture(scope="module", params=["gpt2", "qwen2"])
def hf_bridge(request):
    return tiny_hf_bridge(request.param)


@pytest.mark.parametrize("weight", ["contribution", "value_norm"])
def test_shares_equal_the_full_decomposition_on_hf_models(hf_bridge, weight):
    """GPT-2 (fused QKV, b_O) and Qwen2 (rotary, 2 KV heads for 4 query heads, no b_O)."""
    tokens = torch.randint(1, 64, (1, 12), generator=torch.Generator().manual_seed(0))
    for layer in (0, 1):
        terms, x, b_O, cache = naive_parts(hf_bridge, tokens, layer)
        # The decomposition is the block: the parts sum to the attention output and the stream.
        attn_out = terms.sum(dim=(0, 2)) + (0 if b_O is None else b_O)
        torch.testing.assert_close(
            attn_out, cache[f"blocks.{layer}.hook_attn_out"][0].double(), atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(
            x + attn_out, cache[f"blocks.{layer}.hook_resid_mid"][0].double(), atol=1e-5, rtol=1e-5
        )
        ours = capture_contributions(hf_bridge, tokens, [layer], weight)[layer][0].double()
        torch.testing.assert_close(ours, naive_shares(terms, x, b_O, weight), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(
            ours.sum(dim=(0, 2)), torch.ones(12, dtype=torch.float64), atol=1e-5, rtol=0
        )
    assert hook_count(hf_bridge) == 0


def test_shares_on_the_embedded_model_and_its_induction_edge(model):
    """On the induction model the layer-1 heads' biggest part at a repeated token is the token
    after its earlier copy, and the model is left as it was."""
    tokens = repeated_tokens(1, prefix_len=12, repeat_len=6, seed=0)
    with torch.no_grad():
        before = model(tokens).clone()
    terms, x, b_O, _ = naive_parts(model, tokens, 1)
    shares = capture_contributions(model, tokens, [1])[1][0]
    torch.testing.assert_close(
        shares.double(), naive_shares(terms, x, b_O, "contribution"), atol=1e-5, rtol=1e-4
    )
    n_heads = shares.shape[0] - 1
    for q in range(13, 19):  # the repeat: token q equals token q - 12
        heads_only = shares[:n_heads, q].sum(0)
        assert int(heads_only.argmax()) == q - 11
    assert hook_count(model) == 0
    with torch.no_grad():
        assert torch.equal(model(tokens), before)


def test_bad_requests_are_named(model):
    tokens = repeated_tokens(1, prefix_len=6, repeat_len=3, seed=0)
    with pytest.raises(RatLensError, match="within 0..1"):
        capture_contributions(model, tokens, [4])
    with pytest.raises(RatLensError, match="weight='attention' not in"):
        capture_contributions(model, tokens, [1], weight="attention")
    assert hook_count(model) == 0


def enumerate_routes(shares, target, threshold=0.04, discount=0.5):
    """Every path down the layers (top first) by loops. At each layer a path stays (the
    residual channel plus every head's read of its own position, free) or moves to an earlier
    key through that key's strongest head (the lowest among equals); it ends at the bottom or at
    position 0. The i-th move scores discount**(i-1) * log(weight / threshold); paths that never
    leave the target are no routes."""
    n_layers, n_parts = shares.shape[:2]
    found = []

    def walk(t, pos, edges):
        if t == n_layers or (edges and pos == 0):  # position 0 ends a path: nothing earlier
            moves = [w for kind, _, _, w in edges if kind == "head"]
            if moves:
                score = sum(
                    discount**i * math.log(max(w, 1e-12) / threshold) for i, w in enumerate(moves)
                )
                found.append(
                    (score, [target] + [k for _, _, k, _ in edges], [h for _, h, _, _ in edges])
                )
            return
        layer = n_layers - 1 - t
        for k in range(pos):
            weights = [float(shares[layer, h, pos, k]) for h in range(n_parts - 1)]
            h = weights.index(max(weights))
            if weights[h] > 0:
                walk(t + 1, k, edges + [("head", h, k, weights[h])])
        w = float(shares[layer, :, pos, pos].sum())
        if w > 0:
            walk(t + 1, pos, edges + [("residual", None, pos, w)])

    walk(0, target, [])
    return sorted(found, key=lambda e: -e[0])


@pytest.mark.parametrize("seed", range(6))
def test_residual_stays_are_free_and_routes_are_ranked_by_their_moves(seed):
    """The search with a residual channel equals exhaustive enumeration of every route."""
    from rat_lens import trace_attention

    gen = torch.Generator().manual_seed(seed)
    n, heads = 4, 2
    raw = torch.rand(3, heads + 1, n, n, generator=gen) * torch.ones(n, n).tril()
    raw[:, heads] = torch.diag_embed(torch.rand(3, n, generator=gen) + 0.5)  # the residual
    shares = raw / raw.sum(dim=(1, 3), keepdim=True)
    expected = enumerate_routes(shares, n - 1)
    beams = trace_attention(
        shares,
        n - 1,
        layers=(0, 2),
        agg_heads="none",
        edge_weight="contribution",
        top_beam=10_000,
        top_k=heads * n + 1,
        stop_at_bos=False,
    )
    assert len(beams) == len(expected)
    for beam, (score, _, _) in zip(beams[:20], expected[:20]):
        assert beam.score_norm == pytest.approx(score, abs=1e-9)

    def key(positions, heads):  # None (a stay) sorts before every head
        return positions, [-1 if h is None else h for h in heads]

    assert sorted(key(b.positions, b.heads) for b in beams) == sorted(
        key(p, h) for _, p, h in expected
    )
    for beam in beams:
        assert any(p != n - 1 for p in beam.positions)
        for i, (kind, pos) in enumerate(zip(beam.kinds, beam.positions)):
            layer = beam.layers[i]
            if kind == "residual":  # the residual stream and every head's read of pos itself
                assert beam.heads[i] is None and beam.positions[i + 1] == pos
                assert beam.edge_weights[i] == pytest.approx(
                    float(shares[layer, :, pos, pos].sum())
                )
            else:
                assert beam.positions[i + 1] < pos
                assert beam.edge_weights[i] == pytest.approx(
                    float(shares[layer, beam.heads[i], pos, beam.positions[i + 1]])
                )


def stays_stack(moves: dict, n: int = 4, n_layers: int = 3) -> torch.Tensor:
    """[layer, head + 1, q, k] shares of one head: ``moves[(layer, q, k)] = share``; the rest
    of each row is the residual stream (on the diagonal)."""
    shares = torch.zeros(n_layers, 2, n, n)
    for q in range(n):
        shares[:, 1, q, q] = 1.0
    for (layer, q, k), w in moves.items():
        shares[layer, 0, q, k] = w
        shares[layer, 1, q, q] -= w
    return shares


def test_the_beam_still_at_the_target_is_never_pruned():
    """A weak move high up (just over the threshold) must not crowd out the one beam that has
    not moved yet: with one beam, the strong move two layers lower still wins."""
    from rat_lens import trace_attention

    shares = stays_stack({(2, 3, 2): 0.05, (1, 3, 1): 0.6})
    kw = dict(layers=(0, 2), agg_heads="none", edge_weight="value_norm", stop_at_bos=False)
    best = trace_attention(shares, 3, top_beam=1, **kw)[0]
    assert (best.positions, best.kinds) == ([3, 3, 1, 1], ["residual", "head", "residual"])
    assert best.score_raw == pytest.approx(math.log(0.6 / 0.04))
    assert best.positions == enumerate_routes(shares, 3)[0][1]


def test_a_second_move_above_the_threshold_extends_the_route():
    """Averaging would stop after the strongest move (0.3 > 0.1); against the threshold the
    second move adds discount * log(0.1 / threshold) and the longer route ranks first."""
    from rat_lens import trace_attention

    shares = stays_stack({(2, 3, 2): 0.3, (1, 2, 1): 0.1})
    kw = dict(layers=(0, 2), agg_heads="none", edge_weight="contribution", stop_at_bos=False)
    beams = trace_attention(shares, 3, **kw)
    assert beams[0].positions == [3, 2, 1, 1]
    assert beams[0].score_raw == pytest.approx(math.log(0.3 / 0.04) + 0.5 * math.log(0.1 / 0.04))
    assert [b.positions for b in beams[:2]] == [p for _, p, _ in enumerate_routes(shares, 3)[:2]]
    # a threshold above the second move's share: the short route wins
    short = trace_attention(shares, 3, move_threshold=0.2, **kw)[0]
    assert short.positions == [3, 2, 2, 2]
    # no discount: both moves count fully
    flat = trace_attention(shares, 3, depth_discount=1.0, **kw)[0]
    assert flat.score_raw == pytest.approx(math.log(0.3 / 0.04) + math.log(0.1 / 0.04))


@pytest.mark.parametrize(
    "given, message",
    [
        (dict(move_threshold=0.0), r"move_threshold must be in \(0, 1\], got 0.0"),
        (dict(depth_discount=1.5), r"depth_discount must be in \(0, 1\], got 1.5"),
        (dict(depth_discount="x"), "depth_discount must be a finite number, got 'x'"),
        (dict(edge_weight="attention", move_threshold=0.1), "need edge_weight='contribution'"),
    ],
)
def test_route_scoring_options_are_checked(given, message, no_typecheck):
    from rat_lens.options import TraceOptions

    kw = dict(layers=(0, 1), agg_heads="none", edge_weight="contribution") | given
    with pytest.raises(RatLensError, match=message):
        TraceOptions(**kw)


def test_length_norm_follows_the_edge_weight_unless_given():
    from rat_lens.options import TraceOptions

    contrib = dict(layers=(0, 1), agg_heads="none", edge_weight="contribution")
    assert TraceOptions(layer=-1).resolve().length_norm == "avg_logprob"
    assert TraceOptions(**contrib).resolve().length_norm == "none"
    assert TraceOptions(length_norm="sqrt", **contrib).resolve().length_norm == "sqrt"


def test_a_contribution_trace_round_trips_summarises_and_verifies(model):
    import rat_lens
    from rat_lens.summary import summarize

    tokens = repeated_tokens(1, prefix_len=12, repeat_len=6, seed=0)
    result = rat_lens.trace(
        model, tokens[0], layers=(0, 1), agg_heads="none", edge_weight="contribution"
    )
    assert result.beams and all(len(b.kinds) == b.num_edges for b in result.beams)
    assert rat_lens.TraceResult.from_json(result.to_json()) == result
    assert (result.move_threshold, result.depth_discount) == (0.04, 0.5)
    data = result.to_dict() | {"edge_weight": "attention"}
    with pytest.raises(RatLensError, match="move_threshold is set, but edge_weight is .attention."):
        rat_lens.TraceResult.from_dict(data)
    assert any(" stays L" in line for line in result.paths_text) or all(
        k == "head" for b in result.beams for k in b.kinds
    )
    summary = summarize(result)
    assert all(h.head is not None for h in summary.heads)  # stays are no head's mass
    verifiable = model
    if type(model).__name__ == "TransformerBridge" and "hooked" in available_sources():
        # TL 3.9's native bridge ignores pattern edits (docs/verify.md): verify on its twin
        verifiable = load("induction-2l", source="hooked")
    check = rat_lens.verify(verifiable, result, n_random=3)
    for beam, effect in zip(result.beams, check.beams):
        assert len(effect.edges) == sum(k == "head" for k in beam.kinds)
    assert hook_count(model) == 0


def test_predictions_come_from_the_contribution_forward(model):
    """The contribution forward runs to the end: its logits give the predictions (no second
    forward), equal to an attention trace's at the target."""
    import rat_lens

    tokens = repeated_tokens(1, prefix_len=12, repeat_len=6, seed=2)[0]
    options = dict(layers=(0, 1), agg_heads="none", predictions=3)
    ours = rat_lens.trace(model, tokens, edge_weight="contribution", **options)
    plain = rat_lens.trace(model, tokens, **options)
    at_target = [p for p in ours.predictions if p.position == ours.target_pos]
    assert at_target and at_target[0].token_ids == plain.predictions[0].token_ids
    assert at_target[0].probs == pytest.approx(plain.predictions[0].probs, abs=1e-6)
