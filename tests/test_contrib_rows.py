"""Contribution edges in bounded memory: each visited row's attention recomputed from the
layer's queries and keys (rat_lens.search.recompute) gives the shares of the whole patterns.

Oracles: the dense source (every head's whole pattern, the model's own attention), the
float64 loops of test_contrib over each prompt alone, and softmax written out by hand.
"""

import pytest
import torch
from conftest import hook_count
from hypothesis import given, settings
from hypothesis import strategies as st
from test_capture import tiny_hf_bridge
from test_contrib import naive_parts, naive_shares

import rat_lens
from rat_lens import RatLensError
from rat_lens.models import available_sources, load, load_induction_tokenizer, repeated_tokens
from rat_lens.options import TraceInputs, TraceOptions
from rat_lens.plan import make_plan
from rat_lens.record import capture_record
from rat_lens.search.contrib import ShareRows, edge_shares, proximity_rows, value_outputs
from rat_lens.search.recompute import AttentionRows, attention_rows, fit_scale
from rat_lens.search.store import TopKeysBuilder

CONTRIBUTION = dict(layers=(0, 1), agg_heads="none", edge_weight="contribution")
# The TransformerLens model kinds installed: every bridge, and HookedTransformer where TL has it.
KINDS = ["induction", "gpt2", "qwen2", "llama"] + (
    ["hooked"] if "hooked" in available_sources() else []
)


SMALL = dict(
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    hidden_size=32,
    intermediate_size=64,
    vocab_size=64,
)


def tiny_llama(folder):
    """A random Llama (rotary, 4 query heads over 2 KV heads) saved and loaded as users do."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=64, **SMALL)
    LlamaForCausalLM(config).save_pretrained(folder)
    load_induction_tokenizer().save_pretrained(folder)
    return load(str(folder))


@pytest.fixture(scope="module", params=KINDS)
def any_model(request, tmp_path_factory):
    if request.param == "induction":
        return load("induction-2l")
    if request.param == "hooked":
        return load("induction-2l", source="hooked")
    if request.param == "llama":
        return tiny_llama(tmp_path_factory.mktemp("llama"))
    return tiny_hf_bridge(request.param)


def padded_prompts() -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Two repeated random sequences of different lengths, right-padded, and their mask."""
    prompts = [repeated_tokens(1, prefix_len=n, repeat_len=5, seed=n)[0] for n in (7, 12)]
    tokens = torch.nn.utils.rnn.pad_sequence(prompts, batch_first=True)
    mask = torch.zeros_like(tokens)
    for i, p in enumerate(prompts):
        mask[i, : len(p)] = 1
    return prompts, tokens, mask


def record_of(model, tokens, mask, store, **inputs):
    """The plan and the record of a per-head contribution trace from the last tokens."""
    options = TraceOptions(**CONTRIBUTION)
    run = TraceInputs(store=store, predictions=0, **inputs)
    plan = make_plan(model, tokens, mask, -1, options, run, None, 32)
    return plan, capture_record(model, tokens, plan)


def test_recomputed_rows_give_the_shares_of_the_loops_in_a_padded_batch(any_model):
    """Every real row of both layers of both prompts of a padded batch: the bounded source's
    shares equal the float64 loops over each prompt alone (and the dense source's), its
    attention rows the model's own. GQA on Qwen2 and Llama, b_O on GPT-2."""
    prompts, tokens, mask = padded_prompts()
    plan, bounded = record_of(any_model, tokens, mask, "bounded")
    _, dense = record_of(any_model, tokens, mask, "dense")
    assert plan.source == "contribution_bounded"
    for t, layer in enumerate(plan.layer_ids):
        for b, prompt in enumerate(prompts):
            real = torch.arange(len(prompt))
            terms, x, b_O, _ = naive_parts(any_model, prompt[None], layer)
            loops = naive_shares(terms, x, b_O, "contribution")
            got = bounded.weights[t][b][:, real].double()
            assert isinstance(bounded.attention[t][b], AttentionRows)
            torch.testing.assert_close(got[..., real], loops, atol=1e-5, rtol=1e-4)
            assert not got[..., len(prompt) :].any()  # no share lands on the padding
            torch.testing.assert_close(
                got, dense.weights[t][b][:, real].double(), atol=1e-5, rtol=0
            )
            torch.testing.assert_close(
                bounded.attention[t][b][:, real], dense.attention[t][b][:, real], atol=1e-5, rtol=0
            )
    assert hook_count(any_model) == 0


def test_bounded_contribution_traces_equal_the_dense_ones(any_model):
    """Through the public API, with a foil (its rescoring reads whole target rows): the same
    routes, weights and attention within 1e-5, the same heatmap rows and predictions."""
    _, tokens, mask = padded_prompts()
    tracer = rat_lens.Tracer(any_model)
    kw = dict(CONTRIBUTION, predictions=2, foil_token=5)
    dense = tracer.trace_batch(tokens, -1, mask, store="dense", **kw)
    bounded = tracer.trace_batch(tokens, -1, mask, store="bounded", **kw)
    for d, b in zip(dense, bounded):
        assert b.edge_weight == d.edge_weight == "contribution"
        assert [route(x) for x in b.beams] == [route(x) for x in d.beams]
        for x, y in zip(b.beams, d.beams):
            assert x.edge_weights == pytest.approx(y.edge_weights, abs=1e-5)
            assert [a or 0.0 for a in x.edge_attns] == pytest.approx(
                [a or 0.0 for a in y.edge_attns], abs=1e-5
            )
        assert [(r["layer"], r["head"], r["query"], r["keys"]) for r in b.head_rows] == [
            (r["layer"], r["head"], r["query"], r["keys"]) for r in d.head_rows
        ]
        for r, s in zip(b.head_rows, d.head_rows):
            assert r["weights"] == pytest.approx(s["weights"], abs=1e-5)
        assert [p.token_ids for p in b.predictions] == [p.token_ids for p in d.predictions]
    assert hook_count(any_model) == 0


def route(beam) -> tuple:
    return beam.positions, beam.layers, beam.heads, beam.kinds


@pytest.mark.parametrize("kind", ["gpt2", "qwen2"])
@pytest.mark.parametrize("store", ["dense", "bounded"])
def test_query_chunks_and_caches_serve_contribution_edges(kind, store):
    """An int query_chunk runs the forward over the KV cache and cache= runs none: both give
    one forward's shares, whole or recomputed."""
    model = tiny_hf_bridge(kind)
    tokens = repeated_tokens(1, prefix_len=14, repeat_len=8, seed=3)
    mask = torch.ones_like(tokens)
    plan, whole = record_of(model, tokens, mask, store, query_chunk=None)
    _, chunked = record_of(model, tokens, mask, store, query_chunk=5)
    _, cache = model.run_with_cache(tokens)
    _, cached = record_of(model, tokens, mask, store, cache=cache)
    rows = torch.arange(tokens.shape[1])
    for t in range(len(plan.layer_ids)):
        expected = whole.weights[t][0][:, rows]
        for other in (chunked, cached):
            torch.testing.assert_close(other.weights[t][0][:, rows], expected, atol=1e-5, rtol=0)
    assert hook_count(model) == 0


def test_a_cache_without_the_queries_and_keys_is_named():
    model = tiny_hf_bridge("qwen2")
    tokens = repeated_tokens(1, prefix_len=6, repeat_len=3, seed=0)
    kept = ("hook_resid_pre", "hook_v", "hook_pattern")
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith(kept))
    with pytest.raises(RatLensError, match=r"cache lacks: cache hook_resid_pre, hook_v, hook_rot"):
        record_of(model, tokens, torch.ones_like(tokens), "bounded", cache=cache)


def mistral_sliding_window():
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(sliding_window=4, **SMALL)
    return "mistralai/Mistral-7B-v0.1", MistralForCausalLM(config)


def gemma2_soft_capping():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        head_dim=8, attn_logit_softcapping=5.0, sliding_window=64, query_pre_attn_scalar=8, **SMALL
    )
    hf = Gemma2ForCausalLM(config)
    with torch.no_grad():  # scores large enough for the cap to bend them
        for block in hf.model.layers:
            block.self_attn.q_proj.weight.mul_(30)
            block.self_attn.k_proj.weight.mul_(30)
    return "google/gemma-2-2b", hf


def bloom_alibi():
    from transformers import BloomConfig, BloomForCausalLM

    config = BloomConfig(n_layer=2, n_head=4, hidden_size=32, vocab_size=64)
    return "bigscience/bloom-560m", BloomForCausalLM(config)


@pytest.mark.parametrize("build", [mistral_sliding_window, gemma2_soft_capping, bloom_alibi])
def test_attention_that_is_not_the_formula_is_refused_never_wrong(build):
    """A sliding window, soft-capped scores, ALiBi: the bounded source names what differs and
    what to do, before any search; the dense source (whole patterns) still serves them."""
    from transformer_lens.model_bridge import TransformerBridge

    torch.manual_seed(0)
    name, hf = build()
    hf.config._attn_implementation = "eager"
    model = TransformerBridge.boot_transformers(
        name, hf_model=hf.eval(), tokenizer=load_induction_tokenizer()
    )
    tokens = repeated_tokens(1, prefix_len=10, repeat_len=6, seed=1)
    with pytest.raises(RatLensError, match="is not that formula") as error:
        rat_lens.trace(model, tokens[0], store="bounded", **CONTRIBUTION)
    assert "edge_weight='value_norm'" in str(error.value)
    assert "fewer layers or a shorter prompt" in str(error.value)
    assert hook_count(model) == 0
    assert rat_lens.trace(model, tokens[0], store="dense", **CONTRIBUTION).beams


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 2**31 - 1),
    st.integers(2, 12),
    st.sampled_from([(1, 1), (2, 1), (4, 2), (3, 3)]),
    st.floats(0.0, 0.5),
    st.floats(0.05, 2.0),
)
def test_rows_recomputed_equal_softmax_written_out(seed, n, heads, padding, scale):
    """Random queries and keys (grouped-query heads, padding anywhere, rows with no real key):
    the rows equal a softmax written out by hand, the scale is measured back from them, the
    bounded store's kept entries check them, and their shares are the whole rows' shares."""
    n_heads, n_kv = heads
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(n, n_heads, 4, generator=gen), torch.randn(n, n_kv, 4, generator=gen)
    key_ok = torch.rand(n, generator=gen) >= padding
    dense = torch.zeros(n_heads, n, n)
    for h in range(n_heads):
        for row in range(n):
            keys = [j for j in range(row + 1) if key_ok[j]]
            if not keys:
                continue
            s = torch.stack([q[row, h] @ k[j, h // (n_heads // n_kv)] for j in keys]) * scale
            dense[h, row, keys] = torch.exp(s - s.max()) / torch.exp(s - s.max()).sum()
    rows = torch.arange(n)
    assert torch.allclose(attention_rows(q, k, scale, rows, key_ok), dense, atol=1e-6)
    if (dense[:, 1:] > 0).sum(-1).gt(1).any():  # rows of one key hold no slope
        assert fit_scale(dense, q, k, rows) == pytest.approx(scale, rel=1e-4)
    builder = TopKeysBuilder(n, keep=2, key_ok=key_ok[None], sink_keys=[0])
    builder.add(dense[None])
    A = AttentionRows(q, k, scale, key_ok, builder.build()[0])
    assert torch.allclose(A[:, rows], dense, atol=1e-6)
    v, W_O = torch.randn(n, n_kv, 4, generator=gen), torch.randn(n_heads, 4, 6, generator=gen)
    x, b_O = torch.randn(n, 6, generator=gen), torch.randn(6, generator=gen)
    # The shares are those of the same rows held whole. (Against the hand-written softmax's
    # they may differ by 100x its ~1e-7: proximity cancels |y| against |y - part|.)
    shares = ShareRows(A, v, W_O, x, b_O)[:, rows]
    assert torch.allclose(shares, edge_shares(A[:, rows], v, W_O, x, b_O), atol=1e-6)
    wrong = AttentionRows(q, k, scale * 1.5, key_ok, A.store)  # another formula than the store's
    if (dense > 1e-3).sum(-1).gt(1).any():
        with pytest.raises(RatLensError, match="kept for them"):
            wrong[:, rows]


def test_proximity_keeps_float32_accuracy_beside_a_large_residual_stream():
    """SmolLM2's shapes (9 heads, d_model 576, 2,048 keys) and a residual stream of |x|_1 in
    the thousands beside parts near 0: every share, the stay's too, within 1e-6 of float64
    (subtracting two float32 sums of |y| was 4.6e-4 off here)."""
    gen = torch.Generator().manual_seed(0)
    n_heads, n, d = 9, 2048, 576
    pattern = torch.randn(n_heads, 1, n, generator=gen).softmax(-1)
    v = torch.randn(n, 3, 64, generator=gen)
    W_O = torch.randn(n_heads, 64, d, generator=gen) * 0.05
    x = torch.randn(1, d, generator=gen) * 10
    got = proximity_rows(pattern, torch.tensor([n - 1]), v, W_O, x, None)[:, 0]
    terms = pattern[:, 0, :, None].double() * value_outputs(v.double(), W_O.double())
    y = x[0].double() + terms.sum(dim=(0, 1))
    parts = (y.abs().sum() - (y - terms).abs().sum(-1)).clamp_min(0)
    stay = (y.abs().sum() - (y - x[0].double()).abs().sum()).clamp_min(0)
    total = parts.sum() + stay
    torch.testing.assert_close(got[:n_heads].double(), parts / total, atol=1e-6, rtol=0)
    assert float(got[n_heads, n - 1]) == pytest.approx(float(stay / total), abs=1e-6)
