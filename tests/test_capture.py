"""Capture through hooks equals run_with_cache, stops early, composes, and leaves no trace."""

import warnings

import pytest
import torch
from conftest import SOURCES, hook_count
from einops import reduce
from transformer_lens import ActivationCache

from rat_lens import PatternCapture, RatLensError, capture_patterns
from rat_lens.capture import kv_cache_reaches_attention, patterns_from_cache, run_with_patterns
from rat_lens.models import repeated_tokens

NAMES = lambda name: name.endswith("hook_pattern")  # noqa: E731


def reference(model, tokens, layer, agg, mask=None):
    """The oracle: TransformerLens's own run_with_cache, reduced over heads by einops."""
    _, cache = model.run_with_cache(tokens, names_filter=NAMES, attention_mask=mask)
    pattern = cache["pattern", layer]
    return pattern if agg == "none" else reduce(pattern, "b h q k -> b 1 q k", agg)


@pytest.mark.parametrize("agg", ["mean", "max", "none"])
def test_capture_equals_run_with_cache(model, agg):
    tokens = repeated_tokens(3, prefix_len=20, repeat_len=10, seed=1)
    cache = capture_patterns(model, tokens, [0, 1], agg_heads=agg)
    assert isinstance(cache, ActivationCache)
    for layer in (0, 1):
        torch.testing.assert_close(
            cache["pattern", layer], reference(model, tokens, layer, agg), atol=1e-6, rtol=0
        )


def test_capture_with_padding_mask_equals_run_with_cache(model):
    tokens = repeated_tokens(2, prefix_len=16, repeat_len=8, seed=2)
    mask = torch.ones_like(tokens)
    mask[1, -5:] = 0
    cache = capture_patterns(model, tokens, [1], attention_mask=mask)
    torch.testing.assert_close(
        cache["pattern", 1], reference(model, tokens, 1, "mean", mask), atol=1e-6, rtol=0
    )
    assert cache["pattern", 1][1, 0, :-5, -5:].abs().max() == 0  # padded keys get nothing


def test_forward_stops_after_the_highest_layer_and_composes_with_user_hooks(model):
    """A user's hook on layer 1 never fires when only layer 0 is needed; the user's own edit of
    layer 0's pattern (registered first) is what gets captured."""
    tokens = repeated_tokens(1, prefix_len=12, repeat_len=6, seed=3)
    fired = []

    def zero_head_0(pattern, hook):
        pattern = pattern.clone()
        pattern[:, 0] = 0.0
        return pattern

    with model.hooks(
        fwd_hooks=[
            ("blocks.0.attn.hook_pattern", zero_head_0),
            ("blocks.1.attn.hook_pattern", lambda p, hook: fired.append(1)),
        ]
    ):
        cache = capture_patterns(model, tokens, [0], agg_heads="none")
        assert fired == []
        assert cache["pattern", 0][:, 0].abs().max() == 0
        capture_patterns(model, tokens, [1])
        assert fired == [1]
    assert hook_count(model) == 0


def test_pattern_capture_hooks_in_a_users_run_with_hooks(model):
    tokens = repeated_tokens(1, prefix_len=12, repeat_len=6, seed=4)
    capture = PatternCapture([0, 1], agg_heads="max")
    logits = model.run_with_hooks(tokens, fwd_hooks=capture.fwd_hooks)
    torch.testing.assert_close(logits, model(tokens))  # observing changes nothing
    cache = capture.to_cache(model)
    torch.testing.assert_close(cache["pattern", 1], reference(model, tokens, 1, "max"))
    with pytest.raises(RatLensError, match="no pattern was captured"):
        PatternCapture([1]).to_cache(model)


def test_reusing_a_users_cache_neither_runs_the_model_nor_mutates_the_cache(model):
    tokens = repeated_tokens(2, prefix_len=12, repeat_len=6, seed=5)
    _, user_cache = model.run_with_cache(tokens, names_filter=NAMES)
    before = {k: v.clone() for k, v in user_cache.items()}
    reduced = patterns_from_cache(user_cache, [0, 1], "mean", tuple(tokens.shape))
    torch.testing.assert_close(
        reduced["pattern", 1], capture_patterns(model, tokens, [1])["pattern", 1], atol=1e-6, rtol=0
    )
    for k, v in user_cache.items():
        assert torch.equal(v, before[k])
    with pytest.raises(RatLensError, match="has no 'blocks.3.attn.hook_pattern'"):
        patterns_from_cache(user_cache, [3])
    with pytest.raises(RatLensError, match="expected"):
        patterns_from_cache(user_cache, [0], batch_seq=(5, 7))


def test_failed_capture_leaves_no_hook_and_the_same_logits(model):
    tokens = repeated_tokens(1, prefix_len=12, repeat_len=6, seed=6)
    logits = model(tokens)

    def boom(pattern, hook):
        raise KeyError("user hook failed")

    with pytest.raises(KeyError), model.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", boom)]):
        capture_patterns(model, tokens, [1])
    with pytest.raises(RatLensError, match="within 0..1"):
        capture_patterns(model, tokens, [2])
    with pytest.raises(RatLensError, match="agg_heads='sum'"):
        capture_patterns(model, tokens, [1], agg_heads="sum")
    assert hook_count(model) == 0
    torch.testing.assert_close(model(tokens), logits, atol=0, rtol=0)


def test_models_without_hook_points_are_refused():
    with pytest.raises(RatLensError, match="expected a TransformerLens model.*Linear"):
        capture_patterns(torch.nn.Linear(2, 2), torch.zeros(1, 2, dtype=torch.long), [0])

    class NoPatterns:
        hook_dict = {"blocks.0.hook_resid_pre": None}

        def hooks(self):
            pass

    with pytest.raises(RatLensError, match="no blocks.{l}.attn.hook_pattern"):
        capture_patterns(NoPatterns(), torch.zeros(1, 2, dtype=torch.long), [0])


def test_the_bridges_own_copy_of_each_pattern_is_freed_by_our_forwards(gpt2_bridge):
    """GPT-2's fused-QKV bridge keeps every layer's full pattern on ``attn._pattern`` after a
    forward (2.4 GB at 2,048 tokens on GPT-2 small); the layers our forward ran give it back."""
    model, tokens = gpt2_bridge, repeated_tokens(1, 10, 5, seed=0)
    with torch.no_grad():
        logits = model(tokens)
    kept = [block.attn._pattern for block in model.blocks]
    assert all(p is not None and p.shape == (1, 4, 16, 16) for p in kept)  # the leak is real

    cache = capture_patterns(model, tokens, [1], agg_heads="none")
    torch.testing.assert_close(cache["pattern", 1], kept[1])
    # Layer 0 ran whole: its new copy is freed. The forward stopped inside layer 1 (before the
    # bridge stores the pattern) and never reached 2: what an earlier forward left stays as it was.
    assert model.blocks[0].attn._pattern is None
    assert all(model.blocks[layer].attn._pattern is kept[layer] for layer in (1, 2))
    assert hook_count(model) == 0
    run_with_patterns(model, tokens, [1])  # the whole forward: every layer's copy is freed
    assert all(block.attn._pattern is None for block in model.blocks)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), logits)


def kv_models() -> list[str]:
    return ["gpt2-bridge"] + (["hooked"] if "hooked" in SOURCES else [])


@pytest.fixture(params=kv_models())
def kv_model(request, gpt2_bridge):
    """Models whose forward continues a KV cache: HF-backed bridge, HookedTransformer (TL 3.x)."""
    from rat_lens.models import load

    return gpt2_bridge if request.param == "gpt2-bridge" else load("induction-2l", source="hooked")


@pytest.mark.parametrize("chunk", [1, 7, 16, 40])
@pytest.mark.parametrize("agg", ["mean", "none"])
def test_query_chunks_capture_the_one_forward_patterns(kv_model, chunk, agg):
    tokens, layers = repeated_tokens(2, 20, 10, seed=3), [0, kv_model.cfg.n_layers - 1]
    whole = capture_patterns(kv_model, tokens, layers, agg_heads=agg)
    chunked = capture_patterns(kv_model, tokens, layers, agg_heads=agg, query_chunk=chunk)
    assert sorted(chunked.keys()) == sorted(whole.keys())
    for name in whole.keys():
        torch.testing.assert_close(chunked[name], whole[name], atol=1e-6, rtol=0)
    logits, _ = run_with_patterns(kv_model, tokens, [0])
    chunk_logits, _ = run_with_patterns(kv_model, tokens, [0], query_chunk=chunk)
    torch.testing.assert_close(chunk_logits, logits, atol=1e-4, rtol=1e-4)
    assert hook_count(kv_model) == 0


def test_pattern_capture_spans_a_users_own_kv_cached_steps(gpt2_bridge):
    """Prefill then token-by-token steps over past_key_values: one capture, the whole matrix
    (inside kv_cache_reaches_attention, which newer transformers need for the bridge's cache)."""
    from transformers import DynamicCache

    tokens = repeated_tokens(1, 12, 6, seed=4)
    capture, kv = PatternCapture([1], agg_heads="none"), DynamicCache()
    with (
        torch.no_grad(),
        kv_cache_reaches_attention(gpt2_bridge),
        gpt2_bridge.hooks(fwd_hooks=capture.fwd_hooks),
    ):
        gpt2_bridge(tokens[:, :10], past_key_values=kv)
        for pos in range(10, tokens.shape[1]):
            gpt2_bridge(tokens[:, pos : pos + 1], past_key_values=kv)
    torch.testing.assert_close(
        capture.to_cache(gpt2_bridge)["pattern", 1],
        capture_patterns(gpt2_bridge, tokens, [1], agg_heads="none")["pattern", 1],
        atol=1e-6,
        rtol=0,
    )


def test_query_chunks_on_a_model_that_ignores_the_kv_cache_are_refused():
    from rat_lens.models import load

    model = load("induction-2l", source="bridge")  # the native bridge keeps no KV cache
    tokens = repeated_tokens(1, 10, 5, seed=0)
    with torch.no_grad():
        logits = model(tokens)
    with pytest.raises(RatLensError, match="ignored the KV cache across query chunks"):
        capture_patterns(model, tokens, [1], query_chunk=4)
    assert hook_count(model) == 0
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), logits)


@pytest.mark.parametrize(
    "chunk, error, message",
    [
        (0, RatLensError, "query_chunk must be >= 1, got 0"),
        ("8", RatLensError, "query_chunk must be an int, 'auto' or None, got '8'"),
        (2.5, RatLensError, "query_chunk must be an int, got 2.5"),
    ],
)
def test_bad_query_chunks_are_named(gpt2_bridge, chunk, error, message, no_typecheck):
    with pytest.raises(error, match=message):
        capture_patterns(gpt2_bridge, repeated_tokens(1, 10, 5, seed=0), [1], query_chunk=chunk)
    assert hook_count(gpt2_bridge) == 0


@pytest.fixture
def small_auto(monkeypatch):
    """query_chunk="auto" thresholds scaled down to the test models' contexts."""
    import rat_lens.capture

    monkeypatch.setattr(rat_lens.capture, "AUTO_ABOVE", 20)
    monkeypatch.setattr(rat_lens.capture, "AUTO_CHUNK", 8)


def query_lengths(model, run) -> list[int]:
    """The query length of layer 0's pattern in each forward that ``run`` makes."""
    seen = []
    with model.hooks(
        fwd_hooks=[
            ("blocks.0.attn.hook_pattern", lambda pattern, hook: seen.append(pattern.shape[-2]))
        ]
    ):
        run()
    return seen


def test_auto_chunks_a_long_prompt_where_the_probe_passes(kv_model, small_auto):
    tokens = repeated_tokens(1, 20, 10, seed=3)  # 31 tokens, over the (scaled) threshold
    seen = query_lengths(kv_model, lambda: capture_patterns(kv_model, tokens, [1]))
    # The probe (16 tokens in chunks of 5, then at once), then the prompt in chunks of 8.
    assert seen == [5, 5, 5, 1, 16, 8, 8, 8, 7]
    torch.testing.assert_close(
        capture_patterns(kv_model, tokens, [1])["pattern", 1],
        capture_patterns(kv_model, tokens, [1], query_chunk=None)["pattern", 1],
        atol=1e-6,
        rtol=0,
    )


def test_auto_runs_one_forward_for_short_padded_or_cacheless_runs(gpt2_bridge, small_auto):
    from rat_lens.models import load

    native = load("induction-2l", source="bridge")  # ignores the KV cache: the probe fails
    tokens = repeated_tokens(2, 20, 10, seed=3)
    seen = query_lengths(native, lambda: capture_patterns(native, tokens, [1]))
    assert seen[-1] == 31 and 8 not in seen
    mask = torch.ones_like(tokens)
    mask[1, 25:] = 0
    assert query_lengths(
        gpt2_bridge, lambda: capture_patterns(gpt2_bridge, tokens, [1], attention_mask=mask)
    ) == [31]
    assert query_lengths(
        gpt2_bridge, lambda: capture_patterns(gpt2_bridge, tokens[:, :20], [1])
    ) == [20]


def tiny_hf_bridge(kind: str):
    """A random HF model (GPT-2: learned positions, fused QKV; Qwen2: rotary, grouped KV heads)
    with room for 1,100 tokens, in a TransformerBridge as users get it for Hugging Face models."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    from rat_lens.models import load_induction_tokenizer

    torch.manual_seed(0)
    if kind == "gpt2":
        hf = GPT2LMHeadModel(
            GPT2Config(
                n_layer=2,
                n_head=4,
                n_embd=32,
                vocab_size=64,
                n_positions=1200,
                attn_implementation="eager",
            )
        )
    else:
        hf = Qwen2ForCausalLM(
            Qwen2Config(
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                hidden_size=32,
                intermediate_size=64,
                vocab_size=64,
                max_position_embeddings=2048,
                attn_implementation="eager",
            )
        )
    return TransformerBridge.boot_transformers(
        "gpt2" if kind == "gpt2" else "Qwen/Qwen2-0.5B",
        hf_model=hf.eval(),
        tokenizer=load_induction_tokenizer(),
    )


@pytest.mark.parametrize("kind", ["gpt2", "qwen2"])
def test_a_long_prompt_runs_in_chunks_by_default_with_the_one_forward_patterns(kind):
    """At the real defaults (no scaled thresholds): 1,100 tokens go in chunks of AUTO_CHUNK over
    the installed transformers' KV cache, whatever it names it, and give one forward's rows."""
    import rat_lens.capture

    model = tiny_hf_bridge(kind)
    tokens = torch.randint(1, 64, (1, 1100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(tokens[:, :4])  # the bridge adds its own pre-hooks on a first forward
    pre_hooks = sum(len(m._forward_pre_hooks) for m in model.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed probe would warn
        seen = query_lengths(
            model, lambda: capture_patterns(model, tokens, [0, 1], agg_heads="none")
        )
    chunk = rat_lens.capture.AUTO_CHUNK
    expected = [chunk] * (1100 // chunk) + [1100 % chunk] * (1100 % chunk > 0)
    assert seen[-len(expected) :] == expected
    chunked = capture_patterns(model, tokens, [0, 1], agg_heads="none")
    whole = capture_patterns(model, tokens, [0, 1], agg_heads="none", query_chunk=None)
    for name in whole.keys():
        torch.testing.assert_close(chunked[name], whole[name], atol=1e-5, rtol=0)
    assert hook_count(model) == 0
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == pre_hooks


def test_a_failed_probe_on_a_model_that_should_keep_its_cache_warns_once(
    gpt2_bridge, small_auto, monkeypatch
):
    """A cache that is lost between chunks (as the bridge's was under transformers 5.24 before
    the cache reached its attention layers) is found by the probe, said once, and the prompt
    runs in one forward."""
    from transformers import DynamicCache

    import rat_lens.capture

    monkeypatch.setattr(
        rat_lens.capture,
        "_chunk_kwargs",
        lambda model, tokens: lambda chunk: {"past_key_values": DynamicCache()},
    )
    monkeypatch.setattr(rat_lens.capture, "_warned", __import__("weakref").WeakSet())
    tokens = repeated_tokens(1, 20, 10, seed=3)
    with pytest.warns(RuntimeWarning, match="should continue its KV cache across query chunks"):
        seen = query_lengths(gpt2_bridge, lambda: capture_patterns(gpt2_bridge, tokens, [1]))
    assert seen[-1] == 31
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        capture_patterns(gpt2_bridge, tokens, [1])  # said once per model
