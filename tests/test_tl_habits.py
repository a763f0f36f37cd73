"""What TransformerLens users type out of habit works (issue 23, point 4): numpy and 0-d torch
integers as target positions, and ``load(source="hooked")`` wherever HookedTransformer exists."""

import numpy as np
import pytest
import torch

import rat_lens
from rat_lens import RatLensError, Tracer
from rat_lens.models import available_sources, load

TEXT = "cat dog red blue green cat dog red"
OPTIONS = {"layers": (0, 1), "agg_heads": "none"}


@pytest.fixture(scope="module")
def bridge():
    return load("induction-2l")


@pytest.mark.parametrize(
    "target, same_as",
    [
        (np.int64(5), 5),
        (np.int32(-1), -1),
        (np.intp(3), 3),
        (torch.tensor(5), 5),
        (torch.tensor(-2, dtype=torch.int32), -2),
    ],
    ids=repr,
)
def test_numpy_and_0d_torch_integer_targets_trace_as_the_int(bridge, target, same_as):
    got = rat_lens.trace(bridge, TEXT, target, **OPTIONS)
    assert got.to_dict() == rat_lens.trace(bridge, TEXT, same_as, **OPTIONS).to_dict()
    assert type(got.target_pos) is int


@pytest.mark.parametrize(
    "targets",
    [np.array([3, -1]), [np.int64(3), torch.tensor(-1)], torch.tensor([3, -1])],
    ids=["numpy array", "list of numpy and torch", "1-d torch tensor"],
)
def test_several_targets_from_numpy_or_torch_trace_as_ints(bridge, targets):
    tracer = Tracer(bridge)
    tokens = bridge.to_tokens(TEXT)
    got = tracer.trace_batch(tokens, targets, **OPTIONS)
    want = tracer.trace_batch(tokens, [3, -1], **OPTIONS)
    assert [r.to_dict() for r in got] == [r.to_dict() for r in want]


@pytest.mark.parametrize(
    "target",
    [np.float64(3.0), torch.tensor(3.0), np.bool_(True), torch.tensor(True), 2.5],
    ids=repr,
)
def test_non_integer_targets_stay_refused_by_name(bridge, target, no_typecheck):
    with pytest.raises(RatLensError, match="target_pos"):
        rat_lens.trace(bridge, TEXT, target, **OPTIONS)


def test_source_hooked_loads_where_transformer_lens_has_it_else_says_why():
    if "hooked" in available_sources():
        hooked, bridge = (
            load(source="hooked"),
            load(source="bridge" if "bridge" in available_sources() else "hooked"),
        )
        tokens = hooked.to_tokens(TEXT)
        assert type(hooked).__name__ == "HookedTransformer"
        torch.testing.assert_close(hooked(tokens), bridge(tokens), atol=1e-4, rtol=1e-4)
        return
    with pytest.raises(RatLensError) as caught:
        load("induction-2l", source="hooked")
    message = str(caught.value)
    assert "HookedTransformer was removed in TransformerLens 4.0" in message
    assert "source='bridge'" in message and "transformer-lens<4" in message


def test_value_norm_edges_follow_weights_edited_in_place(bridge):
    """An edit of W_O between traces (a user's own ablation) reaches the next trace's value-norm
    shares: the factor kept per attention module is dropped once its weights change."""
    from rat_lens.capture import capture_contributions

    tokens = bridge.to_tokens(" ".join([TEXT] * 6))  # long enough to factor W_O (norm_factor)
    weight = bridge.blocks[0].attn.W_O._base  # the Parameter W_O views
    saved = weight.detach().clone()
    Tracer(bridge).trace(tokens, -1, **OPTIONS)  # keeps the factor of the weights as they are
    try:
        with torch.no_grad():
            weight.mul_(3.0)
        result = Tracer(bridge).trace(tokens, -1, **OPTIONS)
        shares = capture_contributions(bridge, tokens, [0, 1], "value_norm")  # from W_O itself
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    edges = [
        (beam.layers[i], beam.heads[i], beam.positions[i], beam.positions[i + 1], w)
        for beam in result.beams
        for i, w in enumerate(beam.edge_weights)
        if beam.heads[i] is not None
    ]
    assert any(layer == 0 for layer, *_ in edges)  # the edited layer is read
    for layer, head, query, key, w in edges:
        assert w == pytest.approx(float(shares[layer][0, head, query, key]), rel=1e-5)
