"""Bounded per-head traces (store="bounded") against the dense ones: the same beams, weights,
scores, strip and head rows, on random attention (hypothesis: continuous, quantised, uniform and
sparse rows, masks, sinks, rollout), on a random GPT-2 (chunked, padded, cached) and on the
embedded model."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rat_lens
import rat_lens.assemble
import rat_lens.record
import rat_lens.search.store
from rat_lens import RatLensError, TraceOptions
from rat_lens.search.beam import beam_search
from rat_lens.search.store import TopKeys, TopKeysBuilder, stable_top_keys


def stable_oracle(values: torch.Tensor, k: int) -> list[set]:
    """The first ``k`` keys of each row under a stable sort by value, descending."""
    return [set(np.argsort(-row.double().numpy(), kind="stable")[:k].tolist()) for row in values]


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 12),
    st.integers(1, 14),
    st.sampled_from(["continuous", "levels", "uniform", "zeros"]),
    st.integers(0, 2**31 - 1),
)
def test_stable_top_keys_is_a_stable_sorts_first_k(k, n, kind, seed):
    values = random_rows(torch.Generator().manual_seed(seed), 5, n, kind)
    got = stable_top_keys(values, k)
    assert [set(row.tolist()) for row in got] == stable_oracle(values, min(k, n))


def random_rows(gen, rows: int, n: int, kind: str) -> torch.Tensor:
    if kind == "continuous":
        return torch.rand(rows, n, generator=gen)
    if kind == "levels":  # few distinct values: ties everywhere
        return torch.randint(0, 3, (rows, n), generator=gen).float() / 4
    if kind == "uniform":
        return torch.full((rows, n), 0.125)
    return torch.rand(rows, n, generator=gen) * (torch.rand(rows, n, generator=gen) < 0.3)


@st.composite
def attention_cases(draw):
    """Causal attention ``[layer, head, n, n]`` of many kinds, a key mask, BOS positions,
    options, the stores' ``keep`` and how the rows arrive (chunks)."""
    n_layers, n_heads, n = (
        draw(st.integers(1, 3)),
        draw(st.integers(1, 3)),
        draw(st.integers(1, 14)),
    )
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(["softmax", "levels", "uniform", "sparse"]))
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    if kind == "softmax":
        logits = torch.randn(n_layers, n_heads, n, n, generator=gen) * draw(
            st.sampled_from([0.5, 3.0])
        )
        attn = logits.masked_fill(~causal, -torch.inf).softmax(-1)
    else:
        raw = random_rows(gen, n_layers * n_heads * n, n, {"sparse": "zeros"}.get(kind, kind))
        raw = raw.view(n_layers, n_heads, n, n) * causal
        attn = raw / raw.sum(-1, keepdim=True).clamp(min=1e-9)
        if kind == "levels":  # quantised after normalising: exact ties stay
            attn = (attn * 8).round() / 8
    target = draw(st.integers(0, n - 1))
    mask = torch.ones(n, dtype=torch.long)
    for p in draw(st.lists(st.integers(0, n - 1), max_size=3)):
        mask[p] = 0 if p != target else 1
    chain = draw(st.booleans()) and n_heads > 1  # one channel in a chain: the peer's order
    lo = draw(st.integers(0, n_layers - 1))
    top_k = draw(st.integers(1, 5))
    # TraceOptions is built in the test: its runtime type checks draw on the random module.
    options = dict(
        layer=-1 if chain else None,
        layers=None if chain else (lo, draw(st.integers(lo, n_layers - 1))),
        top_beam=draw(st.integers(1, 6)),
        top_k=top_k,
        min_attn=draw(st.sampled_from([0.0, 0.05, 0.2])),
        agg_heads="none",
        edge_weight="attention",
        length_norm=draw(st.sampled_from(["none", "avg_logprob", "sqrt"])),
        stop_at_bos=draw(st.booleans()),
        residual="none" if chain else draw(st.sampled_from(["none", "rollout"])),
        exclude_bos=draw(st.booleans()),
    )
    bos = draw(st.lists(st.integers(0, n - 1), max_size=2, unique=True))
    keep = top_k + draw(st.sampled_from([0, 0, 2]))  # the least the search needs, or more
    chunks = draw(st.lists(st.integers(1, 5), max_size=4))
    return attn, target, mask, bos, options, keep, chunks


def bounded_stores(attn, mask, bos, options, keep, chunks) -> list[TopKeys]:
    """One store per layer of a one-prompt stack, fed in row blocks as a chunked forward does."""
    n = attn.shape[-1]
    key_ok = mask.bool().clone()
    if options.exclude_bos:
        key_ok[[0, *bos]] = False
    stores = []
    for layer in attn:
        builder = TopKeysBuilder(n, keep, key_ok[None], sink_keys=bos)
        start = 0
        for size in [*chunks, n]:
            stop = min(start + size, n)
            if stop > start:
                builder.add(layer[None, :, start:stop, :stop])
            start = stop
        stores.append(builder.build()[0])
    return stores


@settings(max_examples=400, deadline=None)
@given(attention_cases())
def test_bounded_search_equals_dense_search(case):
    attn, target, mask, bos, options, keep, chunks = case
    options = TraceOptions(**options)
    layer_ids = options.layer_ids(attn.shape[0])
    stores = bounded_stores(attn, mask, bos, options, keep, chunks)
    run = dict(bos_positions=bos, attention_mask=mask)
    dense = beam_search([attn[i] for i in layer_ids], layer_ids, target, options, **run)
    bounded = beam_search([stores[i] for i in layer_ids], layer_ids, target, options, **run)
    assert bounded == dense  # positions, layers, heads, weights, BOS mass and scores, exactly


def test_a_store_is_read_by_rows_and_holds_no_square(no_typecheck):
    gen = torch.Generator().manual_seed(0)
    attn = torch.rand(3, 40, 40, generator=gen).tril()
    builder = TopKeysBuilder(40, 4, torch.ones(1, 40, dtype=torch.bool), sink_keys=[0, 7])
    builder.add(attn[None, :, :25, :25])
    builder.add(attn[None, :, 25:])
    store = builder.build()[0]
    assert store.shape == (3, 40, 40) and "keep=4" in repr(store)
    # Only (head, query) x (keep + sinks + diagonal) numbers: nothing grows with seq².
    held = [store.kept_keys, store.kept_weights, store.self_weights, store.sink_weights]
    assert sum(t.numel() for t in held) == 3 * 40 * (4 + 4 + 1 + 2)
    rows = store[:, [39, 10]]
    for i, q in enumerate([39, 10]):
        kept = rows[:, i] != 0
        assert torch.equal(rows[:, i][kept], attn[:, q][kept])  # kept entries are exact
        assert kept[:, [0, q]].equal(attn[:, q, [0, q]] != 0)  # sinks and diagonal always
        assert (kept[:, :q].sum(-1) <= 4 + 2).all()
    assert torch.equal(store[:, 5:7], store[:, [5, 6]])
    with pytest.raises(RatLensError, match="read by rows only"):
        store.sum()
    with pytest.raises(RatLensError, match="read by rows only"):
        store[0]


# --- through the tracer ------------------------------------------------------------------


def same_results(bounded, dense, rollout=True):
    for a, b in zip(bounded, dense, strict=True):
        a, b = a.to_dict(), b.to_dict()
        if not rollout:
            assert a.pop("rollout") == [] and b.pop("rollout")
        assert a == b


@st.composite
def prompts(draw):
    batch = draw(st.integers(1, 2))
    lengths = [draw(st.integers(2, 100)) for _ in range(batch)]
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 64, (batch, max(lengths)), generator=gen)
    tokens[:, 0] = 0  # a BOS
    mask = (torch.arange(max(lengths)) < torch.tensor(lengths)[:, None]).long()
    chain = draw(st.booleans())
    layers = None if chain else draw(st.sampled_from([(0, 2), (1, 2), (0, 0)]))
    options = dict(
        layer=draw(st.integers(0, 2)) if chain else None,
        layers=layers,
        top_beam=draw(st.integers(1, 8)),
        top_k=draw(st.integers(1, 6)),
        min_attn=draw(st.sampled_from([0.0, 0.1])),
        agg_heads="none",
        edge_weight="attention",
        residual="none" if chain else draw(st.sampled_from(["none", "rollout"])),
        exclude_bos=draw(st.booleans()),
    )
    targets = draw(st.lists(st.integers(-2, -1), min_size=1, max_size=2, unique=True))
    chunk = None if batch > 1 else draw(st.sampled_from([None, 3, 16]))
    row_keys = draw(st.sampled_from([1, 3, 64]))  # STORE_KEYS: what the stores keep
    return tokens, mask, options, targets, chunk, row_keys


def narrow(patch, row_keys: int) -> None:
    """Stores that keep max(top_k, row_keys) keys per row, and head rows as wide."""
    patch.setattr(rat_lens.search.store, "STORE_KEYS", row_keys)
    patch.setattr(rat_lens.assemble, "HEAD_ROW_KEYS", row_keys)


@settings(max_examples=40, deadline=None)
@given(prompts())
def test_a_bounded_trace_of_a_random_gpt2_equals_the_dense_one(gpt2_bridge, case):
    tokens, mask, options, targets, chunk, row_keys = case
    options = TraceOptions(**options)
    tracer = rat_lens.ReverseAttentionTracer(gpt2_bridge)
    run = dict(options=options, bos_token_id=0, query_chunk=chunk)
    with pytest.MonkeyPatch.context() as patch:  # few keys kept: most of each row is left out
        narrow(patch, row_keys)
        dense = tracer.trace_batch(tokens, targets, mask, store="dense", **run)
        bounded = tracer.trace_batch(tokens, targets, mask, store="bounded", **run)
    same_results(bounded, dense)


@pytest.mark.parametrize("row_keys", [1, 64])
def test_bounded_traces_of_the_embedded_model_equal_dense_ones(model, row_keys, monkeypatch):
    narrow(monkeypatch, row_keys)
    texts = ["cat dog red blue green cat dog red", "sun moon star sun moon star sun moon"]
    tracer = rat_lens.Tracer(model)
    for options in (
        dict(layers=(0, 1)),
        dict(layers=(0, 1), top_beam=20, top_k=8, residual="rollout"),
        dict(layers=(0, 1), exclude_bos=True, min_attn=0.05),
        dict(layer=1, top_beam=10),
    ):
        options.update(agg_heads="none", edge_weight="attention")
        dense = tracer.trace_batch(texts, [-1, -3], store="dense", **options)
        bounded = tracer.trace_batch(texts, [-1, -3], store="bounded", **options)
        same_results(bounded, dense)
        assert bounded[0].beams and bounded[0].head_rows


def test_predictions_and_caches_trace_bounded_too(gpt2_bridge):
    tokens = torch.randint(1, 64, (1, 30), generator=torch.Generator().manual_seed(1))
    tracer = rat_lens.ReverseAttentionTracer(gpt2_bridge)
    opts = dict(layers=(0, 2), agg_heads="none", edge_weight="attention", top_beam=6)
    dense = tracer.trace_batch(tokens, -1, predictions=3, store="dense", **opts)
    same_results(tracer.trace_batch(tokens, -1, predictions=3, store="bounded", **opts), dense)
    assert dense[0].predictions
    _, cache = gpt2_bridge.run_with_cache(tokens)
    cached = tracer.trace_batch(tokens, -1, cache=cache, store="bounded", **opts)
    same_results(cached, tracer.trace_batch(tokens, -1, cache=cache, store="dense", **opts))


def test_auto_goes_bounded_over_the_budget_and_drops_only_the_rollout(gpt2_bridge, monkeypatch):
    tokens = torch.randint(1, 64, (1, 24), generator=torch.Generator().manual_seed(2))
    tracer = rat_lens.ReverseAttentionTracer(gpt2_bridge)
    opts = dict(layers=(0, 2), agg_heads="none", edge_weight="attention")
    dense = tracer.trace_batch(tokens, -1, store="dense", **opts)
    calls = []
    real = rat_lens.record.BoundedCapture
    monkeypatch.setattr(
        rat_lens.record, "BoundedCapture", lambda *a, **kw: calls.append(1) or real(*a, **kw)
    )
    per_layer_mean = 4 * 24 * 24  # bytes of one layer's head-mean
    monkeypatch.setattr(rat_lens.options, "PATTERN_BUDGET", 3 * per_layer_mean)
    same_results(tracer.trace_batch(tokens, -1, **opts), dense)  # head-means fit: rollout too
    monkeypatch.setattr(rat_lens.options, "PATTERN_BUDGET", per_layer_mean)
    with pytest.warns(RuntimeWarning, match="no rollout"):
        same_results(tracer.trace_batch(tokens, -1, **opts), dense, rollout=False)
    assert len(calls) == 2
    tracer.trace_batch(tokens, -1, layers=(0, 2), agg_heads="mean")  # no per-head store
    assert len(calls) == 2


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(store="big"), "store='big' not in"),
        (dict(store="bounded", layer=-1), "store='bounded' is for per-head traces"),
        (dict(store="bounded", layers=(0, 1), agg_heads="max"), "agg_heads='max'"),
    ],
)
def test_bad_stores_are_refused_before_the_forward(options, message, no_typecheck):
    from rat_lens.models import load

    with pytest.raises(RatLensError, match=message):
        rat_lens.trace(load("induction-2l"), "cat dog red cat", **options)
