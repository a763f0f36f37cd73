"""Attention statistics against hand-computed values; rollout against a plain product loop."""

import math

import numpy as np
import pytest
import torch

from rat_lens import RatLensError
from rat_lens.result import HeadTable
from rat_lens.search.stats import (
    STAT_NAMES,
    attention_rollout,
    attention_stats,
    beam_mass_importance,
    entropy,
    max_weight,
    prev_mass,
    rollout_importance,
    rollout_rows,
    self_mass,
    sink_mass,
    top_predictions,
)

N = 5


def causal_uniform(n: int = N) -> torch.Tensor:
    return torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1.0)[:, None]


def as_heads(*matrices: torch.Tensor) -> torch.Tensor:
    """[head, q, k] -> [batch 1, head, q, k]."""
    return torch.stack(matrices)[None]


def stats_of(matrix: torch.Tensor, **kwargs) -> dict[str, float]:
    stats = attention_stats(as_heads(matrix), **kwargs)
    return {name: value.item() for name, value in stats.items()}


def test_uniform_rows_hand_computed():
    stats = stats_of(torch.full((N, N), 1.0 / N))
    assert stats == pytest.approx(
        {
            "entropy": math.log(N),
            "max_weight": 1 / N,
            "sink_mass": 1 / N,
            "self_mass": 1 / N,
            "prev_mass": 1 / N,
        }
    )


def test_causal_uniform_hand_computed():
    rows = range(N)  # row q is uniform over keys 0..q
    expected = {
        "entropy": sum(math.log(q + 1) for q in rows) / N,
        "max_weight": sum(1 / (q + 1) for q in rows) / N,
        "sink_mass": sum(1 / (q + 1) for q in rows) / N,
        "self_mass": sum(1 / (q + 1) for q in rows) / N,
        "prev_mass": sum(1 / (q + 1) for q in range(1, N)) / (N - 1),  # row 0 has no previous
    }
    assert stats_of(causal_uniform()) == pytest.approx(expected)


def test_one_hot_patterns_hand_computed():
    identity = torch.eye(N)
    assert stats_of(identity) == pytest.approx(
        {"entropy": 0.0, "max_weight": 1.0, "sink_mass": 1 / N, "self_mass": 1.0, "prev_mass": 0.0}
    )
    previous = torch.eye(N).roll(-1, dims=1).tril()
    previous[0, 0] = 1.0  # row 0 can only read itself
    assert stats_of(previous) == pytest.approx(
        {
            "entropy": 0.0,
            "max_weight": 1.0,
            "sink_mass": 2 / N,
            "self_mass": 1 / N,
            "prev_mass": 1.0,
        }
    )
    to_bos = torch.zeros(N, N)
    to_bos[:, 0] = 1.0  # the attention sink
    assert stats_of(to_bos) == pytest.approx(
        {
            "entropy": 0.0,
            "max_weight": 1.0,
            "sink_mass": 1.0,
            "self_mass": 1 / N,
            "prev_mass": 1 / (N - 1),
        }
    )


def test_query_mask_and_sink_positions():
    pattern = as_heads(causal_uniform())
    keep = torch.tensor([[False, False, True, True, False]])  # rows 2 and 3 only
    assert entropy(pattern, keep).item() == pytest.approx((math.log(3) + math.log(4)) / 2)
    assert prev_mass(pattern, keep).item() == pytest.approx((1 / 3 + 1 / 4) / 2)
    sinks = torch.tensor([[True, True, False, False, False]])  # e.g. BOS at 0 and 1
    assert sink_mass(pattern, sink=sinks).item() == pytest.approx(
        (1 + 1 + 2 / 3 + 2 / 4 + 2 / 5) / N
    )
    nothing = torch.zeros(1, N, dtype=torch.bool)
    assert max_weight(pattern, nothing).item() == 0.0  # no row counted: 0, not NaN


def test_shapes_per_head_and_stacked_layers():
    pattern = torch.rand(3, 2, 4, 6, 6).softmax(-1)  # [layer, batch, head, q, k]
    mask = torch.ones(2, 6, dtype=torch.bool)  # [batch, query] broadcasts over layer and head
    stats = attention_stats(pattern, mask)
    assert list(stats) == list(STAT_NAMES)
    assert all(value.shape == (3, 2, 4) for value in stats.values())
    one = attention_stats(pattern[1, 0, 2][None, None])
    assert all(stats[n][1, 0, 2].item() == pytest.approx(one[n].item()) for n in STAT_NAMES)
    assert self_mass(pattern).shape == (3, 2, 4)


def test_shape_annotations_are_checked():
    with pytest.raises(Exception, match="(?i)type|shape|dimension"):
        entropy(torch.ones(4, 4))  # no head axis


def random_patterns(layers: int, batch: int, heads: int, seq: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(layers, batch, heads, seq, seq, generator=g, dtype=torch.float64) * 2
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(-1)


def rollout_by_hand(patterns: np.ndarray, residual: float) -> np.ndarray:
    """[layer, head, q, k] -> [q, k]: the paper's recipe written out with plain loops."""
    n_layers, n_heads, seq, _ = patterns.shape
    result = np.eye(seq)
    for layer in range(n_layers):  # bottom first: R_l = Ã_l · R_(l-1)
        mixed = np.zeros((seq, seq))
        for q in range(seq):
            for k in range(seq):
                avg = sum(patterns[layer, h, q, k] for h in range(n_heads)) / n_heads
                mixed[q, k] = (1 - residual) * avg + residual * (q == k)
            mixed[q] /= mixed[q].sum()
        product = np.zeros((seq, seq))
        for q in range(seq):
            for k in range(seq):
                product[q, k] = sum(mixed[q, j] * result[j, k] for j in range(seq))
        result = product
    return result


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("residual", [0.5, 0.0, 0.8])
def test_rollout_equals_plain_matrix_product_loop(seed, residual):
    patterns = random_patterns(layers=3, batch=2, heads=3, seq=7, seed=seed)
    rollout = attention_rollout(patterns, residual)
    assert rollout.shape == (2, 7, 7)
    for b in range(2):
        expected = rollout_by_hand(patterns[:, b].numpy(), residual)
        np.testing.assert_allclose(rollout[b].numpy(), expected, rtol=1e-10, atol=1e-12)
        for target in range(7):  # the row-only path agrees with the full matrix
            np.testing.assert_allclose(
                rollout_importance(patterns[:, b], target, residual).numpy(),
                expected[target],
                rtol=1e-10,
                atol=1e-12,
            )
        order = [6, 0, 3, 3]  # several targets in one pass, any order, repeats allowed
        np.testing.assert_allclose(
            rollout_rows(patterns[:, b], order, residual).numpy(),
            expected[order],
            rtol=1e-10,
            atol=1e-12,
        )
    torch.testing.assert_close(rollout.sum(-1), torch.ones(2, 7, dtype=torch.float64))


def test_rollout_of_one_layer_and_bad_residual():
    pattern = causal_uniform()[None, None]  # [layer 1, head 1, q, k]
    expected = 0.5 * causal_uniform() + 0.5 * torch.eye(N)
    torch.testing.assert_close(attention_rollout(pattern), expected)
    with pytest.raises(RatLensError, match="residual_share=1.5"):
        attention_rollout(pattern, residual_share=1.5)


def test_beam_mass_importance_and_top_predictions():
    importance = beam_mass_importance(torch.tensor([3, 1, 3]), torch.tensor([0.2, 0.5, 0.1]), 5)
    torch.testing.assert_close(importance, torch.tensor([0.0, 0.5, 0.0, 0.3, 0.0]))
    logits = torch.randn(4, 11)
    probs, ids = top_predictions(logits, torch.tensor([3, 0]), k=4)
    expected = logits[[3, 0]].softmax(-1).topk(4)
    torch.testing.assert_close(probs, expected.values)
    assert ids.tolist() == expected.indices.tolist()
    assert top_predictions(logits, [1], k=50)[0].shape == (1, 11)  # k capped at the vocabulary


def test_head_table_round_trip_and_lookup():
    table = HeadTable.from_tensors([0, 2], {"entropy": torch.tensor([[0.1, 0.2], [0.3, 0.4]])})
    assert table.get("entropy", 2, 1) == pytest.approx(0.4)
    assert table.get("entropy", 1, 0) is None and table.get("nope", 0, 0) is None
    assert table.get("entropy", 0, None) is None  # per-head table: no aggregated value
    assert HeadTable.from_dict(table.to_dict()) == table
    aggregated = HeadTable.from_tensors([5], {"entropy": torch.tensor([[1.5]])}, aggregated=True)
    assert aggregated.get("entropy", 5, None) == 1.5


def test_head_table_shape_error(no_typecheck):
    with pytest.raises(RatLensError, match=r"scores\['x'\] has shape \(3,\)"):
        HeadTable.from_tensors([0], {"x": torch.zeros(3)})
