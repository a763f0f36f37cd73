"""Devices and dtypes (issue 24), proven without a GPU.

- A machine that claims a GPU (``fake_gpu``: ``torch.cuda.is_available()`` patched to True; torch
  here has no CUDA, so anything sent there by itself fails): nothing moves to CUDA unless asked.
- The embedded model in float16 and bfloat16: every part of the pipeline runs, the search sees
  float32, and the float32 top beam comes back except where float32's own top two beams are
  within the half dtype's resolution (see ``near_tie``).
- ``@pytest.mark.gpu``: the same tests on ``cuda`` (skipped without a device; ``pytest -m gpu``).
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import SOURCES

from rat_lens import RatLensError, census, verify
from rat_lens.capture import capture_patterns, input_device
from rat_lens.cli import main
from rat_lens.models import load, load_induction_tokenizer, repeated_tokens
from rat_lens.models._hf import wrap_hf_model
from rat_lens.roles import head_roles
from rat_lens.search.contrib import edge_shares, row_block
from rat_lens.search.pattern import check_pattern_values
from rat_lens.search.stats import predictions_at, top_predictions
from rat_lens.tracer import Tracer, generate, trace

ROOT = Path(__file__).resolve().parents[1]
HALF = ["float16", "bfloat16"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
TEXT = "cat dog red blue fox sun cat dog red blue"
# Induction prompts of the embedded model: BOS, 24 distinct tokens, their first 12 again.
TOKENS = repeated_tokens(24, prefix_len=24, repeat_len=12, seed=5)
MODES = {
    "chain": dict(layer=1),
    "layers, mean": dict(layers=(0, 1), agg_heads="mean"),
    "layers, per head": dict(layers=(0, 1), agg_heads="none", edge_weight="attention"),
    "rollout": dict(layers=(0, 1), agg_heads="mean", residual="rollout"),
    "value_norm": dict(layers=(0, 1), agg_heads="none", edge_weight="value_norm"),
    "contribution": dict(layers=(0, 1), agg_heads="none", edge_weight="contribution"),
}


@pytest.fixture(scope="module", params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(scope="module")
def models(device):
    """The embedded model in each dtype on ``device``."""
    return {dt: load("induction-2l", device=device, dtype=dt) for dt in ["float32", *HALF]}


def near_tie(beams, dtype: str) -> bool:
    """Whether float32's best two beams score within 4 ε of the half dtype (ε = 2^-10 float16,
    2^-7 bfloat16): a difference the half model's own attention can swap. The search breaks
    exact ties in a fixed order (higher score, then the earlier candidate: lower head, earlier
    key), so only a near tie in the model's numbers can change the top beam."""
    if len(beams) < 2:
        return False
    eps = torch.finfo(getattr(torch, dtype)).eps
    return beams[0].score_norm - beams[1].score_norm <= 4 * eps


# --- The default device is the CPU, on a machine with a GPU ---------------------------------


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("tiny-gpt2")
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=64, n_positions=64)
    GPT2LMHeadModel(config).save_pretrained(folder)
    load_induction_tokenizer().save_pretrained(folder)
    return folder


def test_a_gpu_machine_keeps_every_model_on_the_cpu_unless_asked(fake_gpu, gpt2_folder):
    from transformers import AutoModelForCausalLM

    models = [load("induction-2l", source=s) for s in SOURCES] + [load(str(gpt2_folder))]
    hf = AutoModelForCausalLM.from_pretrained(gpt2_folder)
    models.append(wrap_hf_model(hf, load_induction_tokenizer()))
    for model in models:
        assert torch.device(model.cfg.device) == input_device(model) == torch.device("cpu")
        assert {p.device.type for p in model.parameters()} == {"cpu"}
        result = trace(model, TEXT, layers=(0, 1), agg_heads="none", predictions=2)
        assert result.beams and result.predictions
        assert verify(model, result, n_random=2, token_importance=False).beams
        assert head_roles(model, TEXT).layers


# --- load(dtype=) and --dtype ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", *HALF])
def test_load_puts_the_weights_in_the_dtype_asked_for(dtype):
    for given in (dtype, getattr(torch, dtype)):
        model = load("induction-2l", dtype=given)
        assert {p.dtype for p in model.parameters()} == {getattr(torch, dtype)}
        assert model(model.to_tokens(TEXT)).dtype == getattr(torch, dtype)


@pytest.mark.parametrize("bad", ["half", "float64", torch.int8, torch.float64, 16, None])
def test_other_dtypes_are_refused_naming_the_three(bad, no_typecheck):
    with pytest.raises(RatLensError, match=r"dtype=.* not in \{.*float32.*float16.*bfloat16"):
        load("induction-2l", dtype=bad)


def test_the_cli_traces_in_the_dtype_asked_for(tmp_path, capsys):
    for dtype in ("float32", "bfloat16"):
        assert (
            main(["trace", TEXT, "--layers", "0:1", "--dtype", dtype, "-o", str(tmp_path / dtype)])
            == 0
        )
    one, half = (
        json.loads((tmp_path / d / "trace.json").read_text()) for d in ("float32", "bfloat16")
    )
    beams = [[b["positions"] for b in t["beams"]][0] for t in (one, half)]
    assert beams[0] == beams[1]
    with pytest.raises(SystemExit) as done:  # argparse's usage error
        main(["trace", TEXT, "--dtype", "half", "-o", str(tmp_path / "x")])
    assert done.value.code == 2
    assert "invalid choice: 'half'" in capsys.readouterr().err


# --- Half precision: the whole pipeline, the search in float32 -------------------------------


@pytest.mark.parametrize("dtype", HALF)
def test_captured_attention_is_float32_and_the_models_own(models, device, dtype):
    tokens = TOKENS.to(device)
    for agg in ("mean", "max", "none"):
        half = capture_patterns(models[dtype], tokens, [0, 1], agg_heads=agg)
        full = capture_patterns(models["float32"], tokens, [0, 1], agg_heads=agg)
        for layer in (0, 1):
            assert half["pattern", layer].dtype == torch.float32
            torch.testing.assert_close(
                half["pattern", layer], full["pattern", layer], atol=0.03, rtol=0
            )


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("mode", ["chain", "layers, mean", "layers, per head", "rollout"])
def test_the_search_runs_in_float32_on_the_half_models_attention(models, device, dtype, mode):
    """Oracle: the same trace from the half model's own patterns upcast to float32 first. A head
    mean, rollout or search step taken in half precision would round every edge weight."""
    model = models[dtype]
    tokens = TOKENS.to(device)
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    upcast = {name: pattern.float() for name, pattern in cache.items()}
    tracer = Tracer(model)
    ours = tracer.trace_batch(tokens, target_pos=-1, **MODES[mode])
    oracle = tracer.trace_batch(tokens, target_pos=-1, cache=upcast, **MODES[mode])
    assert [r.beams for r in ours] == [r.beams for r in oracle]
    if mode == "layers, per head":
        bounded = tracer.trace_batch(tokens, target_pos=-1, store="bounded", **MODES[mode])
        assert [r.beams for r in bounded] == [r.beams for r in ours]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("mode", MODES)
def test_the_float32_top_beam_comes_back_except_at_near_ties(models, device, dtype, mode):
    tokens = TOKENS.to(device)
    full = Tracer(models["float32"]).trace_batch(tokens, target_pos=-1, **MODES[mode])
    half = Tracer(models[dtype]).trace_batch(tokens, target_pos=-1, **MODES[mode])
    differ = [
        i
        for i, (a, b) in enumerate(zip(full, half))
        if a.beams[0].positions != b.beams[0].positions
    ]
    assert all(near_tie(full[i].beams, dtype) for i in differ), differ
    for i, (a, b) in enumerate(zip(full, half)):  # the weights are the half model's: close
        if i not in differ:
            torch.testing.assert_close(
                b.beams[0].edge_weights, a.beams[0].edge_weights, atol=0.05, rtol=0
            )


@pytest.mark.parametrize("dtype", HALF)
def test_predictions_padded_batches_verify_roles_and_generate_in_half_precision(
    models, device, dtype
):
    half, full = models[dtype], models["float32"]
    tokens = TOKENS[:4].to(device)
    logits = {m: model(tokens)[:, -1].float() for m, model in (("half", half), ("full", full))}
    agree = (logits["half"].argmax(-1) == logits["full"].argmax(-1)).tolist()
    assert sum(agree) >= 3  # the prompts the model itself answers alike
    for b in (i for i, same in enumerate(agree) if same):
        results = [
            trace(m, tokens[b], layers=(0, 1), agg_heads="none", predictions=3)
            for m in (half, full)
        ]
        assert results[0].predictions[0].token_ids[0] == results[1].predictions[0].token_ids[0]
        checks = [verify(m, r, n_random=3) for m, r in zip((half, full), results)]
        assert checks[0].prediction_id == checks[1].prediction_id
        assert checks[0].beams[0].effect.effect == pytest.approx(
            checks[1].beams[0].effect.effect, abs=0.1
        )
    assert torch.equal(generate(half, tokens, 6), generate(full, tokens, 6))
    # A padded batch traces as each prompt alone.
    texts = [TEXT, "sun fox cat dog sun fox"]
    batch = Tracer(half).trace_batch(texts, layers=(0, 1), agg_heads="none")
    alone = [trace(half, t, layers=(0, 1), agg_heads="none") for t in texts]
    # The same routes; the weights to the half model's own rounding, which differs between a
    # padded batch and one prompt alone (other matrix shapes).
    route = [[(p.positions, p.layers, p.heads) for p in r.beams] for r in batch]
    assert route == [[(p.positions, p.layers, p.heads) for p in r.beams] for r in alone]
    weights = [w for r in batch for p in r.beams for w in p.edge_weights]
    assert weights == pytest.approx(
        [w for r in alone for p in r.beams for w in p.edge_weights], rel=0.02
    )
    roles = [head_roles(m, tokens).scores["induction_head"] for m in (half, full)]
    torch.testing.assert_close(torch.tensor(roles[0]), torch.tensor(roles[1]), atol=0.02, rtol=0)


@pytest.mark.parametrize("dtype", HALF)
def test_a_census_in_half_precision_counts_the_heads_of_float32(models, dtype, tmp_path):
    prompts = list(TOKENS[:6])
    counted = [
        census(models[d], prompts, tmp_path / d, progress=False, layers=(0, 1), agg_heads="none")
        for d in ("float32", dtype)
    ]
    assert [h.top_beam_prompts for h in counted[0].heads] == [
        h.top_beam_prompts for h in counted[1].heads
    ]


# --- Token ids reach the model on its input device -------------------------------------------


def test_every_entry_point_feeds_token_ids_on_the_models_input_device(models, device, tmp_path):
    """A forward pre-hook on the embedding records the device of every batch of ids the model
    receives, through every entry point; on a GPU the tokens start on the CPU (text, or ids
    made there), so each must have been moved."""
    model = models["float32"]
    seen = []
    handle = model.embed.register_forward_pre_hook(lambda _, args: seen.append(args[0].device))
    try:
        ids = TOKENS[:2]  # on the CPU whatever the model's device
        trace(model, TEXT, layers=(0, 1))
        trace(model, ids[0], layer=1, edge_weight=None)
        Tracer(model).trace_batch([TEXT, "sun fox"], layers=(0, 1), agg_heads="none")
        Tracer(model).trace_batch(
            ids, layers=(0, 1), agg_heads="none", edge_weight="attention", store="bounded"
        )
        trace(model, ids[0], layers=(0, 1), agg_heads="none", edge_weight="contribution")
        result = trace(model, ids[1], layers=(0, 1), agg_heads="none", predictions=2)
        verify(model, result, n_random=2)
        head_roles(model, ids)
        generate(model, ids, 2)
        census(model, [TEXT, ids[0]], tmp_path, progress=False, layers=(0, 1))
    finally:
        handle.remove()
    assert len(seen) >= 10
    assert set(seen) == {input_device(model)}


def test_token_ids_reach_the_model_on_its_device_on_a_gpu_machine(fake_gpu, tmp_path):
    """With a (fake) GPU around, the CPU model still gets CPU ids: no module invents "cuda"."""
    model = load("induction-2l")
    seen = []
    handle = model.embed.register_forward_pre_hook(lambda _, args: seen.append(args[0].device))
    try:
        result = trace(model, TEXT, layers=(0, 1), agg_heads="none", predictions=2)
        verify(model, result, n_random=2)
        generate(model, model.to_tokens(TEXT), 2)
        census(model, [TEXT], tmp_path, progress=False, layers=(0, 1))
    finally:
        handle.remove()
    assert seen and set(seen) == {torch.device("cpu")}


# --- Search pieces: float32 sums, host copies, blocks by bytes ----------------------------


def test_a_float16_pattern_of_many_rows_is_checked_without_the_slow_path(monkeypatch):
    rows = torch.full((1, 16, 4096, 2), 0.5, dtype=torch.float16)  # 65,536 rows of sum 1
    located = []
    original = torch.Tensor.nonzero
    monkeypatch.setattr(
        torch.Tensor, "nonzero", lambda t, *a, **k: located.append(1) or original(t, *a, **k)
    )
    check_pattern_values(rows, "test")  # a float16 sum would be inf: the slow search for it
    assert not located
    rows[0, 3, 7, 1] = float("nan")
    with pytest.raises(RatLensError, match=r"NaN or inf \(first at index \[0, 3, 7, 1\]\)"):
        check_pattern_values(rows, "test")


def test_predictions_copy_only_the_top_k_of_the_traced_positions(monkeypatch):
    model = load("induction-2l")
    result = trace(model, TEXT, layers=(0, 1))
    logits = model(model.to_tokens(TEXT))[0]
    copied = []
    original = torch.Tensor.cpu
    monkeypatch.setattr(
        torch.Tensor, "cpu", lambda t, *a, **k: copied.append(t.numel()) or original(t, *a, **k)
    )
    got = predictions_at(result, logits, model.tokenizer, 3)
    positions = [p.position for p in got]
    probs, ids = top_predictions(logits, positions, 3)
    assert [p.token_ids for p in got] == ids.tolist()
    assert [p.probs for p in got] == probs.tolist()
    assert copied and max(copied) <= 3 * len(positions) < logits.numel()


def test_contribution_rows_are_blocked_by_bytes_with_the_same_shares():
    g = torch.Generator().manual_seed(0)
    heads, seq, d_head, d_model = 4, 24, 8, 32
    pattern = torch.rand(heads, seq, seq, generator=g).tril()
    pattern = pattern / pattern.sum(-1, keepdim=True)
    v = torch.randn(seq, 2, d_head, generator=g)
    W_O = torch.randn(heads, d_head, d_model, generator=g)
    x = torch.randn(seq, d_model, generator=g)
    row_bytes = 2 * 4 * heads * seq * d_model
    assert row_block(heads, seq, d_model, row_bytes * 5 + 1) == 5
    assert row_block(heads, seq, d_model, 1) == 1
    for weight in ("contribution", "value_norm"):
        whole = edge_shares(pattern, v, W_O, x, None, weight, budget=row_bytes * seq)
        for rows in (1, 5, 7):
            torch.testing.assert_close(
                edge_shares(pattern, v, W_O, x, None, weight, budget=row_bytes * rows), whole
            )
    half = edge_shares(pattern.half(), v.half(), W_O.half(), x.half(), None, "contribution")
    assert half.dtype == torch.float32


# --- Process groups ------------------------------------------------------------------------

RANK = textwrap.dedent(
    """
    import sys, time
    import torch
    torch.cuda.is_available = lambda: True  # a GPU machine, a census on the CPU
    import torch.distributed as dist
    from rat_lens.corpus import _barrier, init_distributed
    rank, world = init_distributed()
    print("backend", dist.get_backend(), rank, world, flush=True)
    _barrier(world, "the first step")
    if rank == 1:
        time.sleep(60)  # never arrives in time
    _barrier(world, "rank 1 to trace its prompts")
    """
)


def test_a_gpu_machines_census_group_is_gloo_and_a_late_rank_is_named(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RAT_LENS_BARRIER_TIMEOUT": "3",
        "PYTHONPATH": str(ROOT),
    }
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", RANK],
            env={**env, "RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    try:
        out, err = ranks[0].communicate(timeout=120)
    finally:
        for rank in ranks:
            rank.kill()
            rank.wait()
    assert "backend gloo 0 2" in out
    assert "RatLensError: rank 0 of 2 stopped waiting for rank 1 to trace its prompts" in err
    assert "Ranks 1 failed to pass monitoredBarrier" in err and "RAT_LENS_BARRIER_TIMEOUT" in err


def test_an_unusable_barrier_timeout_is_refused(monkeypatch):
    from rat_lens.corpus import _barrier_timeout

    monkeypatch.setenv("RAT_LENS_BARRIER_TIMEOUT", "soon")
    with pytest.raises(RatLensError, match="RAT_LENS_BARRIER_TIMEOUT='soon' must be a positive"):
        _barrier_timeout()


def test_head_roles_of_a_disk_offloaded_model_equal_the_in_memory_models(tmp_path):
    """Its first parameter is a meta placeholder: tokens go to the embedding's device instead."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_size=32,
        intermediate_size=64,
        vocab_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    load_induction_tokenizer().save_pretrained(tmp_path / "llama")
    offloaded = load(str(tmp_path / "llama"), device_map="disk", offload_folder=tmp_path / "off")
    assert next(offloaded.parameters()).device.type == "meta"
    roles = [head_roles(m, TOKENS[:3]).scores for m in (offloaded, load(str(tmp_path / "llama")))]
    assert roles[0].keys() == roles[1].keys()
    for name in roles[0]:
        torch.testing.assert_close(torch.tensor(roles[0][name]), torch.tensor(roles[1][name]))
