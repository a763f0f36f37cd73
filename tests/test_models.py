"""induction-2l: our module, its TransformerLens copies, its tokenizer, its circuit, its training.

Parametrized at collection time over the model classes the installed TransformerLens offers
(4.x: bridge; 3.9: bridge and HookedTransformer; 2.x: HookedTransformer), so nothing is skipped.
"""

import importlib.metadata
from dataclasses import asdict

import pytest
import torch
from transformer_lens.head_detector import detect_head

from rat_lens.errors import RatLensError
from rat_lens.models import (
    BOS,
    WORDS,
    InductionTransformer,
    available_sources,
    catalogue,
    load,
    load_induction_tokenizer,
    load_induction_weights,
    repeated_tokens,
)
from rat_lens.models._induction import InductionConfig, training_batch

SOURCES = available_sources()
TL_VERSION = importlib.metadata.version("transformer-lens")
# (prefix_len, repeat_len): the distance back to the first occurrence ranges over 5..48.
LAYOUTS = [(5, 5), (10, 10), (20, 20), (30, 20), (40, 23), (48, 15)]


@pytest.fixture(scope="module")
def ours() -> InductionTransformer:
    model = InductionTransformer()
    model.load_state_dict(load_induction_weights())
    return model.eval()


@pytest.fixture(scope="module", params=SOURCES)
def tl_model(request):
    return load("induction-2l", source=request.param)


def test_the_installed_transformer_lens_offers_a_source():
    assert SOURCES, (
        f"TransformerLens {TL_VERSION} has neither the native bridge nor HookedTransformer"
    )
    assert (
        load().__class__.__name__
        == {"bridge": "TransformerBridge", "hooked": "HookedTransformer"}[SOURCES[0]]
    )


# --- the same numbers everywhere ---------------------------------------------------------------


def test_our_module_is_tls_native_model_bitwise(ours):
    """Our parameter names load strictly into TL's NativeModel, and its forward is ours, bit
    for bit."""
    native = pytest.importorskip(
        "transformer_lens.model_bridge.sources.native.model", reason=f"TL {TL_VERSION}: no bridge"
    )
    from transformer_lens.config import TransformerBridgeConfig

    cfg = TransformerBridgeConfig(
        **asdict(InductionConfig()),
        attn_only=True,
        normalization_type="LN",
        positional_embedding_type="standard",
    )
    model = native.NativeModel(cfg)
    model.load_state_dict(load_induction_weights())  # strict: the same names, the same shapes
    tokens = torch.randint(0, 64, (8, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.eval()(tokens), ours(tokens))


@pytest.mark.parametrize("kind", ["repeated", "random"])
def test_tl_logits_and_patterns_equal_our_module(ours, tl_model, kind):
    """Logits to 1e-5 of their scale, ``cache["pattern", l]`` to 1e-5 (measured: 3e-6, 1.3e-6;
    TL's own LayerNorm arithmetic is the difference)."""
    g = torch.Generator().manual_seed(1)
    tokens = (
        repeated_tokens(16, 30, 20, seed=1)
        if kind == "repeated"
        else torch.randint(0, 64, (16, 64), generator=g)
    )
    with torch.no_grad():
        want_logits, want_patterns = ours.forward_with_patterns(tokens)
        logits, cache = tl_model.run_with_cache(tokens)
    assert (logits - want_logits).abs().max() <= 1e-5 * want_logits.abs().max()
    for layer in range(2):
        torch.testing.assert_close(cache["pattern", layer], want_patterns[layer], atol=1e-5, rtol=0)
    assert cache["pattern", 0].shape == (16, 4, tokens.shape[1], tokens.shape[1])


def test_loaded_models_are_in_eval_mode_with_no_head_bias(tl_model):
    assert not tl_model.training
    params = dict(tl_model.named_parameters()) | dict(tl_model.named_buffers())
    biases = [t for name, t in params.items() if name.endswith(("head.bias", "b_U"))]
    assert all(not b.any() for b in biases)


# --- tokenizer -----------------------------------------------------------------------------------


def test_vocabulary_is_bos_and_63_distinct_lowercase_words():
    tok = load_induction_tokenizer()
    assert len(WORDS) == len(set(WORDS)) == 63
    assert all(w.isalpha() and w.islower() for w in WORDS)
    assert tok.get_vocab() == {"<bos>": 0, **{w: i for i, w in enumerate(WORDS, start=1)}}
    assert tok.bos_token_id == tok.eos_token_id == tok.pad_token_id == BOS
    assert "a" in WORDS  # TL's bridge encodes "a" while it boots, to see whether BOS is added


def test_text_round_trip():
    tok = load_induction_tokenizer()
    text = " ".join(WORDS)
    ids = tok(text)["input_ids"]
    assert ids == [BOS, *range(1, 64)]
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok("  cat\tdog\n red ")["input_ids"] == [BOS, 1, 2, 11]  # any whitespace splits


def test_to_tokens_prepends_one_bos(tl_model):
    assert tl_model.to_tokens("cat dog red").tolist() == [[BOS, 1, 2, 11]]
    assert tl_model.to_tokens("cat dog red", prepend_bos=False).tolist() == [[1, 2, 11]]
    assert tl_model.to_str_tokens("cat dog") == ["<bos>", "cat", "dog"]
    tokens = repeated_tokens(4, 20, 10, seed=3)
    texts = [tl_model.tokenizer.decode(row[1:]) for row in tokens]
    assert torch.equal(tl_model.to_tokens(texts), tokens)


@pytest.mark.parametrize("text", ["cat zebra dog", ["cat dog", "zebra"], "Cat dog"])
def test_unknown_word_is_named(tl_model, text):
    word = "Cat" if text == "Cat dog" else "zebra"
    with pytest.raises(RatLensError, match=rf"unknown word\(s\) \['{word}'\].*cat dog cow"):
        tl_model.to_tokens(text)


# --- loading -------------------------------------------------------------------------------------


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(
        RatLensError, match=r"unknown model name='gpt9': not one of \['induction-2l', 'smollm2'\]"
    ):
        load("gpt9")


def test_sources_this_transformer_lens_lacks_are_refused_by_name():
    with pytest.raises(RatLensError, match=r"source='tl' not in"):
        load(source="tl")
    for source in {"bridge", "hooked"} - set(SOURCES):
        with pytest.raises(RatLensError, match=rf"source='{source}' is not in TransformerLens"):
            load(source=source)


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_device_is_honoured(device):
    model = load(device=device)
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_catalogue_lists_the_embedded_model():
    assert ("induction-2l", True) in [entry[:2] for entry in catalogue()]


def test_the_bridge_layout_is_the_one_we_fill():
    """The native bridge's parameters, wrappers stripped, are exactly our names (+ TL's zero head
    bias), on every installed TL that has the bridge."""
    if "bridge" not in SOURCES:
        assert TL_VERSION.startswith("2."), f"TL {TL_VERSION} should have the native bridge"
        return
    bridge = load(source="bridge")
    names = {
        n.replace("._original_component", "")
        for n, _ in bridge.original_model.named_parameters(remove_duplicate=False)
    }
    assert names - {"head.bias"} == set(load_induction_weights())


# --- the circuit ---------------------------------------------------------------------------------


def circuit_scores(patterns: torch.Tensor, prefix_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From ``[layer, batch, head, q, k]`` patterns of ``repeated_tokens(.., prefix_len, ..)``:

    induction[l, h]: mean attention from each repeated token (position 1 + prefix_len + i) to the
        token after its first occurrence (position 2 + i);
    previous[l, h]: mean attention from each position q >= 1 to q - 1.
    """
    n = patterns.shape[-1]
    q = torch.arange(1 + prefix_len, n)
    induction = patterns[..., q, q - prefix_len + 1].mean(dim=(1, 3))
    q = torch.arange(1, n)
    previous = patterns[..., q, q - 1].mean(dim=(1, 3))
    return induction, previous


def tl_patterns(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: "hook_pattern" in name)
    return torch.stack([cache["pattern", layer] for layer in range(2)])


@pytest.mark.parametrize("prefix_len, repeat_len", LAYOUTS)
def test_layer1_induction_and_layer0_previous_token_heads(tl_model, prefix_len, repeat_len):
    """On 64 prompts per layout, measured on the shipped weights: layer-1 heads 0-2 put
    0.87-0.98 of their attention on the token after the first occurrence, head 3 0.48-0.96;
    layer-0 heads 0, 1, 3 put 0.74-0.96 on the previous token, head 2 0.09-0.31."""
    tokens = repeated_tokens(64, prefix_len, repeat_len, seed=prefix_len)
    induction, previous = circuit_scores(tl_patterns(tl_model, tokens), prefix_len)
    assert (induction[1] >= 0.7).sum() >= 3, induction
    assert induction[0].max() < 0.2, induction
    assert (previous[0] >= 0.6).sum() >= 3, previous
    assert previous[1].max() < 0.2, previous


def detector_scores(model, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """TransformerLens's own head detector ("mul" score, BOS excluded) over decoded prompts."""
    texts = [model.tokenizer.decode(row[1:]) for row in tokens]
    return {
        kind: detect_head(model, texts, kind, exclude_bos=True)
        for kind in ("induction_head", "previous_token_head")
    }


def test_tls_head_detector_finds_the_circuit(tl_model):
    """detect_head averages over all query rows, so an ideal induction head scores at most the
    share of rows that are repeats: 25/56 = 0.45 here. Measured: layer 1 0.41-0.44 (induction),
    layer 0 heads 0, 1, 3 0.85-0.94 (previous token)."""
    scores = detector_scores(tl_model, repeated_tokens(20, 30, 25, seed=3))
    induction, previous = scores["induction_head"], scores["previous_token_head"]
    assert (induction[1] >= 0.8 * 25 / 56).all(), induction
    assert induction[0].max() < 0.05, induction
    assert (previous[0] >= 0.7).sum() == 3 and previous[1].max() < 0.1, previous


def test_the_model_completes_a_repeat(tl_model):
    tokens = tl_model.to_tokens("sun moon star sky rain hill lake sea sun moon star sky")
    assert tl_model.to_string(tl_model(tokens).argmax(-1)[0, -1]) == "rain"


# --- data ----------------------------------------------------------------------------------------


def test_repeated_tokens_layout():
    tokens = repeated_tokens(5, prefix_len=12, repeat_len=7, seed=9)
    assert tokens.shape == (5, 20) and tokens.dtype == torch.long
    assert (tokens[:, 0] == BOS).all() and (tokens[:, 1:] >= 1).all() and (tokens < 64).all()
    assert torch.equal(tokens[:, 13:], tokens[:, 1:8])
    assert all(len(set(row[1:13].tolist())) == 12 for row in tokens)
    assert torch.equal(tokens, repeated_tokens(5, prefix_len=12, repeat_len=7, seed=9))
    assert not torch.equal(tokens, repeated_tokens(5, prefix_len=12, repeat_len=7, seed=10))
    assert repeated_tokens(2, 100, 3, seed=0, d_vocab=1000).max() < 1000


@pytest.mark.parametrize(
    "args, message",
    [
        ((1, 64, 3), r"prefix_len=64 not in 1\.\.63"),
        ((1, 10, 11), r"repeat_len=11 not in 0\.\.prefix_len=10"),
        ((0, 10, 5), r"n_prompts=0 must be >= 1"),
    ],
)
def test_repeated_tokens_errors(args, message):
    with pytest.raises(RatLensError, match=message):
        repeated_tokens(*args)


def test_training_targets_are_predictable_by_induction_only():
    """Where the mask is on, the next token is what followed the latest earlier occurrence of the
    current token; the only tokens seen before are those of the repeated stretch."""
    tokens, mask = training_batch(64, torch.Generator().manual_seed(0))
    assert tokens.shape == mask.shape == (64, 64) and (tokens[:, 0] == BOS).all()
    for row, row_mask in zip(tokens.tolist(), mask.tolist()):
        assert sum(row_mask) >= 1
        for t in range(1, 64):
            earlier = [j for j in range(1, t) if row[j] == row[t]]
            if row_mask[t]:
                assert earlier and row[earlier[-1] + 1] == row[t + 1]
            if (
                earlier
            ):  # a repeat: inside the stretch, whose tokens are masked targets or its first
                assert row_mask[t] or row_mask[t - 1]


# --- training ------------------------------------------------------------------------------------


def test_train_restores_determinism_setting_and_global_rng():
    from rat_lens.models.train_induction import train

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    before = torch.are_deterministic_algorithms_enabled()
    state = train(seed=0, steps=2)
    assert torch.are_deterministic_algorithms_enabled() == before
    assert torch.equal(torch.rand(3), expected)  # train() drew nothing from the global RNG
    assert set(state) == set(load_induction_weights())


@pytest.mark.slow
def test_retraining_gives_the_shipped_model_up_to_float_noise():
    """The script's defaults retrain the shipped weights: bitwise with the torch and CPU that made
    them, and elsewhere within what float noise does to this training. Measured by perturbing
    one initial weight by 1 ulp, or training on 2 threads instead of 1: every weight matrix
    within 0.21-0.24 (relative Frobenius) of the shipped one, no weight more than 0.059 away,
    the same heads doing the same jobs, scores within 0.05. Seed 1 instead of 0: 1.52 and
    0.63 away, and a different layer-0 head is the one that is not a previous-token head."""
    from rat_lens.models.train_induction import train

    shipped, retrained = load_induction_weights(), train()
    for name, want in shipped.items():
        got = retrained[name]
        assert (got - want).abs().max() <= 0.15, name
        if want.dim() == 2:
            assert (got - want).norm() <= 0.5 * want.norm(), name

    def scores(state):
        model = InductionTransformer()
        model.load_state_dict(state)
        result = []
        for prefix_len, repeat_len in LAYOUTS:
            tokens = repeated_tokens(64, prefix_len, repeat_len, seed=prefix_len)
            with torch.no_grad():
                _, patterns = model.eval().forward_with_patterns(tokens)
            induction, previous = circuit_scores(patterns, prefix_len)
            result.append(torch.stack([induction[1], previous[0]]))
        return torch.stack(result)  # [layout, (L1 induction, L0 previous), head]

    want, got = scores(shipped), scores(retrained)
    # Roles from the mean over layouts, where the gap is wide (shipped: >= 0.79 or <= 0.16).
    assert torch.equal(got.mean(0) >= 0.5, want.mean(0) >= 0.5)
    torch.testing.assert_close(got, want, atol=0.1, rtol=0)
