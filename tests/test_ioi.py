"""Indirect object identification (IOI) at full depth on a real model (SmolLM2-135M, 30 layers x
9 heads), against ground truth read from the model's own cache.

Prompts are made here ("When Mary and John went to the store, John gave a drink to"): the
indirect object IO (Mary) and the subject S (John, named twice). Only prompts where the model
prefers IO (logit(IO) > logit(S) at the last position) are kept. The ground truth is the head
with the largest direct effect on logit(IO) - logit(S) at the last position (its write
``z @ W_O`` through the final norm with its scale held fixed, onto the logit-difference
direction), and the key it attends most, the sink (BOS) aside: on SmolLM2 that head reads the
second S and suppresses S (docs/explain.md, "IOI"). Nothing here is read from rat_lens.
"""

import random
import statistics

import pytest
import torch
from test_models_hf import needs_smollm2

import rat_lens
from rat_lens.models import load

pytestmark = pytest.mark.slow

TEMPLATES = (
    "When {A} and {B} went to the {place}, {B} gave a {thing} to",
    "After {A} and {B} arrived at the {place}, {B} handed the {thing} to",
    "While {A} and {B} were working at the {place}, {B} passed a {thing} to",
    "On Monday, {A} and {B} had a long day at the {place}. Then {B} gave the {thing} to",
    "Yesterday {A} and {B} met at the {place}, and {B} brought a {thing} to",
    "At the {place}, {A} and {B} found a {thing}. {B} gave it to",
)
# fmt: off
NAMES = (
    "Mary", "John", "Alice", "Bob", "Tom", "Anna", "James", "Sarah", "David", "Emma", "Michael",
    "Lisa", "Paul", "Kate", "Peter", "Laura", "Mark", "Susan", "George", "Helen", "Robert",
    "Linda", "Daniel", "Rachel", "Steve", "Julia", "Chris", "Emily", "Jack", "Amy",
)
PLACES = (
    "store", "park", "school", "office", "beach", "market", "garden", "station", "hospital",
    "restaurant",
)
THINGS = ("drink", "book", "letter", "ring", "gift", "ball", "bag", "key", "card", "phone")
# fmt: on
N_PROMPTS = 40
SEED = 2  # the rules below were designed on seed 1's prompts; this is the held-out set


class Prompt:
    """One IOI prompt: its tokens, the IO and S token ids, the template it came from."""

    def __init__(self, model, text: str, io: int, s: int, template: int):
        self.text, self.io, self.s, self.template = text, io, s, template
        self.tokens = model.to_tokens(text)


def one_token_words(model, words) -> list[str]:
    """The words that are one token with their leading space in the model's tokenizer."""
    encode = model.tokenizer.encode
    return [w for w in words if len(encode(" " + w, add_special_tokens=False)) == 1]


@torch.no_grad()
def ioi_prompts(model, seed: int, n: int = N_PROMPTS) -> list[Prompt]:
    """``n`` prompts where the model prefers IO, drawn with a seeded RNG, templates in turn.

    Names, places and things are one token each, so one template's prompts have one length and
    run as one batched forward."""
    rng = random.Random(seed)
    names, places, things = (one_token_words(model, w) for w in (NAMES, PLACES, THINGS))
    assert len(names) >= 20 and places and things, (names, places, things)
    kept: list[Prompt] = []
    while len(kept) < n:
        drawn = []
        for i, template in enumerate(TEMPLATES):
            for _ in range(3):
                a, b = rng.sample(names, 2)
                text = template.format(A=a, B=b, place=rng.choice(places), thing=rng.choice(things))
                io, s = (model.to_single_token(" " + x) for x in (a, b))
                drawn.append(Prompt(model, text, io, s, i))
        for i in range(len(TEMPLATES)):
            batch = [p for p in drawn if p.template == i]
            logits = model(torch.cat([p.tokens for p in batch]))[:, -1]
            kept += [p for p, row in zip(batch, logits) if row[p.io] > row[p.s]]
    return kept[:n]


def final_norm_weight(model):
    """The final norm's own weight, or None where TransformerLens folded it into W_U
    (``fold_ln``: a HookedTransformer's ``ln_final`` then has no ``w``)."""
    ln = model.ln_final
    for holder in (ln, getattr(ln, "original_component", None)):
        for name in ("w", "weight"):
            if isinstance(getattr(holder, name, None), torch.Tensor):
                return getattr(holder, name).detach()
    return None


class Truth:
    """The model's own answer for one prompt, from ``run_with_cache``: ``effects[layer, head]``
    (each head's direct effect on logit(IO) - logit(S) at the last position), the top head,
    the key it attends most besides BOS, and the model's top prediction."""

    def __init__(self, model, prompt: Prompt, logits, cache, b: int):
        assert model.cfg.normalization_type == "RMS"  # SmolLM2: no centring, only the scale
        weight = final_norm_weight(model)
        direction = model.W_U[:, prompt.io] - model.W_U[:, prompt.s]
        direction = direction if weight is None else direction * weight
        scale = cache["ln_final.hook_scale"][b, -1]
        self.effects = torch.stack(
            [
                torch.einsum("hd,hdm->hm", cache["z", layer][b, -1], model.blocks[layer].attn.W_O)
                / scale
                @ direction
                for layer in range(model.cfg.n_layers)
            ]
        )
        self.layer, self.head = divmod(int(self.effects.argmax()), model.cfg.n_heads)
        self.row = cache["pattern", self.layer][b, self.head, -1]
        self.key = 1 + int(self.row[1:].argmax())  # position 0 is BOS, the attention sink
        self.prediction = int(logits[b, -1].argmax())
        self.z = cache["z", self.layer][b, -1, self.head]
        self.scale = scale


@torch.no_grad()
def truths(model, prompts: list[Prompt]) -> list[Truth]:
    """Each prompt's :class:`Truth`, one ``run_with_cache`` per template."""
    found = {}
    for template in sorted({p.template for p in prompts}):
        batch = [(i, p) for i, p in enumerate(prompts) if p.template == template]
        logits, cache = model.run_with_cache(torch.cat([p.tokens for _, p in batch]))
        for b, (i, p) in enumerate(batch):
            found[i] = Truth(model, p, logits, cache, b)
    return [found[i] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def smollm2():
    return load("smollm2")


@pytest.fixture(scope="module")
def ioi(smollm2):
    """The held-out prompts, their truths, and each traced at the defaults (full depth, per
    head), without a foil (explained, for its lens and writes) and with S as the foil."""
    prompts = ioi_prompts(smollm2, SEED)
    found = truths(smollm2, prompts)
    plain = [rat_lens.trace(smollm2, p.tokens, explain=True) for p in prompts]
    foiled = [rat_lens.trace(smollm2, p.tokens, foil_token=p.s) for p in prompts]
    return prompts, found, plain, foiled


def first_move(result):
    move = result.beams[0].moves()[0]
    assert move.query == result.target_pos
    return move


def table(model, prompts, found, plain, foiled) -> str:
    """Per prompt: the truth's head and key beside each route's first move."""
    lines = []
    for p, truth, a, b in zip(prompts, found, plain, foiled):
        words = model.to_str_tokens(p.tokens)
        cells = [f"T{p.template} L{truth.layer}H{truth.head}->{truth.key}{words[truth.key]!r}"]
        for result in (a, b):
            m = first_move(result)
            hit = (m.layer, m.head, m.key) == (truth.layer, truth.head, truth.key)
            cells.append(f"L{m.layer}H{m.head}->{m.key}{words[m.key]!r} {'ok' if hit else '--'}")
        lines.append(" | ".join(cells))
    return "\n".join(["truth | default | foil=S", *lines])


def hits(results, found) -> int:
    """Prompts whose route's first move is the truth's head reading the truth's key."""
    return sum(
        (m.layer, m.head, m.key) == (t.layer, t.head, t.key)
        for m, t in zip(map(first_move, results), found)
    )


@needs_smollm2
def test_with_s_as_the_foil_the_first_move_is_the_top_heads_read(smollm2, ioi):
    """Measured 37/40 on these prompts (36/40 on seed 1, where the foil rule was designed;
    docs/explain.md, IOI)."""
    prompts, found, _, foiled = ioi
    assert {p.template for p in prompts} == set(range(len(TEMPLATES)))
    assert all(p.io != p.s and t.effects.max() > 0 for p, t in zip(prompts, found))
    assert hits(foiled, found) >= 0.9 * len(prompts), table(smollm2, *ioi)


@needs_smollm2
@pytest.mark.xfail(
    strict=True,
    reason="measured 18/40 (seed 1) and 20/40 (seed 2) without a foil: the default scores "
    "the first move by value-norm share, which knows nothing of S; the head with the largest "
    "direct effect on log p(IO) alone is the IO - S truth on 6/40 (seed 1), and the runner-up "
    "is S on 0/40 (docs/explain.md, IOI)",
)
def test_without_a_foil_the_first_move_is_the_top_heads_read(smollm2, ioi):
    prompts, found, plain, _ = ioi
    assert hits(plain, found) >= 0.8 * len(prompts), table(smollm2, *ioi)


@needs_smollm2
def test_the_lens_at_the_target_on_the_last_layer_is_the_models_top_prediction(smollm2, ioi):
    _, found, plain, foiled = ioi
    last = smollm2.cfg.n_layers - 1
    for truth, *results in zip(found, plain, foiled):
        for result in results:
            top = [r for r in result.lens if (r.layer, r.position) == (last, result.target_pos)]
            assert len(top) == 1 and top[0].token_ids[0] == truth.prediction == result.target_id
            assert top[0].target_rank == 0


@torch.no_grad()
def direct_logits(model, cache, layer: int, head: int, b: int = 0):
    """One head's write at the last position onto the vocabulary, the final norm's scale fixed."""
    out = cache["z", layer][b, -1, head] @ model.blocks[layer].attn.W_O[head]
    out = out / cache["ln_final.hook_scale"][b, -1]
    weight = final_norm_weight(model)
    return (out if weight is None else out * weight) @ model.W_U


@needs_smollm2
def test_the_first_moves_write_is_its_heads_direct_logits(smollm2, ioi):
    prompts, found, plain, foiled = ioi
    for p, truth, *results in zip(prompts, found, plain, foiled):
        _, cache = smollm2.run_with_cache(p.tokens)
        for result in results:
            move = first_move(result)
            write = next(w for w in result.writes if (w.layer, w.head) == (move.layer, move.head))
            assert (write.position, write.key) == (move.query, move.key)
            direct = direct_logits(smollm2, cache, move.layer, move.head)
            assert write.promoted_ids == direct.topk(5).indices.tolist()
            assert write.suppressed_ids == (-direct).topk(5).indices.tolist()
            # the token explained is the model's top prediction, IO where IO is on top
            target = result.target_id
            assert write.dla == pytest.approx(float(direct[target]), abs=1e-3)
            if result.foil_id is not None:
                diff = float(direct[target] - direct[p.s])
                assert write.dla_diff == pytest.approx(diff, abs=1e-3)
                same = (move.layer, move.head, target) == (truth.layer, truth.head, p.io)
                if same:
                    assert diff == pytest.approx(float(truth.effects.max()), abs=1e-3)


N_VERIFIED = 8  # prompts verified (each: the route and N_RANDOM random routes, one batch)
N_RANDOM = 10


@pytest.fixture(scope="module")
def checked(smollm2, ioi) -> list[float]:
    """Per verified prompt, its top route's drop of logit(IO) - logit(S) over the mean |drop|
    of N_RANDOM random routes of its shape, each check's metric and tokens asserted."""
    prompts, _, _, foiled = ioi
    ratios = []
    for p, result in zip(prompts[:N_VERIFIED], foiled):
        check = rat_lens.verify(
            smollm2, result, foil=p.s, n_random=N_RANDOM, token_importance=False, percents=()
        )
        assert (check.metric, check.foil_id, check.prediction_id) == ("logit_diff", p.s, p.io)
        assert check.token_id == p.io
        effect = check.beams[0].effect
        assert len(effect.baseline) == N_RANDOM
        random_mean = statistics.mean(abs(b) for b in effect.baseline)
        ratios.append(effect.effect / max(random_mean, 1e-6))  # float32 logits: ~1e-6 noise
    return ratios


@needs_smollm2
def test_ablating_the_route_lowers_the_logit_difference_more_than_random_routes(checked):
    """A floor under what is measured (ratios 2.4-25, median 6.4); the issue's 10x is the
    xfail below."""
    assert min(checked) > 1.5 and statistics.median(checked) >= 4, checked


@needs_smollm2
@pytest.mark.xfail(
    strict=True,
    reason="measured on these prompts: the route's drop of logit(IO) - logit(S) is 1.3-5.4 "
    "against 0.2-1.0 for random routes, ratios 2.4-25, median 6.4 (8 prompts, 10 random routes, "
    "the default ablation renorm; zero gives a median of 6.7, mean 28: docs/explain.md, IOI)",
)
def test_ablating_the_route_lowers_the_logit_difference_ten_times_a_random_route(checked):
    assert statistics.median(checked) >= 10, checked
