"""The model-facing tracer: same beams as the tensor search on run_with_cache, one forward for a
whole batch of prompts and targets, RAT's result shape, the known induction circuit, bad input."""

import json
import random

import pytest
import torch
from conftest import SOURCES, hook_count
from transformer_lens.head_detector import detect_head

import rat_lens
from rat_lens import RatLensError, ReverseAttentionTracer, TraceResult, trace_attention
from rat_lens.models import load, repeated_tokens
from rat_lens.summary import summarize

# What a trace from cache= reads: patterns, and for value_norm edges the values and stream.
NAMES = lambda name: name.endswith(("hook_pattern", "hook_v", "hook_resid_pre"))  # noqa: E731


def beams_key(beams):
    return [(b.positions, b.layers, b.heads) for b in beams]


def assert_same_beams(got, expected):
    """Same paths in the same order; weights and scores equal up to float rounding."""
    assert beams_key(got) == beams_key(expected)
    for g, e in zip(got, expected):
        assert g.edge_weights == pytest.approx(e.edge_weights, abs=1e-6)
        assert g.score_norm == pytest.approx(e.score_norm, abs=1e-6)


@pytest.mark.parametrize(
    "opts",
    [
        dict(layer=1),
        dict(layer=0, agg_heads="max", length_norm="sqrt"),
        dict(layers=(0, 1), agg_heads="mean"),
        dict(layers=(0, 1), agg_heads="none", top_k=8, edge_weight="attention"),
        dict(layers=(0, 1), agg_heads="mean", residual="rollout", exclude_bos=True),
        dict(layer=-1, agg_heads="none"),
    ],
)
def test_trace_equals_the_tensor_search_on_run_with_cache(model, opts):
    tokens = repeated_tokens(1, prefix_len=20, repeat_len=9, seed=11)
    result = ReverseAttentionTracer(model).trace(tokens, -1, **opts)
    _, cache = model.run_with_cache(tokens, names_filter=NAMES)
    stack = torch.stack([cache["pattern", layer][0] for layer in range(2)])
    bos = (tokens[0] == 0).nonzero()[:, 0].tolist()
    expected = trace_attention(stack, -1, bos_positions=bos, **opts)
    assert_same_beams(result.beams, expected)
    assert hook_count(model) == 0


def test_result_has_reverse_attentions_fields_and_round_trips_json(model):
    tracer = ReverseAttentionTracer(model)
    result = tracer.trace_text(
        "cat dog red blue green cat dog red", layers=(0, 1), agg_heads="none"
    )
    assert (result.seq_len, result.target_pos, result.layer, result.layer_lo) == (9, 8, 1, 0)
    assert result.tokens[0] == "<bos>" and result.tokens[1:4] == ["cat", "dog", "red"]
    best = result.beams[0]
    assert best.tokens == [result.tokens[p] for p in best.positions]
    assert best.token_ids == [result.token_ids[p] for p in best.positions]
    assert len(result.paths_text) == len(result.beams)
    assert result.paths_text[0].startswith("'red'@8 ←L1.H") and result.paths_text[0].endswith(")")
    links = {(lk.source, lk.target) for lk in result.sankey.links}
    assert (f"L0_P{best.positions[1]}", "L1_P8") in links
    again = TraceResult.from_json(json.loads(json.dumps(result.to_json())))
    assert again == result
    assert "TraceResult(target_pos=8, layers=0..1" in repr(result)


def test_batch_of_padded_prompts_and_many_targets_is_one_forward(model):
    tracer = ReverseAttentionTracer(model)
    texts = ["cat dog red blue cat dog", "sun moon star sun moon star sea sky sun"]
    forwards = []
    with model.hooks(
        fwd_hooks=[("blocks.0.attn.hook_pattern", lambda p, hook: forwards.append(p.shape[0]))]
    ):
        results = tracer.trace_batch(
            texts, [-1, -2, 3], layers=(0, 1), agg_heads="none", edge_weight="attention"
        )
    assert forwards == [2]  # one forward for 2 prompts × 3 targets
    assert [(r.batch_index, r.target_pos) for r in results] == [
        (0, 6),
        (0, 5),
        (0, 3),
        (1, 9),
        (1, 8),
        (1, 3),
    ]
    for r in results:  # each equals the same prompt traced alone, unpadded
        alone = tracer.trace_text(
            texts[r.batch_index],
            r.target_pos,
            layers=(0, 1),
            agg_heads="none",
            edge_weight="attention",
        )
        assert_same_beams(r.beams, alone.beams)


def test_padded_prompts_with_contribution_edges_equal_each_prompt_alone(model):
    """Per-head layers traces weigh edges by value_norm unless told: a padded batch runs each
    prompt on its own real tokens, with the results of tracing it alone."""
    tracer = ReverseAttentionTracer(model)
    texts = ["cat dog red blue cat dog", "sun moon star sun moon star sea sky sun"]
    results = tracer.trace_batch(texts, [-1, 3], layers=(0, 1), agg_heads="none", predictions=2)
    assert {r.edge_weight for r in results} == {"value_norm"}
    for r in results:
        alone = tracer.trace_text(
            texts[r.batch_index], r.target_pos, layers=(0, 1), agg_heads="none", predictions=2
        )
        assert_same_beams(r.beams, alone.beams)
        assert [b.kinds for b in r.beams] == [b.kinds for b in alone.beams]
        assert [p.token_ids for p in r.predictions] == [p.token_ids for p in alone.predictions]


def test_reusing_a_cache_gives_the_same_result_without_a_forward(model):
    tokens = repeated_tokens(2, prefix_len=15, repeat_len=7, seed=12)
    _, cache = model.run_with_cache(tokens, names_filter=NAMES)
    tracer = ReverseAttentionTracer(model)
    fresh = tracer.trace_batch(tokens, [-1, 10], layers=(0, 1))
    forwards = []
    with model.hooks(
        fwd_hooks=[("blocks.0.attn.hook_pattern", lambda p, hook: forwards.append(1))]
    ):
        reused = tracer.trace_batch(tokens, [-1, 10], layers=(0, 1), cache=cache)
    assert forwards == []
    for r, f in zip(reused, fresh, strict=True):
        assert_same_beams(r.beams, f.beams)


def test_functional_form_and_token_ids_without_tokenizer(model):
    tokens = repeated_tokens(1, prefix_len=10, repeat_len=5, seed=13)
    by_ids = rat_lens.trace(model, tokens[0], layers=(0, 1))
    by_text = rat_lens.trace(model, " ".join(by_ids.tokens[1:]), layers=(0, 1))
    assert_same_beams(by_ids.beams, by_text.beams)

    class NoTokenizer:  # a model whose tokenizer is missing: ids are shown as numbers
        def __init__(self, model):
            self.hook_dict, self.hooks, self.tokenizer = model.hook_dict, model.hooks, None
            self.forward = model

        def __call__(self, *args, **kwargs):
            return self.forward(*args, **kwargs)

    bare = ReverseAttentionTracer(NoTokenizer(model)).trace(tokens, bos_token_id=0)
    assert bare.tokens == [str(t) for t in tokens[0].tolist()]
    with pytest.raises(RatLensError, match="no tokenizer"):
        ReverseAttentionTracer(NoTokenizer(model)).trace_text("cat dog")


def induction_heads(model, tokens):
    """Head roles by TransformerLens's own detector (the oracle for which heads do what)."""
    texts = [model.tokenizer.decode(row[1:]) for row in tokens]  # it re-tokenizes, adding BOS

    def scores(kind):
        return detect_head(model, texts, kind, exclude_bos=True)

    return scores("induction_head"), scores("previous_token_head")


def test_top_beam_follows_the_induction_circuit_on_many_prompts(model):
    """BOS x1..xm x1..xj: from the last x_j, layer 1 (an induction head) goes to the token after
    the earlier x_j (position j+1), then layer 0 (a previous-token head) back to x_j
    (position j)."""
    rng = random.Random(0)
    tracer = ReverseAttentionTracer(model)
    induction, previous = induction_heads(model, repeated_tokens(8, 30, 30, seed=99))
    ind_heads = {
        h for h in range(4) if induction[1, h] > 0.3
    }  # half the positions have no earlier copy
    prev_heads = {h for h in range(4) if previous[0, h] > 0.5}
    assert ind_heads and prev_heads

    hits = total = 0
    for seed in range(60):
        m = rng.randint(10, 30)
        j = rng.randint(3, min(m - 1, 62 - m))
        tokens = repeated_tokens(1, prefix_len=m, repeat_len=j, seed=1000 + seed)
        best = tracer.trace(tokens, layers=(0, 1), agg_heads="none", exclude_bos=True).beams[0]
        total += 1
        hits += (
            best.positions == [m + j, j + 1, j]
            and best.layers == [1, 0]
            and best.heads[0] in ind_heads
            and best.heads[1] in prev_heads
        )
    assert hits / total >= 0.9, f"{hits}/{total} prompts follow the circuit"


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda t, x: t.trace(torch.zeros(1, 0, dtype=torch.long)), RatLensError, "non-empty"),
        (lambda t, x: t.trace_text("   "), RatLensError, "non-empty strings"),
        (lambda t, x: t.trace(x, target_pos=40), RatLensError, "target_pos=40 out of range"),
        (lambda t, x: t.trace(x, target_pos=-41), RatLensError, "target_pos=-41 out of range"),
        (lambda t, x: t.trace(x, layer=2), RatLensError, "layer=2 out of range for n_layers 2"),
        (lambda t, x: t.trace(x, layers=(0, 3)), RatLensError, r"layers\[1\]=3 out of range"),
        (lambda t, x: t.trace(x, layer=0, layers=(0, 1)), RatLensError, "either layer=0"),
        (lambda t, x: t.trace(x, agg_heads="sum"), RatLensError, "agg_heads='sum' not in"),
        (lambda t, x: t.trace(x, length_norm="log"), RatLensError, "length_norm='log' not in"),
        (lambda t, x: t.trace(x, length_norm="pow:a"), RatLensError, "'pow:a' is malformed"),
        (lambda t, x: t.trace(x, layers=(0, 1), residual="x"), RatLensError, "residual='x' not in"),
        (lambda t, x: t.trace(x, residual="rollout"), RatLensError, "needs layers mode"),
        (lambda t, x: t.trace(x, top_beam=0), RatLensError, "top_beam must be >= 1, got 0"),
        (lambda t, x: t.trace(x, top_k=0), RatLensError, "top_k must be >= 1, got 0"),
        (
            lambda t, x: t.trace(x, attention_mask=torch.ones(1, 5)),
            RatLensError,
            r"attention_mask shape \(1, 5\) does not match input_ids shape \(1, 40\)",
        ),
        (
            lambda t, x: t.trace_batch(x.repeat(2, 1), attention_mask=torch.ones(3, 40)),
            RatLensError,
            r"attention_mask shape \(3, 40\)",
        ),
        (lambda t, x: t.trace(x.repeat(2, 1)), RatLensError, "use trace_batch"),
        (lambda t, x: t.trace(x.float()), RatLensError, "integer token ids"),
        (lambda t, x: t.trace(x, cache={}), RatLensError, "the cache has no"),
        (lambda t, x: t.trace(x, query_chunk=0), RatLensError, "query_chunk must be >= 1, got 0"),
        (lambda t, x: t.trace(x, query_chunk=8, cache={}), RatLensError, "give one or the other"),
        (
            lambda t, x: t.trace_batch(
                x.repeat(2, 1),
                query_chunk=8,
                attention_mask=torch.stack([torch.ones(40), (torch.arange(40) < 30).float()]),
            ),
            RatLensError,
            "query_chunk needs unpadded prompts",
        ),
    ],
)
def test_bad_input_raises_one_clear_error_and_leaves_the_model_alone(
    model, call, error, message, no_typecheck
):
    tokens = repeated_tokens(1, prefix_len=25, repeat_len=14, seed=7)
    logits = model(tokens)
    with pytest.raises(error, match=message):
        call(ReverseAttentionTracer(model), tokens)
    assert hook_count(model) == 0
    torch.testing.assert_close(model(tokens), logits, atol=0, rtol=0)


def test_nan_attention_is_refused(model):
    tokens = repeated_tokens(1, prefix_len=10, repeat_len=5, seed=8)
    _, cache = model.run_with_cache(tokens, names_filter=NAMES)
    poisoned = {k: v.clone() for k, v in cache.items()}
    poisoned["blocks.1.attn.hook_pattern"][0, 2, 5, 3] = float("nan")
    with pytest.raises(RatLensError, match="NaN"):
        ReverseAttentionTracer(model).trace(tokens, cache=poisoned)


def test_a_model_without_hook_points_is_refused():
    with pytest.raises(RatLensError, match="expected a TransformerLens model"):
        ReverseAttentionTracer(torch.nn.Linear(3, 3))


@pytest.mark.skipif(
    len(SOURCES) < 2,
    reason="needs both TransformerBridge and HookedTransformer "
    "(TL 3.x; CI runs this in its TL 3.9 environment)",
)
def test_bridge_and_hooked_transformer_give_identical_beams():
    bridge, hooked = load("induction-2l", source="bridge"), load("induction-2l", source="hooked")
    tokens = repeated_tokens(3, prefix_len=20, repeat_len=12, seed=21)
    for opts in (dict(layer=1), dict(layers=(0, 1), agg_heads="none"), dict(layers=(0, 1))):
        a = ReverseAttentionTracer(bridge).trace_batch(tokens, [-1, -4], **opts)
        b = ReverseAttentionTracer(hooked).trace_batch(tokens, [-1, -4], **opts)
        for ra, rb in zip(a, b, strict=True):
            assert_same_beams(ra.beams, rb.beams)


def test_predictions_and_rollout_come_from_the_same_forward(model):
    from rat_lens.search.stats import rollout_importance

    tokens = repeated_tokens(2, prefix_len=12, repeat_len=6, seed=31)
    forwards = []
    with model.hooks(
        fwd_hooks=[("blocks.0.attn.hook_pattern", lambda p, hook: forwards.append(1))]
    ):
        results = ReverseAttentionTracer(model).trace_batch(
            tokens, [-1, 5], layers=(0, 1), agg_heads="none", predictions=3
        )
    assert forwards == [1]
    logits, cache = model.run_with_cache(tokens, names_filter=NAMES)
    for r in results:  # the oracle: the summary computed from run_with_cache's logits
        expected = summarize(r, logits=logits, tokenizer=model.tokenizer).predictions
        assert r.predictions == expected
        assert r.predictions[0].probs == pytest.approx(expected[0].probs, abs=1e-6)
        stack = torch.stack([cache["pattern", layer][r.batch_index] for layer in (0, 1)])
        assert r.rollout == pytest.approx(
            rollout_importance(stack, r.target_pos).tolist(), abs=1e-6
        )
    # The induction model predicts the next repeated token at the last position.
    assert results[0].predictions[0].token_ids[0] == int(tokens[0, 7])
    assert "Predictions at traced positions" in summarize(results[0]).to_text()
    with pytest.raises(RatLensError, match="predictions need the model's logits"):
        ReverseAttentionTracer(model).trace(tokens[:1], cache=cache, predictions=3)


def test_query_chunks_trace_exactly_as_one_forward(gpt2_bridge):
    """Long-context mode (the forward in chunks over a KV cache) changes memory, not results."""
    tokens = repeated_tokens(2, prefix_len=30, repeat_len=15, seed=5)
    tracer = ReverseAttentionTracer(gpt2_bridge)
    per_head = {"layers": (0, 2), "agg_heads": "none", "edge_weight": "attention"}
    for opts in ({"layer": 2, "predictions": 0}, {**per_head, "predictions": 0}, {}):
        whole = tracer.trace_batch(tokens, [-1, -6], **opts)
        chunked = tracer.trace_batch(tokens, [-1, -6], query_chunk=8, **opts)
        for a, b in zip(chunked, whole, strict=True):
            assert a.paths_text == b.paths_text
            assert [(p.positions, p.layers, p.heads) for p in a.beams] == [
                (p.positions, p.layers, p.heads) for p in b.beams
            ]
            assert [w for p in a.beams for w in p.edge_weights] == pytest.approx(
                [w for p in b.beams for w in p.edge_weights], abs=1e-6
            )
            top = [[p.token_ids for p in r.predictions] for r in (a, b)]
            assert top[0] == top[1] and bool(top[0]) == ("predictions" not in opts)
            assert a.rollout == pytest.approx(b.rollout, abs=1e-6)


def test_head_rows_are_the_traced_heads_attention_rows(model):
    """Every head edge's row is recorded once, with the edge's own key and the row's strongest
    keys, at run_with_cache's values (the page's head heatmap reads them)."""
    from rat_lens.assemble import HEAD_ROW_KEYS

    tokens = repeated_tokens(1, prefix_len=20, repeat_len=10, seed=3)
    result = rat_lens.trace(
        model, tokens[0], layers=(0, 1), agg_heads="none", edge_weight="attention"
    )
    _, cache = model.run_with_cache(tokens, names_filter=NAMES)
    rows = {(r["layer"], r["head"], r["query"]): r for r in result.head_rows}
    assert len(rows) == len(result.head_rows)
    for beam in result.beams:
        for i in range(beam.num_edges):
            row = rows[beam.layers[i], beam.heads[i], beam.positions[i]]
            assert beam.positions[i + 1] in row["keys"]
    for (layer, head, query), row in rows.items():
        full = cache["pattern", layer][0, head, query, : query + 1]
        assert row["weights"] == pytest.approx(full[row["keys"]].tolist(), abs=1e-6)
        strongest = set(full.topk(min(HEAD_ROW_KEYS, query + 1)).indices.tolist())
        assert strongest <= set(row["keys"]) and len(row["keys"]) <= HEAD_ROW_KEYS + 5
    assert rat_lens.TraceResult.from_json(result.to_json()) == result
