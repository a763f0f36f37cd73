"""Tests for realistic bugs that no other test caught when the code was deliberately broken
(issue 23): each test names the broken copy it catches, and each was checked by breaking the code
that way and watching the test fail."""

import copy
import statistics

import pytest
import torch

import rat_lens
from rat_lens import RatLensError, TraceResult
from rat_lens.assemble import HEAD_ROW_KEYS
from rat_lens.causal import ablate_pattern
from rat_lens.models import load
from rat_lens.result import Beam
from rat_lens.sankey import build_sankey


def with_beams(result: TraceResult, beams: list) -> TraceResult:
    """A copy of ``result`` holding ``beams``, its texts and graph rebuilt to match (verify
    checks a result before it runs)."""
    edited = copy.deepcopy(result)
    edited.beams = beams
    edited.paths_text = [f"beam {i}" for i in range(len(beams))]
    edited.sankey = build_sankey(beams, edited.tokens, edited.mode, edited.layer)
    return edited


PROMPT = "cat dog red blue cat dog red"


@pytest.fixture(scope="module")
def induction():
    return load("induction-2l")


@pytest.fixture(scope="module")
def per_head(induction):
    """The per-head default trace (value_norm edges, residual stays) of a repeated prompt."""
    return rat_lens.trace(induction, PROMPT, layers=(0, 1), agg_heads="none")


def logp_keeping(model, tokens, rows, keep, token):
    """log p(token) at the last position with every entry of ``rows`` ({layer: query}) ablated
    (renorm) in every head, except the entries ``keep`` ((layer, head, query, key))."""
    n_heads, last = model.cfg.n_heads, len(tokens) - 1
    hooks = []
    for layer, query in rows.items():
        entries = torch.tensor(
            [
                (0, h, query, k)
                for h in range(n_heads)
                for k in range(query + 1)
                if (layer, h, query, k) not in keep
            ]
        )
        hooks.append(
            (
                f"blocks.{layer}.attn.hook_pattern",
                lambda p, hook, e=entries: ablate_pattern(p, e, "renorm"),
            )
        )
    with torch.no_grad():
        logits = model.run_with_hooks(torch.tensor(tokens)[None], fwd_hooks=hooks)
    return float(logits[0, last].log_softmax(-1)[token])


def test_the_faithfulness_curve_credits_each_head_edge_its_own_weight_not_a_stays(
    induction, per_head
):
    """Broken copy: verify paired a beam's head edges with ``edge_weights`` by rank, so a head edge
    after a stay got the stay's weight, and the curve kept the wrong edge first."""
    t = per_head.target_pos
    after_stay = (0, 1, t, 3)  # (layer, head, query, key): read after a stay at layer 1
    before_stay = (1, 0, t, 4)  # read at layer 1, then a stay at layer 0
    beams = [
        Beam(
            [t, t, 3],
            [0.9, 0.1],
            [1, 0],
            [None, 1],
            [0.0, 0.0],
            0.0,
            0.0,
            kinds=["residual", "head"],
        ),
        Beam(
            [t, 4, 4],
            [0.5, 0.9],
            [1, 0],
            [0, None],
            [0.0, 0.0],
            0.0,
            0.0,
            kinds=["head", "residual"],
        ),
    ]  # equal scores: each beam counts 1/2, so the edges weigh 0.05 and 0.25
    result = with_beams(per_head, beams)
    check = rat_lens.verify(
        induction, result, n_random=0, percents=[50, 100], token_importance=False
    )

    rows = {0: t, 1: t}
    top = check.prediction_id
    right = logp_keeping(induction, result.token_ids[: t + 1], rows, {before_stay}, top)
    wrong = logp_keeping(induction, result.token_ids[: t + 1], rows, {after_stay}, top)
    assert abs(right - wrong) > 1e-3  # the two orders are told apart by the metric
    assert check.faithfulness.kept_edges == [1, 2]
    assert check.faithfulness.metric[0] == pytest.approx(right, abs=1e-5)


# Broken copy: PatternCapture's default aggregation changed (max, sum, one head).
def test_pattern_capture_averages_the_heads_by_default(induction):
    tokens = induction.to_tokens(PROMPT)
    capture = rat_lens.PatternCapture([0, 1])
    induction.run_with_hooks(tokens, fwd_hooks=capture.fwd_hooks)
    _, cache = induction.run_with_cache(tokens)
    for layer in (0, 1):
        full = cache["pattern", layer]  # [batch, head, query, key]
        mean = full.sum(1, keepdim=True) / full.shape[1]
        torch.testing.assert_close(capture.to_cache(induction)["pattern", layer], mean)


# Broken copy: renorm rescaled a touched row to sum to 1 instead of to its own old sum.
def test_renorm_keeps_a_rows_own_sum_when_it_is_not_one():
    pattern = torch.tensor([[[[0.3, 0.2, 0.1], [0.5, 0.25, 0.25]]]])  # rows sum to 0.6 and 1
    out = ablate_pattern(pattern, torch.tensor([[0, 0, 0, 0], [0, 0, 1, 1]]), "renorm")
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.0, 0.4, 0.2]))
    torch.testing.assert_close(out[0, 0, 1], torch.tensor([2 / 3, 0.0, 1 / 3]))


# Broken copies: p-value without the +1s, or counting only random paths strictly above.
def test_the_p_value_of_a_path_effect_on_a_small_case():
    effect = rat_lens.result.PathEffect.against(2.0, [1.0, 2.0, 3.0, 0.5])
    assert effect.p_value == (1 + 2) / (1 + 4)  # 2.0 and 3.0 are at least as large
    assert effect.baseline_mean == 1.625
    assert effect.baseline_std == pytest.approx(statistics.stdev([1.0, 2.0, 3.0, 0.5]))
    assert effect.ratio == pytest.approx(2.0 / 1.625)
    assert rat_lens.result.PathEffect.against(4.0, [1.0, 2.0, 3.0]).p_value == 0.25


def same_shape_paths(beam, lowest: int) -> list[list[int]]:
    """Every path of ``beam``'s shape: each move to any key from ``lowest`` to its query, each
    stay where it is."""
    paths = [[beam.positions[0]]]
    for i in range(beam.num_edges):
        if beam.is_residual(i):
            paths = [p + [p[-1]] for p in paths]
        else:
            paths = [p + [k] for p in paths for k in range(lowest, p[-1] + 1)]
    return paths


# Broken copy: the random paths of a per-head beam ablated every head at each edge (or other
# heads than the beam's), so the baseline was not a path of the beam's shape.
def test_random_paths_of_a_per_head_beam_ablate_one_head_per_edge_like_the_beam(
    induction, per_head
):
    lowest = int(per_head.exclude_bos)
    candidates, owner = [], []
    for b, beam in enumerate(per_head.beams):
        for path in same_shape_paths(beam, lowest):
            n = beam.num_edges
            zeros = [0.0] * n
            candidates.append(
                Beam(path, [0.5] * n, beam.layers, beam.heads, zeros, 0.0, 0.0, kinds=beam.kinds)
            )
            owner.append(b)
    assert any(h is not None for beam in per_head.beams for h in beam.heads)
    every = with_beams(per_head, candidates)
    options = dict(percents=[], token_importance=False)
    drops = rat_lens.verify(induction, every, n_random=0, **options)
    possible = [[e.effect.effect for e, o in zip(drops.beams, owner) if o == b] for b in range(5)]
    check = rat_lens.verify(induction, per_head, n_random=12, **options)
    for b, effect in enumerate(check.beams):
        assert len(effect.effect.baseline) == 12
        for drop in effect.effect.baseline:
            assert min(abs(drop - p) for p in possible[b]) < 1e-5, (b, drop)


# Broken copy: the unpadded batch of contribution shares read one prompt's values or residual
# stream for all.
def test_contribution_traces_of_a_batch_equal_each_prompt_alone(induction):
    texts = ["cat dog red blue cat dog", "sun moon sky tree sun moon"]
    tracer = rat_lens.Tracer(induction)
    _, mask = tracer.tokenize(texts)
    assert mask.all()  # the same length: no padding, the batch runs as one forward
    options = dict(layers=(0, 1), agg_heads="none", edge_weight="contribution")
    batch = tracer.trace_batch(texts, -1, **options)
    alone = [tracer.trace_batch([t], -1, **options)[0] for t in texts]
    for got, want in zip(batch, alone):  # a batched matmul rounds differently: ~1e-6
        assert [route(b) for b in got.beams] == [route(b) for b in want.beams]
        for b, a in zip(got.beams, want.beams):
            assert b.edge_weights == pytest.approx(a.edge_weights, abs=1e-5)
            assert b.score_norm == pytest.approx(a.score_norm, rel=1e-3, abs=1e-5)
    assert [route(b) for b in batch[0].beams] != [route(b) for b in batch[1].beams]


def route(beam) -> tuple:
    return beam.positions, beam.layers, beam.heads, beam.kinds


# Broken copy: the bounded store let the diagonal or a sink left out by exclude_bos take one of
# a row's kept slots, so the strongest candidate key below them was dropped.
def test_the_bounded_stores_diagonal_and_sinks_do_not_take_kept_slots():
    from rat_lens.search.store import TopKeysBuilder

    row = torch.tensor([0.4, 0.1, 0.2, 0.3])  # query 3: sink 0.4 > diagonal 0.3 > key 2 (0.2)
    pattern = torch.zeros(1, 1, 4, 4)
    pattern[0, 0] = torch.eye(4)
    pattern[0, 0, 3] = row
    key_ok = torch.tensor([[False, True, True, True]])  # exclude_bos: position 0 no candidate
    builder = TopKeysBuilder(4, keep=1, key_ok=key_ok, sink_keys=[0])
    builder.add(pattern)
    store = builder.build()[0]
    torch.testing.assert_close(
        store[:, [3]][0, 0], row.clone().index_fill_(0, torch.tensor([1]), 0)
    )
    keys, weights = store.row(0, 3)
    assert keys.tolist() == [0, 2, 3]
    torch.testing.assert_close(weights, torch.tensor([0.4, 0.2, 0.3]))


# Broken copy: a chain beam that steps to the same position again loaded (chain mode moves to
# an earlier position at every edge; only layers mode may stay).
def test_a_saved_chain_beam_that_repeats_a_position_is_refused(induction):
    chain = rat_lens.trace(induction, PROMPT, layer=1, top_beam=1)
    data = chain.to_dict()
    beam = data["beams"][0]
    assert data["mode"] == "chain" and len(beam["positions"]) >= 3
    beam["positions"][2] = beam["positions"][1]
    with pytest.raises(RatLensError, match=r"positions\[2\].*earlier"):
        TraceResult.from_dict(data)


@pytest.fixture(scope="module")
def uniform_gpt2():
    """A random GPT-2 whose queries and keys are 0: every attention row is uniform, an exact
    tie over all its keys, and rows are longer than the head rows' 64 kept keys."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import GPT2Config, GPT2LMHeadModel

    from rat_lens.models import load_induction_tokenizer

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_head=2, n_embd=16, vocab_size=64, n_positions=128, attn_implementation="eager"
    )
    hf = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for block in hf.transformer.h:
            block.attn.c_attn.weight[:, : 2 * config.n_embd] = 0.0  # queries and keys
            block.attn.c_attn.bias[: 2 * config.n_embd] = 0.0
    return TransformerBridge.boot_transformers(
        "gpt2", hf_model=hf, tokenizer=load_induction_tokenizer()
    )


# Broken copy: the head rows' cut at HEAD_ROW_KEYS keys broke ties by the later key (or by no
# rule), not the earlier key as documented.
@pytest.mark.parametrize("store", ["dense", "bounded"])
def test_a_tie_at_the_head_rows_cut_keeps_the_earlier_keys(uniform_gpt2, store):
    tokens = torch.randint(1, 64, (1, 100), generator=torch.Generator().manual_seed(1))
    tokens[0, 0] = 0
    tracer = rat_lens.Tracer(uniform_gpt2)
    options = dict(layers=(0, 1), agg_heads="none", edge_weight="attention", store=store)
    result = tracer.trace_batch(tokens, [99], **options)[0]
    long_rows = [row for row in result.head_rows if row["query"] >= HEAD_ROW_KEYS]
    assert long_rows
    for row in long_rows:
        beam_keys = {
            beam.positions[i + 1]
            for beam in result.beams
            for i in range(beam.num_edges)
            if (beam.layers[i], beam.heads[i], beam.positions[i])
            == (row["layer"], row["head"], row["query"])
        }
        assert row["keys"] == sorted(set(range(HEAD_ROW_KEYS)) | beam_keys)
        assert row["weights"] == [round(1 / (row["query"] + 1), 6)] * len(row["keys"])
