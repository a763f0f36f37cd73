"""Tests for realistic bugs that no other test caught when the code was deliberately broken
(issue 23): each test names the broken copy it catches, and each was checked by breaking the code
that way and watching the test fail."""

import copy

import pytest
import torch

import rat_lens
from rat_lens.causal import ablate_pattern
from rat_lens.models import load
from rat_lens.result import Beam

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
    """Broken copy: verify paired a beam's head edges with ``edge_attns`` by rank, so a head edge
    after a stay got the stay's weight, and the curve kept the wrong edge first."""
    t = per_head.target_pos
    after_stay = (0, 1, t, 3)  # (layer, head, query, key): read after a stay at layer 1
    before_stay = (1, 0, t, 4)  # read at layer 1, then a stay at layer 0
    result = copy.deepcopy(per_head)
    result.beams = [
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
