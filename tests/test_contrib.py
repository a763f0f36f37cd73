"""Contribution weights equal a straightforward full decomposition of the attention block."""

import pytest
import torch
from conftest import hook_count
from test_capture import tiny_hf_bridge

from rat_lens import RatLensError
from rat_lens.capture import capture_contributions
from rat_lens.models import repeated_tokens


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
