"""Head roles: TransformerLens's detector scores, from token ids, padding and caches included."""

import pytest
import torch
from transformer_lens import head_detector
from transformer_lens.head_detector import detect_head

from rat_lens import RatLensError
from rat_lens.models import load, repeated_tokens
from rat_lens.roles import ROLE_NAMES, detection_patterns, head_roles, role_scores

TEXT = "cat dog red blue green cat dog red blue"


def table(roles, name: str) -> torch.Tensor:
    """One score of a HeadTable as a [layer, head] tensor."""
    return torch.tensor(roles.scores[name], dtype=torch.float64)


def test_detection_patterns_are_tls():
    tokens = torch.tensor([0, 4, 9, 4, 9, 4])
    patterns = detection_patterns(tokens)
    assert list(patterns) == list(ROLE_NAMES)
    for name in ROLE_NAMES:
        tl = getattr(head_detector, f"get_{name}_detection_pattern")(tokens)
        assert torch.equal(patterns[name], tl.float())
    # 9@4 occurred before at 2, so an induction head reads what followed it: position 3
    assert patterns["induction_head"][4].tolist() == [0, 0, 0, 1, 0, 0]
    assert patterns["induction_head"][5].tolist() == [0, 0, 1, 0, 1, 0]


def hand_heads(seq: int) -> torch.Tensor:
    """[head 3, q, k]: a previous-token head, a self head, an induction head for period-3 tokens."""
    previous = torch.eye(seq).roll(-1, dims=1).tril()
    previous[0, 0] = 1.0
    induction = torch.eye(seq)
    for q in range(4, seq):  # token q occurred at q - 3; the token after it sits at q - 2
        induction[q] = 0.0
        induction[q, q - 2] = 1.0
    return torch.stack([previous, torch.eye(seq), induction])


def test_role_scores_on_hand_made_heads():
    tokens = torch.tensor([[0, 7, 8, 9, 7, 8, 9]])
    pattern = hand_heads(7)[None]
    before = pattern.clone()
    scores = role_scores(pattern, tokens, exclude_bos=True)
    assert torch.equal(pattern, before)  # scoring copies: TL's detector may write into it
    # With BOS excluded, the previous-token head keeps rows 2..6, all on q - 1.
    assert scores["previous_token_head"][0].tolist() == pytest.approx([1.0, 0.0, 0.0])
    assert scores["duplicate_token_head"][0].tolist() == pytest.approx([0.0, 0.0, 0.0])
    # The induction head: rows 1..3 read themselves, rows 4..6 the induction key: 3 of 6.
    assert scores["induction_head"][0].tolist() == pytest.approx([0.0, 0.0, 0.5])
    with_bos = role_scores(pattern, tokens)  # row 1 of the previous-token head now counts
    assert with_bos["previous_token_head"][0].tolist() == pytest.approx([6 / 7, 0.0, 0.0])


def test_padding_is_cut_out_before_scoring():
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(1, 50, (n,), generator=g) for n in (9, 6)]
    patterns = [torch.rand(2, n, n, generator=g).tril().softmax(-1) for n in (9, 6)]
    tokens = torch.zeros(2, 9, dtype=torch.long)
    padded = torch.zeros(2, 2, 9, 9)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for b, (row, pat) in enumerate(zip(rows, patterns)):
        tokens[b, : len(row)], padded[b, :, : len(row), : len(row)], mask[b, : len(row)] = (
            row,
            pat,
            1,
        )
    batched = role_scores(padded, tokens, attention_mask=mask)
    for b, (row, pat) in enumerate(zip(rows, patterns)):
        alone = role_scores(pat[None], row[None])
        for name in ROLE_NAMES:
            torch.testing.assert_close(batched[name][b], alone[name][0])


@pytest.mark.parametrize("name", ROLE_NAMES)
@pytest.mark.parametrize("exclude_bos", [False, True])
def test_head_roles_give_detect_heads_numbers(model, name, exclude_bos):
    ours = table(head_roles(model, TEXT, exclude_bos=exclude_bos), name)
    theirs = detect_head(model, TEXT, name, exclude_bos=exclude_bos)
    torch.testing.assert_close(ours, theirs.double(), rtol=0, atol=1e-7)


def test_abs_error_measure_and_lists_of_texts(model):
    texts = [TEXT, "sun moon star sun moon star sun"]
    ours = head_roles(model, texts, names=["induction_head"], error_measure="abs")
    theirs = detect_head(model, texts, "induction_head", error_measure="abs")
    torch.testing.assert_close(table(ours, "induction_head"), theirs.double(), atol=1e-6, rtol=0)


def test_cache_is_used_and_left_untouched(model):
    tokens = model.to_tokens(TEXT)
    fresh = head_roles(model, tokens, exclude_bos=True)
    for remove_batch_dim in (False, True):
        _, cache = model.run_with_cache(tokens, remove_batch_dim=remove_batch_dim)
        before = {k: v.clone() for k, v in cache.items()}
        assert head_roles(model, tokens, cache=cache, exclude_bos=True) == fresh
        assert all(torch.equal(before[k], cache[k]) for k in before)


def test_token_ids_need_no_tokenizer():
    model = load("induction-2l")
    model.tokenizer = None
    tokens = repeated_tokens(3, 12, 8, seed=4)
    roles = head_roles(model, tokens, layers=[-1])
    assert roles.layers == [1] and roles.n_heads == 4
    per_prompt = [table(head_roles(model, row, layers=[1]), "induction_head") for row in tokens]
    torch.testing.assert_close(table(roles, "induction_head"), torch.stack(per_prompt).mean(0))


def test_bad_arguments(model):
    with pytest.raises(RatLensError, match="role name='induction' not in"):
        head_roles(model, TEXT, names=["induction"])
    with pytest.raises(RatLensError, match="error_measure='sq' not in"):
        head_roles(model, TEXT, error_measure="sq")
    with pytest.raises(RatLensError, match="layer 5 out of range"):
        head_roles(model, TEXT, layers=[5])
    with pytest.raises(RatLensError, match="has 1 unmasked tokens"):
        role_scores(torch.ones(1, 1, 1, 1), torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(RatLensError, match="one cache holds one batch"):
        head_roles(model, [TEXT], cache={})


def test_induction_model_has_its_circuit_by_tls_detector():
    """Layer-1 induction heads and layer-0 previous-token heads, on many repeated-token prompts.

    Fails until the shipped induction-2l weights show the circuit the model was trained for.
    """
    roles = head_roles(load("induction-2l"), repeated_tokens(32, 24, 24, seed=7))
    induction, previous = table(roles, "induction_head"), table(roles, "previous_token_head")
    # TL's score is a share of ALL the head's attention: rows before the repeat have no
    # induction target, so half-repeated prompts cap it near 0.5.
    assert induction[1].max() > 0.3 and induction[0].max() < 0.1
    assert previous[0].max() > 0.3 and previous[1].max() < 0.2
