"""Known circuits found at full depth on a real model (SmolLM2-135M, 30 layers x 9 heads).

The default per-head layers trace (edges weighted by what each head wrote) must walk the
induction circuit from a repeated token: an induction head to the token after the earlier copy,
then a previous-token head to the earlier copy itself; and ablating that route must cost the
prediction far more than random routes of the same shape. The heads' roles come from
TransformerLens's own head detector on the same prompts (the oracle), not from the trace.
"""

import statistics

import pytest
import torch
from test_models_hf import needs_smollm2
from transformer_lens.head_detector import detect_head

from rat_lens import verify
from rat_lens.models import load
from rat_lens.tracer import Tracer

HALF = 20
SEEDS = (11, 12, 13, 14)


@pytest.fixture(scope="module")
def smollm2():
    return load("smollm2")


def repeat(model, seed: int) -> torch.Tensor:
    """BOS, HALF random tokens, the same HALF again."""
    half = torch.randint(1000, 20000, (1, HALF), generator=torch.Generator().manual_seed(seed))
    return torch.cat([torch.tensor([[model.tokenizer.bos_token_id]]), half, half], dim=1)


def roles(model, prompts) -> dict[str, set]:
    """Heads scoring > 0.5 on TransformerLens's detector (BOS excluded), over the prompts."""
    texts = [model.to_string(tokens[0, 1:]) for tokens in prompts]
    found = {}
    for kind in ("induction_head", "previous_token_head"):
        score = torch.stack([detect_head(model, t, kind, exclude_bos=True) for t in texts]).mean(0)
        found[kind] = {tuple(x) for x in (score > 0.5).nonzero().tolist()}
    return found


def moves(beam) -> list[tuple]:
    """(layer, head, from, to) of each edge that changes position, top first."""
    return [
        (beam.layers[i], beam.heads[i], beam.positions[i], beam.positions[i + 1])
        for i in range(beam.num_edges)
        if beam.positions[i + 1] != beam.positions[i]
    ]


@pytest.mark.slow
@needs_smollm2
def test_full_depth_routes_follow_the_induction_circuit(smollm2):
    prompts = [repeat(smollm2, seed) for seed in SEEDS]
    known = roles(smollm2, prompts)
    assert known["induction_head"] and known["previous_token_head"]
    tracer = Tracer(smollm2)
    first = second = total = 0
    for tokens in prompts:
        targets = list(range(HALF + 2, 2 * HALF + 1))  # the copy, after its first token
        results = tracer.trace_batch(tokens, targets, layers=(0, 29), agg_heads="none")
        for q, result in zip(targets, results):
            assert result.edge_weight == "value_norm"  # the default for per-head layers traces
            total += 1
            found = moves(result.beams[0])
            (layer, head, _, key), *rest = found
            if (layer, head) in known["induction_head"] and key == q - HALF + 1:
                first += 1
                if rest:
                    layer, head, _, key = rest[0]
                    second += (layer, head) in known["previous_token_head"] and key == q - HALF
    assert first >= 0.8 * total, f"first hop {first}/{total}"
    assert second >= 0.5 * first, f"second hop {second}/{first}"


@pytest.mark.slow
@needs_smollm2
def test_ablating_the_top_route_costs_ten_times_random_routes(smollm2):
    tokens = repeat(smollm2, SEEDS[0])
    targets = [HALF + 6, HALF + 12, HALF + 18]
    results = Tracer(smollm2).trace_batch(tokens, targets, layers=(0, 29), agg_heads="none")
    ratios = [
        verify(smollm2, r, n_random=10, token_importance=False, percents=()).beams[0].effect.ratio
        for r in results
    ]
    assert statistics.median(ratios) >= 10, ratios
