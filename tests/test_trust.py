"""Trust at the boundary: no silent wrong result, bad input refused cleanly, saved traces
checked, threads and train mode harmless, reverse-attention's models and files accepted."""

import copy
import json
import math
import threading
import warnings
from pathlib import Path

import pytest
import torch
from conftest import hook_count

import rat_lens
from rat_lens import RatLensError, TraceResult
from rat_lens.cli import main
from rat_lens.models import WORDS, load, load_induction_tokenizer, repeated_tokens

TEXT = "cat dog red blue green cat dog red"


@pytest.fixture(scope="module")
def induction():
    # verify needs pattern edits to take effect: TL 3.9's native bridge ignores them, so there
    # the tests use its HookedTransformer (TL 4.x has only the bridge, which honours them).
    from rat_lens.models import available_sources

    model = load("induction-2l", source="hooked" if "hooked" in available_sources() else None)
    return model, rat_lens.trace(model, TEXT, layers=(0, 1), agg_heads="none")


def logits_of(model, tokens):
    with torch.no_grad():
        return model(tokens).clone()


# --- no silent wrong result -------------------------------------------------------------------


def test_a_text_longer_than_the_context_is_refused_not_cut(induction, tmp_path, capsys):
    model, _ = induction
    text = " ".join(WORDS[i % 20] for i in range(70))  # 71 tokens with BOS; n_ctx is 64
    with pytest.raises(RatLensError, match="71 tokens, more than the model's context of 64"):
        rat_lens.trace(model, text)
    with pytest.raises(RatLensError, match="65 tokens, more than the model's context of 64"):
        rat_lens.trace(model, torch.randint(1, 60, (65,)))
    assert main(["trace", text, "-o", str(tmp_path / "out")]) == 1
    assert "more than the model's context of 64" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert hook_count(model) == 0


@pytest.mark.parametrize("bad", [64, 1000, -1])
def test_token_ids_outside_the_vocabulary_are_refused(induction, bad, no_typecheck):
    model, _ = induction
    tokens = torch.tensor([0, 5, bad, 7])
    with pytest.raises(
        RatLensError,
        match=rf"token ids \[{bad}\] are outside the model's "
        r"vocabulary \(valid: 0\.\.63\)",
    ):
        rat_lens.trace(model, tokens)
    assert hook_count(model) == 0


@pytest.mark.parametrize(
    "device, message",
    [
        ("cuda", "this machine has no cuda device"),
        ("gpu", "is not a torch device"),
        ("cuda:7", "no cuda device"),
        (3.5, "is not a torch device"),
    ],
)
def test_bad_devices_are_one_line(device, message, capsys, no_typecheck):
    with pytest.raises(RatLensError, match=message):
        load("induction-2l", device=device)
    if isinstance(device, str):
        assert main(["trace", TEXT, "--device", device]) == 2  # before the model loads
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and message in err


def test_threads_on_one_model_get_the_sequential_results(induction):
    model, result = induction
    jobs = [
        (seed, opts)
        for seed in range(12)
        for opts in (
            dict(layers=(0, 1), agg_heads="none"),
            dict(layer=1),
            dict(layer=0, top_beam=2),
        )
    ]

    def run(seed, opts):
        tokens = repeated_tokens(1, 10 + seed % 5, 5, seed=seed)[0]
        return rat_lens.trace(model, tokens, **opts).to_dict()

    sequential = [run(*job) for job in jobs]
    got: dict[int, object] = {}

    def worker(indices):
        for i in indices:
            try:
                got[i] = run(*jobs[i])
            except Exception as err:  # recorded, so the assertion shows it
                got[i] = err

    threads = [threading.Thread(target=worker, args=(range(k, len(jobs), 4),)) for k in range(4)]
    checker = threading.Thread(
        target=lambda: got.setdefault("verify", rat_lens.verify(model, result, n_random=3))
    )
    for thread in [*threads, checker]:
        thread.start()
    for thread in [*threads, checker]:
        thread.join()
    assert [got[i] for i in range(len(jobs))] == sequential
    assert isinstance(got["verify"], rat_lens.Verification)
    assert hook_count(model) == 0


def test_train_mode_gives_the_eval_trace_and_is_put_back(induction):
    model, result = induction
    model.train()
    model.blocks[0].train(False)  # a mixed state must come back exactly
    modes = [m.training for m in model.modules()]
    try:
        again = rat_lens.trace(model, TEXT, layers=(0, 1), agg_heads="none")
        assert again == result
        check = rat_lens.verify(model, result, n_random=3)
        assert check == rat_lens.verify(model, result, n_random=3)
        assert [m.training for m in model.modules()] == modes
    finally:
        model.eval()


def test_the_search_budget_is_refused_before_any_forward(induction):
    model, _ = induction
    tokens = model.to_tokens(TEXT)
    before = logits_of(model, tokens)
    with pytest.raises(RatLensError, match="over the search budget.*SEARCH_BUDGET"):
        rat_lens.trace(model, TEXT, layer=-1, top_beam=10**6)  # a chain: one step per token
    assert hook_count(model) == 0
    assert torch.equal(logits_of(model, tokens), before)


# --- reverse-attention users ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_head=4, n_embd=32, vocab_size=64, n_positions=64, attn_implementation="eager"
    )
    return GPT2LMHeadModel(config).eval(), load_induction_tokenizer()


def test_a_hugging_face_model_handed_to_the_tracer_is_traced_as_the_peer_does(tiny_gpt2):
    from reverse_attention import ReverseAttentionTracer as Peer

    hf, tokenizer = tiny_gpt2
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    mask = torch.ones_like(ids)  # the peer would mask BOS (= pad id 0); give both the mask
    ours = rat_lens.ReverseAttentionTracer(hf, tokenizer, device="cpu", dtype=torch.float32)
    peer = Peer(hf, tokenizer)
    for layer in (0, 1):
        a = ours.trace(ids, None, mask, layer, 3, 3)
        b = peer.trace(ids, None, mask, layer, 3, 3)
        assert [x.positions for x in a.beams] == [x.positions for x in b.beams]
        for x, y in zip(a.beams, b.beams, strict=True):
            assert x.edge_weights == pytest.approx(y.edge_attns, abs=1e-5)
    assert ours.device == "cpu" and ours.dtype == torch.float32
    assert hf.training is False
    assert len(hf(ids, output_attentions=True).attentions) == 2  # the model keeps its modules


def test_the_pad_mask_difference_is_said_once_per_tracer(tiny_gpt2):
    hf, tokenizer = tiny_gpt2
    tracer = rat_lens.ReverseAttentionTracer(hf, tokenizer)
    ids = tokenizer(TEXT, return_tensors="pt").input_ids  # BOS is the pad id here
    with pytest.warns(UserWarning, match="reverse-attention would mask them"):
        tracer.trace(ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tracer.trace(ids)
        tracer.trace(ids, attention_mask=torch.ones_like(ids))


def test_an_unsupported_model_is_refused_clearly():
    with pytest.raises(RatLensError, match="expected a TransformerLens model"):
        rat_lens.ReverseAttentionTracer(torch.nn.Linear(2, 2))


def test_render_html_on_the_tracer_and_a_reverse_attention_trace_json(tiny_gpt2, tmp_path):
    from reverse_attention import ReverseAttentionTracer as Peer

    hf, tokenizer = tiny_gpt2
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    peer = Peer(hf, tokenizer)
    theirs = peer.trace(ids, attention_mask=torch.ones_like(ids), length_norm="sqrt")
    peer.render_html(theirs, str(tmp_path / "peer"))
    saved = tmp_path / "peer" / "trace.json"
    assert main(["render", str(saved), "-o", str(tmp_path / "ours")]) == 0
    page = (tmp_path / "ours" / "index.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    loaded = TraceResult.from_json(saved.read_text())
    assert loaded.length_norm == "sqrt" and loaded.mode == "chain"
    assert [b.positions for b in loaded.beams] == [b.positions for b in theirs.beams]
    peer_links = sorted(link.value for link in theirs.sankey.links)
    assert sorted(link.value for link in loaded.sankey.links) == pytest.approx(peer_links)
    tracer = rat_lens.ReverseAttentionTracer(hf, tokenizer)
    index = tracer.render_html(loaded, tmp_path / "again")
    assert Path(index).name == "index.html"
    assert TraceResult.from_json((tmp_path / "again" / "trace.json").read_text()) == loaded


# --- saved traces -----------------------------------------------------------------------------


def test_our_json_carries_a_version_and_reverse_attentions_metadata(induction):
    _, result = induction
    data = json.loads(result.to_json())
    assert data["format_version"] == rat_lens.schema.FORMAT_VERSION == 2
    assert data["metadata"] == {
        k: data[k] for k in ("seq_len", "target_pos", "layer", "top_beam", "top_k")
    }
    assert TraceResult.from_json(result.to_json()) == result
    broken = copy.deepcopy(result)
    broken.beams[0].score_norm = math.nan
    with pytest.raises(ValueError):  # strict JSON: NaN is never written
        broken.to_json()


@pytest.mark.parametrize("edge_weight", ["value_norm", "attention"])
def test_each_edge_records_the_heads_attention_beside_the_searchs_weight(induction, edge_weight):
    """edge_attns is the head's attention, read from the model's own cache; edge_weights what
    the search ranked (the same numbers only with attention edges); stays have no attention."""
    model, _ = induction
    result = rat_lens.trace(model, TEXT, layers=(0, 1), agg_heads="none", edge_weight=edge_weight)
    _, cache = model.run_with_cache(model.to_tokens(TEXT))
    moves = stays = 0
    for beam in result.beams:
        for i, (layer, head) in enumerate(zip(beam.layers, beam.heads)):
            if beam.is_residual(i):
                stays += 1
                assert beam.edge_attns[i] is None
                continue
            moves += 1
            q, k = beam.positions[i], beam.positions[i + 1]
            attention = float(cache["pattern", layer][0, head, q, k])
            assert beam.edge_attns[i] == pytest.approx(attention, abs=1e-6)
            if edge_weight == "attention":
                assert beam.edge_weights[i] == beam.edge_attns[i]
    assert moves and (stays > 0) == (edge_weight == "value_norm")
    if edge_weight == "value_norm":  # shares are not attention: some edge must show it
        pairs = [(w, a) for b in result.beams for w, a in zip(b.edge_weights, b.edge_attns)]
        assert any(a is not None and abs(w - a) > 1e-3 for w, a in pairs)


def _format_1(result) -> dict:
    """``result`` as format 1 saved it: one number per edge, the search's, named edge_attns."""
    data = json.loads(result.to_json())
    data["format_version"] = 1
    for beam in data["beams"]:
        beam["edge_attns"] = beam.pop("edge_weights")
    return data


def test_a_format_1_trace_loads_its_weights_as_edge_weights_and_says_what_it_lacks(induction):
    model, shares = induction  # value_norm edges: format 1 kept shares under edge_attns
    with pytest.warns(UserWarning, match="records no attention"):
        loaded = TraceResult.from_dict(_format_1(shares))
    assert [b.edge_weights for b in loaded.beams] == [b.edge_weights for b in shares.beams]
    assert all(b.edge_attns == [] for b in loaded.beams)
    assert loaded.format_version == 2 and loaded.beams[0].moves()[0].attention is None

    attention = rat_lens.trace(
        model, TEXT, layers=(0, 1), agg_heads="none", edge_weight="attention"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # format 1's attention weights were attention: no warning
        loaded = TraceResult.from_dict(_format_1(attention))
    assert loaded == attention


def mutations():
    """(name, change to a valid trace dict, what the error must name)."""

    def put(path, value):
        def change(d):
            target = d
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = value

        return change

    def delete(key):
        return lambda d: d.pop(key)

    def attend_a_stay(d):
        beam = next(b for b in d["beams"] if "residual" in b["kinds"])
        beam["edge_attns"][beam["kinds"].index("residual")] = 0.5

    return [
        ("mode", put(["mode"], "evil"), "mode must be one of"),
        ("seq_len type", put(["seq_len"], "8"), "seq_len must be an int"),
        ("seq_len zero", put(["seq_len"], 0), "seq_len must be an int >= 1"),
        ("target past end", put(["target_pos"], 99), "target_pos must be an int in 0..8"),
        ("tokens short", put(["tokens"], ["a"]), "tokens must hold 9 strings"),
        ("token type", put(["tokens", 2], 5), r"tokens\[2\] must be a string"),
        ("nan score", put(["beams", 0, "score_norm"], math.nan), "score_norm must be a finite"),
        ("inf weight", put(["beams", 0, "edge_weights", 0], math.inf), r"edge_weights\[0\]"),
        ("negative weight", put(["beams", 0, "edge_weights", 0], -0.5), r"edge_weights\[0\]"),
        ("position past end", put(["beams", 0, "positions", 1], 40), r"positions\[1\]"),
        ("first position", put(["beams", 0, "positions", 0], 3), r"positions\[0\] must be the"),
        ("edge count", put(["beams", 0, "edge_weights"], [0.5]), "one value per edge"),
        ("attention count", put(["beams", 0, "edge_attns"], [0.5]), r"edge_attns must hold 0 or"),
        ("stay attention", attend_a_stay, r"must be null \(a stay\)"),
        ("head type", put(["beams", 0, "heads", 0], "H1"), r"heads\[0\] must be an int"),
        ("layer past", put(["beams", 0, "layers", 0], 7), r"layers\[0\] must be an int in"),
        ("beams type", put(["beams"], {"0": 1}), "beams must be a list"),
        ("beam type", put(["beams", 0], [1, 2]), r"beams\[0\] must be an object"),
        ("paths_text", put(["paths_text"], []), "one text per beam"),
        ("link to nowhere", put(["sankey", "links", 0, "source"], "L9_P9"), "names no node"),
        ("node position", put(["sankey", "nodes", 0, "position"], -1), "position must be"),
        ("sankey type", put(["sankey"], []), "must be an object with 'nodes' and 'links'"),
        ("unknown field", put(["evil"], 1), r"unknown field\(s\) \['evil'\]"),
        ("missing field", delete("beams"), r"missing field\(s\) \['beams'\]"),
        ("agg_heads", put(["agg_heads"], "sum"), "agg_heads must be one of"),
        ("length_norm", put(["length_norm"], "pow:x"), "is malformed"),
        ("exclude_bos", put(["exclude_bos"], "yes"), "exclude_bos must be true or false"),
        ("future version", put(["format_version"], 99), "saved by a newer rat_lens"),
        ("metadata disagrees", put(["metadata", "target_pos"], 2), "metadata.target_pos"),
        ("rollout length", put(["rollout"], [0.5, 0.5]), "rollout must hold 0 or 9"),
        ("prediction", put(["predictions"], [{"position": 1}]), r"predictions\[0\]"),
        ("verification", put(["verification"], {"beams": 3}), "verification"),
        ("top_attention", put(["top_attention"], [[1, 2]]), r"top_attention\[0\]"),
    ]


@pytest.mark.parametrize("name, change, message", mutations(), ids=[m[0] for m in mutations()])
def test_a_bad_saved_trace_names_the_field_and_writes_nothing(
    induction, tmp_path, capsys, name, change, message
):
    _, result = induction
    data = result.to_dict()
    data["predictions"] = []
    change(data)
    with pytest.raises(RatLensError, match=message):
        TraceResult.from_dict(data)
    saved = tmp_path / "trace.json"
    saved.write_text(json.dumps(data))  # NaN/inf are written as JSON extensions here
    with pytest.raises(RatLensError):
        TraceResult.from_json(saved.read_text())
    assert main(["render", str(saved), "-o", str(tmp_path / "page")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("rat-lens render: error:")
    assert not (tmp_path / "page").exists()


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "not valid JSON"),
        ("{", "not valid JSON"),
        ("[]", "an empty list holds no trace"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ("42", "expected a JSON object"),
        ('{"seq_len": NaN}', "NaN is not a JSON number"),
        ("[1, 2]", r"\[0\]: .*JSON object"),
    ],
)
def test_text_that_is_no_trace_is_one_error(text, message):
    from rat_lens.result import load_traces

    with pytest.raises(RatLensError, match=message):
        load_traces(text)


def test_a_failed_write_leaves_no_folder_and_no_half_page(tmp_path, monkeypatch, capsys):
    from rat_lens import files

    real_replace = files.os.replace
    calls = []

    def fail_on(n):
        def replace(src, dst):
            calls.append(dst)
            if len(calls) == n:
                raise OSError(28, "No space left on device")
            return real_replace(src, dst)

        return replace

    fresh = tmp_path / "new" / "page"
    monkeypatch.setattr(files.os, "replace", fail_on(2))
    with pytest.raises(RatLensError, match="No space left"):
        files.write_files(fresh, {"index.html": "page", "trace.json": "{}"})
    assert not fresh.exists()

    old = tmp_path / "old"
    files.write_files(old, {"index.html": "old page", "trace.json": "old trace"})
    for n in (1, 2, 3, 4):  # fail at every rename: the old pair stays, nothing else appears
        calls.clear()
        monkeypatch.setattr(files.os, "replace", fail_on(n))
        with pytest.raises(RatLensError):
            files.write_files(old, {"index.html": "new page", "trace.json": "new trace"})
        assert sorted(p.name for p in old.iterdir()) == ["index.html", "trace.json"]
        assert (old / "index.html").read_text() == "old page"
        assert (old / "trace.json").read_text() == "old trace"
    monkeypatch.setattr(files.os, "replace", real_replace)

    (tmp_path / "file").write_text("")  # a file where the output folder should go
    assert main(["trace", TEXT, "-o", str(tmp_path / "file" / "x")]) == 1
    assert "cannot write" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == ""
