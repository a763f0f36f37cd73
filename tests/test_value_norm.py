"""Value-norm edges streamed as the forward runs, and contribution edges computed for the
visited rows only, against the dense shares of :func:`rat_lens.search.contrib.edge_shares`:
on random blocks (hypothesis: GQA, chunks, padding, ties, row subsets), on the embedded model
and on GPT-2 / Qwen2 bridges (one forward, query chunks, padded batches, caches, bounded
stores). No trace falls back to another edge weight."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_bounded import bounded_stores, narrow, same_results
from test_capture import tiny_hf_bridge
from test_tracer import assert_same_beams

import rat_lens
import rat_lens.options
from rat_lens import RatLensError, TraceOptions
from rat_lens.capture import (
    Forward,
    PatternCapture,
    ValueNormCapture,
    capture_contributions,
    run_forward,
)
from rat_lens.models import load, repeated_tokens
from rat_lens.search.beam import beam_search
from rat_lens.search.contrib import (
    ShareRows,
    ValueNormRows,
    edge_shares,
    key_norms,
    norm_factor,
    row_totals,
    value_norm_shares,
)

PER_HEAD = dict(agg_heads="none")


@pytest.fixture(scope="module", params=["induction", "gpt2", "qwen2"])
def any_model(request):
    return load("induction-2l") if request.param == "induction" else tiny_hf_bridge(request.param)


def keeps_kv(model) -> bool:
    """A Hugging Face model in a bridge continues its KV cache; the embedded native one not."""
    from transformers import PreTrainedModel

    return isinstance(getattr(model, "original_model", None), PreTrainedModel)


def random_block(seed: int, n_heads: int, n_kv: int, n: int, d: int = 6):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n_heads, n, n, generator=gen) * 3
    A = logits.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), -torch.inf).softmax(-1)
    if seed % 3 == 0:  # uniform rows: ties everywhere
        A = torch.ones(n, n).tril() / torch.arange(1, n + 1)[:, None]
        A = A.expand(n_heads, n, n).clone()
    v = torch.randn(n, n_kv, 4, generator=gen)
    W_O = torch.randn(n_heads, 4, d, generator=gen)
    x = torch.randn(n, d, generator=gen)
    return A, v, W_O, x


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 2**31 - 1),
    st.sampled_from([(1, 1), (4, 4), (4, 2), (6, 3)]),
    st.integers(1, 12),
    st.lists(st.integers(1, 5), max_size=4),
)
def test_streamed_value_norm_shares_equal_the_dense_ones(seed, heads, n, chunks):
    """Blocks of query rows over the keys so far, as a KV-cached forward delivers them."""
    A, v, W_O, x = random_block(seed, *heads, n)
    dense = edge_shares(A, v, W_O, x, None, "value_norm")
    got, start = [], 0
    norms = key_norms(v[None], W_O)
    for size in [*chunks, n]:
        stop = min(start + size, n)
        if stop > start:
            block = value_norm_shares(
                A[None, :, start:stop, :stop], norms, x[start:stop].norm(dim=-1)[None]
            )
            got.append(torch.nn.functional.pad(block[0], (0, n - stop)))
        start = stop
    torch.testing.assert_close(torch.cat(got, dim=1), dense, rtol=1e-6, atol=1e-7)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 2**31 - 1),
    st.sampled_from([(1, 1), (4, 4), (4, 2)]),
    st.integers(1, 10),
    st.data(),
)
def test_share_rows_are_the_dense_shares_of_those_rows(seed, heads, n, data):
    A, v, W_O, x = random_block(seed, *heads, n)
    b_O = torch.randn(W_O.shape[-1]) if seed % 2 else None
    rows = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n))
    dense = edge_shares(A, v, W_O, x, b_O, "contribution")
    got = ShareRows(A, v, W_O, x, b_O)[:, rows]
    torch.testing.assert_close(got, dense[:, rows], rtol=1e-5, atol=1e-6)
    with pytest.raises(RatLensError, match="by rows only"):
        ShareRows(A, v, W_O, x, b_O).sum()


def dense_value_norm(model, tokens, layers):
    """Today's dense value-norm shares: ``[layer, batch, part, query, key]``."""
    shares = capture_contributions(model, tokens, layers, "value_norm")
    return torch.stack([shares[layer] for layer in layers])


def streamed(model, tokens, layers, query_chunk=None, mask=None):
    """The capture's shares (read by rows, every row): ``[layer, batch, part, query, key]``."""
    capture = ValueNormCapture.of(model, layers, PatternCapture(layers, "none"))
    run_forward(model, tokens, capture, Forward(mask, query_chunk))
    cache = capture.attention.to_cache(model)
    return torch.stack(
        [
            torch.stack([rows[:, :] for rows in capture.rows(layer, cache["pattern", layer])])
            for layer in layers
        ]
    )


def test_streamed_shares_equal_todays_dense_ones_on_models(any_model):
    tokens = torch.randint(1, 60, (2, 14), generator=torch.Generator().manual_seed(1))
    dense = dense_value_norm(any_model, tokens, [0, 1])
    torch.testing.assert_close(streamed(any_model, tokens, [0, 1]), dense, rtol=1e-6, atol=1e-7)
    if not keeps_kv(any_model):
        return
    chunked = streamed(any_model, tokens, [0, 1], query_chunk=5)
    torch.testing.assert_close(chunked, dense, rtol=1e-5, atol=1e-6)


def search_dense(model, tokens, target, **options):
    """The search on today's dense value-norm shares of one prompt."""
    options = TraceOptions(edge_weight="value_norm", **PER_HEAD, **options).resolve()
    layer_ids = options.layer_ids(len(model.blocks))
    shares = dense_value_norm(model, tokens, sorted(set(layer_ids)))
    by_layer = dict(zip(sorted(set(layer_ids)), shares))
    return beam_search(
        [by_layer[layer][0] for layer in layer_ids], layer_ids, target, options, bos_positions=[0]
    )


@pytest.mark.parametrize(
    "inputs", [dict(), dict(store="bounded"), dict(query_chunk=6), dict(cache=True)]
)
def test_the_default_per_head_trace_is_value_norm_from_every_source(any_model, inputs):
    """One forward, the bounded store, query chunks over the KV cache and a user's cache all
    trace value_norm edges with today's dense search's beams."""
    tokens = repeated_tokens(1, prefix_len=12, repeat_len=6, seed=4)
    if "query_chunk" in inputs and not keeps_kv(any_model):
        with pytest.raises(RatLensError, match="ignored the KV cache"):  # refused, not swapped
            rat_lens.trace(any_model, tokens[0], layers=(0, 1), **PER_HEAD, **inputs)
        return
    if inputs.get("cache"):
        inputs = dict(cache=any_model.run_with_cache(tokens)[1])
    got = rat_lens.trace(any_model, tokens[0], layers=(0, 1), **PER_HEAD, **inputs)
    assert got.edge_weight == "value_norm" and got.length_norm == "none"
    assert_same_beams(got.beams, search_dense(any_model, tokens, 18, layers=(0, 1)))


def test_a_cache_without_values_names_the_hooks_to_cache(any_model):
    tokens = repeated_tokens(1, prefix_len=8, repeat_len=4, seed=1)
    _, cache = any_model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    with pytest.raises(RatLensError, match="hook_v and hook_resid_pre"):
        rat_lens.trace(any_model, tokens[0], layers=(0, 1), **PER_HEAD, cache=cache)
    attention = rat_lens.trace(
        any_model, tokens[0], layers=(0, 1), **PER_HEAD, cache=cache, edge_weight="attention"
    )
    assert attention.edge_weight == "attention"


def test_edge_weight_never_depends_on_the_length(monkeypatch):
    """Over PATTERN_BUDGET the default stays value_norm (bounded, same beams), and contribution
    edges stay contribution edges (their rows recomputed), never another weight."""
    model = load("induction-2l")
    tokens = repeated_tokens(1, prefix_len=20, repeat_len=10, seed=2)
    dense = rat_lens.trace(model, tokens[0], layers=(0, 1), **PER_HEAD)
    contribution = dict(layers=(0, 1), **PER_HEAD, edge_weight="contribution")
    whole = rat_lens.trace(model, tokens[0], **contribution)
    monkeypatch.setattr(rat_lens.options, "PATTERN_BUDGET", 2_000)
    with pytest.warns(RuntimeWarning, match="no rollout"):
        bounded = rat_lens.trace(model, tokens[0], layers=(0, 1), **PER_HEAD)
    assert bounded.edge_weight == dense.edge_weight == "value_norm"
    assert_same_beams(bounded.beams, dense.beams)
    with pytest.warns(RuntimeWarning, match="no rollout"):
        recomputed = rat_lens.trace(model, tokens[0], **contribution)
    assert recomputed.edge_weight == "contribution"
    assert [b.positions for b in recomputed.beams] == [b.positions for b in whole.beams]


def test_padded_value_norm_batch_equals_each_prompt_alone(any_model):
    """One padded, masked forward: each prompt's beams are those of tracing it alone."""
    prompts = [repeated_tokens(1, prefix_len=n, repeat_len=5, seed=n)[0] for n in (6, 11)]
    tokens = torch.nn.utils.rnn.pad_sequence(prompts, batch_first=True)
    mask = torch.zeros_like(tokens)
    for i, p in enumerate(prompts):
        mask[i, : len(p)] = 1
    tracer = rat_lens.Tracer(any_model)
    for store in ("dense", "bounded"):
        got = tracer.trace_batch(tokens, -1, mask, layers=(0, 1), **PER_HEAD, store=store)
        for r, p in zip(got, prompts):
            alone = tracer.trace(p, -1, layers=(0, 1), **PER_HEAD)
            assert r.edge_weight == alone.edge_weight == "value_norm"
            assert_same_beams(r.beams, alone.beams)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(3, 10), st.booleans(), st.data())
def test_bounded_value_norm_search_equals_the_dense_one(seed, n, levels, data):
    """Shares in TopKeys stores (residual channel and all): the dense search's beams."""
    gen = torch.Generator().manual_seed(seed)
    n_layers, n_heads = 2, 3
    shares = []
    for _ in range(n_layers):
        A, v, W_O, x = random_block(
            int(torch.randint(0, 2**30, (1,), generator=gen)), n_heads, n_heads, n
        )
        if levels:
            A = (A * 4).round() / 4
        shares.append(edge_shares(A, v, W_O, x, None, "value_norm"))
    attn = torch.stack(shares)
    top_k = data.draw(st.integers(1, 4))
    options = TraceOptions(
        layers=(0, 1),
        agg_heads="none",
        edge_weight="value_norm",
        top_k=top_k,
        top_beam=data.draw(st.integers(1, 5)),
        exclude_bos=data.draw(st.booleans()),
    ).resolve()
    mask = torch.ones(n, dtype=torch.long)
    stores = bounded_stores(attn, mask, [0], options, top_k, [2, 3])
    target = data.draw(st.integers(1, n - 1))
    run = dict(bos_positions=[0], attention_mask=mask)
    dense = beam_search(list(attn.flip(0)), [1, 0], target, options, **run)
    assert beam_search(stores[::-1], [1, 0], target, options, **run) == dense


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 2**31 - 1),
    st.sampled_from([(1, 1), (4, 4), (4, 2), (6, 3)]),
    st.sampled_from([(4, 6), (8, 8), (16, 5)]),  # (d_head, d_model): d_head > d_model too
)
def test_key_norms_through_the_factor_are_the_direct_ones(seed, heads, dims):
    """norm_factor(W_O) gives W_O's norms (float64 oracle), d_model / d_head times cheaper."""
    gen = torch.Generator().manual_seed(seed)
    (n_heads, n_kv), (d_head, d_model) = heads, dims
    v = torch.randn(2, 9, n_kv, d_head, generator=gen)
    W_O = torch.randn(n_heads, d_head, d_model, generator=gen) / d_head**0.5
    factor = norm_factor(W_O)
    assert factor.shape == (n_heads, d_head, d_head if d_head < d_model else d_model)
    per_head = v.double().repeat_interleave(n_heads // n_kv, dim=2)
    exact = torch.einsum("bkhd,hdm->bhkm", per_head, W_O.double()).norm(dim=-1)
    torch.testing.assert_close(key_norms(v, factor).double(), exact, rtol=1e-6, atol=1e-7)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 2**31 - 1),
    st.sampled_from([(1, 1), (4, 4), (4, 2)]),
    st.integers(1, 10),
    st.data(),
)
def test_value_norm_rows_are_the_dense_shares_of_those_rows(seed, heads, n, data):
    A, v, W_O, x = random_block(seed, *heads, n)
    rows = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n))
    dense = edge_shares(A, v, W_O, x, None, "value_norm")
    norms, resid = key_norms(v[None], W_O), x.norm(dim=-1)[None]
    totals = row_totals(A[None], norms, resid)
    shares = ValueNormRows(A, norms[0], totals[0], resid[0])
    torch.testing.assert_close(shares[:, rows], dense[:, rows], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(shares[:, 1:], dense[:, 1:], rtol=1e-6, atol=1e-7)
    with pytest.raises(RatLensError, match="by rows only"):
        shares.sum()


@pytest.mark.parametrize("row_keys", [1, 64])
def test_a_bounded_value_norm_trace_equals_the_dense_one(any_model, row_keys, monkeypatch):
    """Beams, edge weights and attentions, scores, strip and head rows: the shares' store keeps
    top_k keys per row and the attention's store the attention of each of them."""
    narrow(monkeypatch, row_keys)
    gen = torch.Generator().manual_seed(row_keys)
    tokens = torch.randint(1, 60, (2, 24), generator=gen)
    tokens[:, 0] = 0
    mask = torch.ones_like(tokens)
    mask[1, 17:] = 0
    tracer = rat_lens.Tracer(any_model)
    for options in (
        dict(layers=(0, 1)),
        dict(layers=(0, 1), top_beam=12, top_k=7, exclude_bos=True, min_attn=0.02),
        dict(layers=(1, 1), top_beam=6, stop_at_bos=False),
    ):
        run = dict(
            options, agg_heads="none", edge_weight="value_norm", bos_token_id=0, predictions=0
        )
        dense = tracer.trace_batch(tokens, [-1, -4], mask, store="dense", **run)
        bounded = tracer.trace_batch(tokens, [-1, -4], mask, store="bounded", **run)
        assert {r.edge_weight for r in bounded} == {"value_norm"}
        same_results(bounded, dense)
