"""Chain mode reproduces reverse-attention 0.1.0's beam search exactly (the peer is the oracle)."""

import random
import warnings

import pytest
import torch
from reverse_attention.beam import beam_search_backward
from reverse_attention.utils import normalize_score

from rat_lens.search.beam import trace_attention

LENGTH_NORMS = ["none", "avg_logprob", "sqrt", "pow:0.7", "pow:1.5"]


def random_attention(gen: torch.Generator, n: int, peaked: bool) -> torch.Tensor:
    """A causal, row-stochastic matrix; ``peaked`` rows look like trained heads (one big entry)."""
    logits = torch.randn(n, n, generator=gen) * (4.0 if peaked else 1.0)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    return logits.masked_fill(~causal, float("-inf")).softmax(-1)


def case(seed: int):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    n = rng.randint(1, 40)
    attn = random_attention(gen, n, peaked=rng.random() < 0.5)
    bos = sorted(rng.sample(range(n), rng.randint(0, min(3, n)))) if rng.random() < 0.7 else []
    mask = None
    if rng.random() < 0.4:
        mask = (torch.rand(n, generator=gen) > 0.2).long()
    params = dict(
        target_pos=rng.randint(0, n - 1),
        top_beam=rng.choice([1, 2, 3, 5, 10, 20]),
        top_k=rng.choice([1, 2, 3, 5, 8]),
        min_attn=rng.choice([0.0, 0.0, 0.01, 0.05, 0.2]),
        length_norm=rng.choice(LENGTH_NORMS),
        stop_at_bos=rng.random() < 0.6,
    )
    return attn, bos, mask, params


@pytest.mark.parametrize("seed", range(300))
def test_chain_mode_matches_reverse_attention(seed):
    attn, bos, mask, params = case(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = beam_search_backward(attn, bos_positions=bos, attention_mask=mask, **params)
    got = trace_attention(attn, bos_positions=bos, attention_mask=mask, **params)

    assert [b.positions for b in got] == [e.positions for e in expected]
    for g, e in zip(got, expected):
        assert g.edge_attns == pytest.approx(e.edge_attns, abs=1e-6)
        assert g.score_raw == pytest.approx(e.log_score, abs=1e-6)
        norm = normalize_score(e.log_score, e.num_edges, params["length_norm"])
        assert g.score_norm == pytest.approx(norm, abs=1e-6)
        assert g.layers == [0] * g.num_edges and g.heads == [None] * g.num_edges


def test_parity_cases_cover_the_parameter_space():
    """The seeded cases above really mix every option (so the parity claim is not vacuous)."""
    cases = [case(s) for s in range(300)]
    assert {p["length_norm"] for _, _, _, p in cases} == set(LENGTH_NORMS)
    assert any(m is not None for _, _, m, _ in cases) and any(b for _, b, _, _ in cases)
    assert {p["stop_at_bos"] for _, _, _, p in cases} == {True, False}
    assert any(p["min_attn"] > 0 for _, _, _, p in cases)
    long_paths = 0
    for attn, bos, mask, p in cases[:60]:
        beams = trace_attention(attn, bos_positions=bos, attention_mask=mask, **p)
        long_paths += any(b.num_edges >= 3 for b in beams)
    assert long_paths >= 10
