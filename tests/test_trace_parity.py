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

    assert_same_beams(got, expected, params["length_norm"])
    for g in got:
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


# Ties. Continuous random attention never has two equal weights, but real patterns do: uniform
# rows (early positions, padding), sink-heavy rows whose small rest is spread evenly, weights
# quantised by low precision. Which of several equal keys a step keeps, and in which order, then
# decides the beams; the peer's choice is torch.topk's on CPU over row[:q] (libstdc++'s
# nth_element + sort), and chain mode must make the same one.

TIE_KINDS = ["uniform", "levels", "equal_rows", "sink"]


def tied_attention(gen: torch.Generator, rng: random.Random, n: int, kind: str) -> torch.Tensor:
    """A causal, row-stochastic matrix full of exactly equal weights within rows."""
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    if kind == "uniform":
        raw = causal.double()
    elif kind == "levels":  # rounded to 2–4 levels; floor also makes exact zeros
        levels = rng.randint(2, 4)
        p = random_attention(gen, n, peaked=rng.random() < 0.5)
        scaled = p / p.amax(-1, keepdim=True) * levels
        raw = (scaled.floor() if rng.random() < 0.5 else scaled.ceil()).clamp_min(0).double()
        raw[torch.arange(n), torch.arange(n)] += 1.0  # no empty row
    elif kind == "equal_rows":  # some rows uniform, some two-valued, the rest continuous
        raw = random_attention(gen, n, peaked=rng.random() < 0.5).double()
        for q in range(n):
            u = rng.random()
            if u < 0.4:
                raw[q, : q + 1] = 1.0
            elif u < 0.6:
                raw[q, : q + 1] = torch.tensor([rng.choice([1.0, 3.0]) for _ in range(q + 1)])
    else:  # sink: most of each row on position 0, the rest equal (or on two levels)
        raw = causal.double()
        sink = torch.tensor([rng.choice([5.0, 20.0, 100.0]) for _ in range(n)], dtype=torch.double)
        raw[:, 0] = sink
        if rng.random() < 0.5:
            raw = raw * (1 + (torch.rand(n, n, generator=gen) < 0.3)).tril()
    attn = raw / raw.sum(-1, keepdim=True)
    return attn.to(torch.float64 if rng.random() < 0.1 else torch.float32)


def tied_case(seed: int):
    rng = random.Random(10_000 + seed)
    gen = torch.Generator().manual_seed(10_000 + seed)
    kind = TIE_KINDS[seed % len(TIE_KINDS)]
    long = rng.random() < 0.15  # rows of >= 64·top_k keys: torch.topk's partial_sort branch
    n = rng.randint(64, 200) if long else rng.randint(1, 40)
    attn = tied_attention(gen, rng, n, kind)
    bos = sorted(rng.sample(range(n), rng.randint(0, min(3, n)))) if rng.random() < 0.5 else []
    mask = None
    if rng.random() < 0.3:
        mask = (torch.rand(n, generator=gen) > 0.2).long()
    params = dict(
        target_pos=rng.randint(n // 2, n - 1) if long else rng.randint(0, n - 1),
        top_beam=rng.choice([1, 2, 3, 5, 10]) if long else rng.choice([1, 2, 3, 5, 10, 20]),
        top_k=rng.choice([1, 2]) if long else rng.choice([1, 2, 3, 5, 8]),
        min_attn=rng.choice([0.0, 0.0, 0.0, 0.01, 0.05, 0.2]),
        length_norm=rng.choice(LENGTH_NORMS),
        stop_at_bos=rng.random() < 0.6,
    )
    return attn, bos, mask, params


def peer_beams(attn, bos, mask, params):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return beam_search_backward(attn, bos_positions=bos, attention_mask=mask, **params)


def assert_same_beams(got, expected, length_norm):
    """Positions, weights and scores identical to the peer's, bit for bit, in the same order."""
    assert [b.positions for b in got] == [e.positions for e in expected]
    for g, e in zip(got, expected):
        assert g.edge_weights == e.edge_attns
        assert g.edge_attns == e.edge_attns  # the peer's weights are attention
        assert g.score_raw == e.log_score
        assert g.score_norm == normalize_score(e.log_score, e.num_edges, length_norm)


@pytest.mark.parametrize("seed", range(320))
def test_chain_mode_matches_reverse_attention_on_tied_attention(seed):
    attn, bos, mask, params = tied_case(seed)
    got = trace_attention(attn, bos_positions=bos, attention_mask=mask, **params)
    assert_same_beams(got, peer_beams(attn, bos, mask, params), params["length_norm"])


def test_uniform_attention_keeps_the_peers_tied_keys():
    """Row 6 of uniform causal attention is 1/7 on keys 0..6. torch.topk(row[:6], 3) on CPU
    keeps keys 3, 5, 4 in that order, so the single beam goes 6 → 3; row 3 gives 0, 1, 2 (1/4
    each): 0 ends, 1 and 2 tie and 1, expanded first, survives the cut to one beam; then 1 → 0."""
    attn = torch.ones(7, 7).tril()
    attn = attn / attn.sum(-1, keepdim=True)
    params = dict(target_pos=6, top_beam=1, top_k=3)
    got = trace_attention(attn, **params)
    assert [b.positions for b in got] == [[6, 3, 1, 0]]
    assert_same_beams(got, peer_beams(attn, [], None, params), "avg_logprob")


def test_tied_cases_are_really_tied():
    """The tied cases above hold ties where they matter (among the top_k + 1 largest earlier
    weights of a row the search can visit) in most cases; some reach torch.topk's partial_sort
    branch (64·k <= q), some are float64."""
    tied = 0
    for seed in range(320):
        attn, _, _, p = tied_case(seed)
        rows = [attn[q, :q] for q in range(1, p["target_pos"] + 1)]
        top = [r.topk(min(p["top_k"] + 1, len(r))).values for r in rows]
        tied += any(bool(((t[1:] == t[:-1]) & (t[1:] > 0)).any()) for t in top)
    assert tied >= 200
    long = [tied_case(s) for s in range(320)]
    assert any(p["target_pos"] >= 64 * p["top_k"] for _, _, _, p in long)
    assert any(a.dtype == torch.float64 for a, _, _, _ in long)


def test_scores_add_the_peers_log_bit_for_bit():
    """Row 3 sends w to key 0 (one edge) and to key 2, from where w, w lead on to 0 (three
    edges): the two paths score log w and (log w + log w + log w) / 3, equal or one ulp apart
    depending on the last bit of log w. With this w NumPy's vectorised log (AVX-512) and
    math.log differ in that bit, which decided the single beam kept before scores used math.log
    as the peer does."""
    w = 0.26295047998428345  # a float32 value
    attn = torch.tensor([[1, 0, 0, 0], [w, 1 - w, 0, 0], [0, w, 1 - w, 0], [w, 0, w, 1 - 2 * w]])
    params = dict(target_pos=3, top_beam=1, top_k=2)
    got = trace_attention(attn, **params)
    assert_same_beams(got, peer_beams(attn, [], None, params), "avg_logprob")
    assert [b.positions for b in got] == [[3, 2, 1, 0]]
