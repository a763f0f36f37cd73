"""One table of bad input across the API, the CLI and saved JSON. Every row must give one
RatLensError (or, from the CLI, one line and exit 1/2), leave no hook on the model, leave its
logits and train/eval mode as they were, and write no output."""

import copy
import inspect
import json
import math
import time

import pytest
import torch
from conftest import hook_count
from reverse_attention.beam import BeamPath as PeerBeam
from reverse_attention.beam import SankeyData as PeerSankey
from reverse_attention.beam import TraceResult as PeerResult

import rat_lens
from rat_lens import RatLensError, TraceOptions, trace_attention
from rat_lens.capture import (
    PatternCapture,
    capture_contributions,
    capture_patterns,
    run_with_patterns,
)
from rat_lens.cli import main
from rat_lens.models import load
from rat_lens.result import TraceResult, load_traces
from rat_lens.roles import head_roles
from rat_lens.schema import FORMAT_VERSION
from rat_lens.summary import summarize
from rat_lens.tracer import generate

TEXT = "cat dog red blue green cat dog red"
OUT = "__out__"  # replaced by a fresh folder that must not exist afterwards


@pytest.fixture(scope="module")
def setup():
    model = load("induction-2l")
    tokens = model.to_tokens(TEXT)
    result = rat_lens.trace(model, TEXT, layers=(0, 1), agg_heads="none")
    return model, tokens, result


def api_rows():
    """(id, call(model, tokens, result, out)) — each must raise RatLensError."""
    t = rat_lens.trace
    return [
        ("top_beam str", lambda m, x, r, o: t(m, TEXT, top_beam="5")),
        ("top_beam 0", lambda m, x, r, o: t(m, TEXT, top_beam=0)),
        ("top_k bool", lambda m, x, r, o: t(m, TEXT, top_k=True)),
        ("top_k -1", lambda m, x, r, o: t(m, TEXT, top_k=-1)),
        ("min_attn nan", lambda m, x, r, o: t(m, TEXT, min_attn=math.nan)),
        ("min_attn str", lambda m, x, r, o: t(m, TEXT, min_attn="0.1")),
        ("agg_heads sum", lambda m, x, r, o: t(m, TEXT, agg_heads="sum")),
        ("length_norm avg", lambda m, x, r, o: t(m, TEXT, length_norm="avg")),
        ("length_norm pow:x", lambda m, x, r, o: t(m, TEXT, length_norm="pow:x")),
        ("residual in chain", lambda m, x, r, o: t(m, TEXT, layer=1, residual="rollout")),
        ("residual unknown", lambda m, x, r, o: t(m, TEXT, layers=(0, 1), residual="skip")),
        ("layer and layers", lambda m, x, r, o: t(m, TEXT, layer=0, layers=(0, 1))),
        ("layer out of range", lambda m, x, r, o: t(m, TEXT, layer=5)),
        ("layer float", lambda m, x, r, o: t(m, TEXT, layer=1.0)),
        ("layers empty", lambda m, x, r, o: t(m, TEXT, layers=(1, 0))),
        ("layers triple", lambda m, x, r, o: t(m, TEXT, layers=(0, 1, 2))),
        ("layers past", lambda m, x, r, o: t(m, TEXT, layers=(0, 9))),
        ("stop_at_bos str", lambda m, x, r, o: t(m, TEXT, stop_at_bos="no")),
        ("exclude_bos int", lambda m, x, r, o: t(m, TEXT, exclude_bos=1)),
        ("target past end", lambda m, x, r, o: t(m, TEXT, 99)),
        ("target float", lambda m, x, r, o: t(m, x[0], 1.5)),
        ("empty text", lambda m, x, r, o: t(m, "   ")),
        ("text too long", lambda m, x, r, o: t(m, " ".join(["cat"] * 70))),
        ("ids too long", lambda m, x, r, o: t(m, torch.ones(65, dtype=torch.long))),
        ("id past vocab", lambda m, x, r, o: t(m, torch.tensor([0, 64, 3]))),
        ("negative id", lambda m, x, r, o: t(m, torch.tensor([0, -3, 3]))),
        ("float ids", lambda m, x, r, o: t(m, x.float())),
        ("empty ids", lambda m, x, r, o: t(m, torch.zeros(0, dtype=torch.long))),
        ("ids as list", lambda m, x, r, o: t(m, [0, 1, 2])),
        ("batch to trace", lambda m, x, r, o: rat_lens.Tracer(m).trace(x.repeat(2, 1))),
        ("mask shape", lambda m, x, r, o: rat_lens.Tracer(m).trace(x, -1, torch.ones(3))),
        ("mask values", lambda m, x, r, o: rat_lens.Tracer(m).trace(x, -1, x * 0 + 2)),
        ("predictions -1", lambda m, x, r, o: t(m, TEXT, predictions=-1)),
        ("query_chunk 0", lambda m, x, r, o: t(m, TEXT, query_chunk=0)),
        ("query_chunk str", lambda m, x, r, o: t(m, TEXT, query_chunk="big")),
        ("unknown keyword", lambda m, x, r, o: t(m, TEXT, options=TraceOptions(), topk=3)),
        ("options wrong type", lambda m, x, r, o: t(m, TEXT, options={"top_k": 3})),
        ("search budget", lambda m, x, r, o: t(m, TEXT, layer=-1, top_beam=10**6)),
        ("empty target list", lambda m, x, r, o: rat_lens.Tracer(m).trace_batch(x, [])),
        ("not a model", lambda m, x, r, o: t(torch.nn.Linear(2, 2), TEXT)),
        ("capture layer", lambda m, x, r, o: capture_patterns(m, x, [7])),
        ("capture agg", lambda m, x, r, o: capture_patterns(m, x, [0], agg_heads="all")),
        ("attention not tensor", lambda m, x, r, o: rat_lens.trace_attention([[1.0]])),
        ("attention not square", lambda m, x, r, o: rat_lens.trace_attention(torch.ones(2, 3))),
        (
            "attention nan",
            lambda m, x, r, o: rat_lens.trace_attention(
                torch.tensor([[1.0, 0.0], [math.nan, 1.0]])
            ),
        ),
        ("verify n_random", lambda m, x, r, o: rat_lens.verify(m, r, n_random="5")),
        ("verify ablation", lambda m, x, r, o: rat_lens.verify(m, r, ablation="drop")),
        ("verify blank", lambda m, x, r, o: rat_lens.verify(m, r, blank="zero")),
        ("verify token", lambda m, x, r, o: rat_lens.verify(m, r, token="cat dog")),
        ("verify token id", lambda m, x, r, o: rat_lens.verify(m, r, token=999)),
        ("verify percents", lambda m, x, r, o: rat_lens.verify(m, r, percents=[0])),
        ("verify batch_size", lambda m, x, r, o: rat_lens.verify(m, r, batch_size=0)),
        ("verify not a result", lambda m, x, r, o: rat_lens.verify(m, r.to_dict())),
        ("summarize roles", lambda m, x, r, o: summarize(r, roles=[1, 2])),
        ("render nothing", lambda m, x, r, o: rat_lens.render_html([], o)),
        ("render a dict", lambda m, x, r, o: rat_lens.render_html(r.to_dict(), o)),
        ("load unknown", lambda m, x, r, o: load("gtp2")),
        ("load device", lambda m, x, r, o: load("induction-2l", device="cuda")),
        ("load source", lambda m, x, r, o: load("induction-2l", source="native")),
    ]


def keyword_rows():
    """An unknown keyword or a missing argument of every public function: one RatLensError with
    the closest parameter, before anything runs."""
    return [
        ("verify keyword", lambda m, x, r, o: rat_lens.verify(m, r, n_randm=3)),
        ("verify missing", lambda m, x, r, o: rat_lens.verify(m)),
        ("summarize keyword", lambda m, x, r, o: summarize(r, top_edge=3)),
        ("render keyword", lambda m, x, r, o: rat_lens.render_html(r, o, open=True)),
        ("head_roles keyword", lambda m, x, r, o: head_roles(m, TEXT, layer=1)),
        ("load keyword", lambda m, x, r, o: load("induction-2l", devce="cpu")),
        ("capture keyword", lambda m, x, r, o: capture_patterns(m, x, [0], agg="mean")),
        ("run_with_patterns keyword", lambda m, x, r, o: run_with_patterns(m, x, [0], agg="x")),
        ("contributions keyword", lambda m, x, r, o: capture_contributions(m, x, [0], weights=1)),
        ("PatternCapture keyword", lambda m, x, r, o: PatternCapture([0], agg_head="mean")),
        ("generate keyword", lambda m, x, r, o: generate(m, x, n=2)),
        ("census keyword", lambda m, x, r, o: rat_lens.census(m, [TEXT], o, batchsize=2)),
        ("census missing", lambda m, x, r, o: rat_lens.census(m, [TEXT])),
        ("Tracer keyword", lambda m, x, r, o: rat_lens.Tracer(m, tokeniser=None)),
        ("trace_batch keyword", lambda m, x, r, o: rat_lens.Tracer(m).trace_batch(x, mask=x)),
        ("TraceOptions keyword", lambda m, x, r, o: TraceOptions(topk=3)),
        ("trace_attention missing", lambda m, x, r, o: trace_attention()),
    ]


A = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])


def capture_and_attention_rows():
    """PatternCapture's arguments; trace_attention's inputs (an error, never an empty trace)."""
    return [
        ("capture layers empty", lambda m, x, r, o: PatternCapture([])),
        ("capture layers str", lambda m, x, r, o: PatternCapture("01")),
        ("capture layers float", lambda m, x, r, o: PatternCapture([0.0])),
        ("capture agg_heads", lambda m, x, r, o: PatternCapture([0], agg_heads=1)),
        ("capture device name", lambda m, x, r, o: PatternCapture([0], device="gpu")),
        ("capture device type", lambda m, x, r, o: PatternCapture([0], device=3.5)),
        ("capture device absent", lambda m, x, r, o: PatternCapture([0], device="cuda:7")),
        (
            "capture layer past the model, run",
            lambda m, x, r, o: m.run_with_hooks(x, fwd_hooks=PatternCapture([0, 7]).fwd_hooks),
        ),
        ("capture layer past the model, read", lambda m, x, r, o: _read(m, x, PatternCapture([7]))),
        ("attention empty", lambda m, x, r, o: trace_attention(torch.zeros(0, 0))),
        ("attention on meta", lambda m, x, r, o: trace_attention(A.to("meta"))),
        ("attention negative", lambda m, x, r, o: trace_attention(A - 0.25)),
        ("attention scores", lambda m, x, r, o: trace_attention(A * 3)),
        ("attention all zero", lambda m, x, r, o: trace_attention(torch.zeros(3, 3))),
        ("mask not a tensor", lambda m, x, r, o: trace_attention(A, attention_mask="111")),
        ("mask length", lambda m, x, r, o: trace_attention(A, attention_mask=[1, 1])),
        ("mask fractional", lambda m, x, r, o: trace_attention(A, attention_mask=A[2])),
        ("mask on meta", lambda m, x, r, o: trace_attention(A, attention_mask=A[2].to("meta"))),
        ("bos past the end", lambda m, x, r, o: trace_attention(A, bos_positions=[3])),
        ("bos negative", lambda m, x, r, o: trace_attention(A, bos_positions=[-1])),
        ("bos fractional", lambda m, x, r, o: trace_attention(A, bos_positions=[1.5])),
        ("bos not a list", lambda m, x, r, o: trace_attention(A, bos_positions=1)),
        ("bos bool", lambda m, x, r, o: trace_attention(A, bos_positions=[True])),
    ]


def _read(model, tokens, capture):
    model.run_with_hooks(tokens, fwd_hooks=capture.fwd_hooks)
    return capture.to_cache(model)


def edited(result, change):
    """A hand-edited copy of ``result``."""
    copied = copy.deepcopy(result)
    change(copied)
    return copied


PEER = PeerResult(
    2, 1, 0, 1, 1, ["a", "b"], [PeerBeam([1, 0], ["b", "a"], [1, 0], [0.5], -0.7, -0.7)],
    PeerSankey([], []), ["b <- a"],
)  # fmt: skip
FAR = lambda b: b.positions.__setitem__(1, 99)  # noqa: E731
LATER = lambda b: b.positions.__setitem__(2, b.positions[1] + 1)  # noqa: E731
NAN = lambda b: setattr(b, "score_norm", math.nan)  # noqa: E731
HEAD_9 = lambda q: q.beams[0].heads.__setitem__(0, 9)  # noqa: E731  the model has 4 heads


def cache_result_and_tokenizer_rows():
    """``cache=`` of a wrong type or of another prompt; results edited by hand or foreign, for
    each reader; a wrong tokenizer or BOS id."""
    other = "red blue green cat dog red cat dog"
    rows = [
        ("cache int", lambda m, x, r, o: rat_lens.trace(m, TEXT, cache=42)),
        ("cache tensor", lambda m, x, r, o: rat_lens.trace(m, TEXT, cache=x)),
        ("cache other prompt", lambda m, x, r, o: rat_lens.trace(m, TEXT, cache=_cache(m, other))),
        ("cache other, embeddings", lambda m, x, r, o: rat_lens.trace(m, TEXT, cache=_embeds(m))),
        ("verify head past the model", lambda m, x, r, o: rat_lens.verify(m, edited(r, HEAD_9))),
        ("tokenizer int", lambda m, x, r, o: rat_lens.Tracer(m, tokenizer=42)),
        ("trace tokenizer str", lambda m, x, r, o: rat_lens.trace(m, TEXT, tokenizer="gpt2")),
        ("tokenizer bos str", lambda m, x, r, o: rat_lens.Tracer(m, tokenizer=_BosText(m))),
        ("bos_token_id str", lambda m, x, r, o: rat_lens.trace(m, TEXT, bos_token_id="0")),
        ("bos_token_id float", lambda m, x, r, o: rat_lens.trace(m, TEXT, bos_token_id=0.0)),
    ]  # fmt: skip
    readers = {
        "verify": lambda m, res, o: rat_lens.verify(m, res),
        "summarize": lambda m, res, o: summarize(res),
        "render": lambda m, res, o: rat_lens.render_html(res, o),
    }
    edits = {
        "position past tokens": lambda q: FAR(q.beams[0]),
        "key after its query": lambda q: LATER(q.beams[0]),
        "layer past the trace": lambda q: q.beams[0].layers.__setitem__(0, 5),
        "negative head": lambda q: q.beams[0].heads.__setitem__(0, -1),
        "tokens short": lambda q: setattr(q, "tokens", q.tokens[:3]),
        "nan score": lambda q: NAN(q.beams[0]),
    }
    for reader, read in readers.items():
        rows.append((f"{reader} peer result", lambda m, x, r, o, read=read: read(m, PEER, o)))
        for what, change in edits.items():
            call = lambda m, x, r, o, read=read, change=change: read(m, edited(r, change), o)  # noqa: E731
            rows.append((f"{reader} {what}", call))
    return rows


def _cache(model, text, keep="embed.hook_in"):
    names = lambda n: n == keep or n.endswith("hook_pattern")  # noqa: E731
    return model.run_with_cache(model.to_tokens(text), names_filter=names)[1]


def _embeds(model):
    return _cache(model, "red blue green cat dog red cat dog", keep="hook_embed")


class _BosText:
    """A tokenizer whose bos_token_id is text."""

    def __init__(self, model):
        self.tokenizer, self.bos_token_id = model.tokenizer, "<bos>"

    def __call__(self, *args, **kwargs):
        return self.tokenizer(*args, **kwargs)

    def decode(self, ids):
        return self.tokenizer.decode(ids)


ALL_ROWS = api_rows() + keyword_rows() + capture_and_attention_rows()


@pytest.mark.parametrize("name, call", ALL_ROWS, ids=[row[0] for row in ALL_ROWS])
def test_bad_api_input(setup, tmp_path, no_typecheck, name, call):
    model, tokens, result = setup
    with torch.no_grad():
        before = model(tokens).clone()
    modes = [m.training for m in model.modules()]
    out = tmp_path / "out"
    with pytest.raises(RatLensError) as info:
        call(model, tokens, result, out)
    assert "\n" not in str(info.value) and len(str(info.value)) < 400
    assert hook_count(model) == 0
    assert [m.training for m in model.modules()] == modes
    with torch.no_grad():
        assert torch.equal(model(tokens), before)
    assert not out.exists()


@pytest.mark.parametrize(
    "name, call",
    cache_result_and_tokenizer_rows(),
    ids=[r[0] for r in cache_result_and_tokenizer_rows()],
)
def test_bad_caches_results_and_tokenizers(setup, tmp_path, no_typecheck, name, call):
    test_bad_api_input(setup, tmp_path, no_typecheck, name, call)


CLI_ROWS = [
    (["trace", TEXT, "--top-beam", "0"], 2),
    (["trace", TEXT, "--top-bem", "3"], 2),
    (["trace", TEXT, "--length-norm", "pow:"], 2),
    (["trace", TEXT, "--agg-heads", "sum"], 2),
    (["trace", ""], 2),
    (["trace", TEXT, "--device", "gpu"], 2),
    (["trace", TEXT, "--layers", "a:b"], 2),
    (["trace", TEXT, "--format", "pdf"], 2),
    (["trace", TEXT, "--model", "gtp2"], 1),
    (["trace", TEXT, "--layer", "4"], 2),  # from the config, before the weights load
    (["trace", TEXT, "--target-pos", "50"], 1),
    (["trace", " ".join(["cat"] * 70)], 1),
    (["trace", TEXT, "--generate", "90"], 1),
    (["render", "missing.json", "-o", OUT], 2),
    (["frobnicate"], 2),
    (["trace", TEXT, "--text", "cat dog"], 2),
]


@pytest.mark.parametrize("argv, code", CLI_ROWS, ids=[" ".join(r[0])[:40] for r in CLI_ROWS])
def test_bad_command_lines(tmp_path, monkeypatch, capsys, argv, code):
    monkeypatch.chdir(tmp_path)
    argv = [str(tmp_path / "out") if a == OUT else a for a in argv]
    try:
        got = main(argv)
    except SystemExit as done:  # argparse's own usage errors
        got = done.code
    err = capsys.readouterr().err
    assert got == code
    assert len([line for line in err.splitlines() if "error" in line]) == 1
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "rat_lens_out").exists()


def json_rows():
    """(id, text of a trace.json) — each must be refused by load_traces and rat-lens render."""

    def good():
        model = load("induction-2l")
        return rat_lens.trace(model, TEXT).to_dict()

    base = good()

    def with_(path, value):
        data = json.loads(json.dumps(base))
        target = data
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return json.dumps(data)

    return [
        ("mode evil", with_(["mode"], "evil")),
        ("nan score", with_(["beams", 0, "score_norm"], math.nan)),
        ("string weight", with_(["beams", 0, "edge_weights", 0], "0.9")),
        ("position past tokens", with_(["beams", 0, "positions", 1], 500)),
        ("tokens not strings", with_(["tokens"], [1, 2, 3, 4, 5, 6, 7, 8, 9])),
        ("version from the future", with_(["format_version"], FORMAT_VERSION + 1)),
        ("deep nesting", "[" * 50_000 + "]" * 50_000),
        ("not json", "<html>"),
        ("wrong top type", '"a trace"'),
        ("sankey link dangling", with_(["sankey", "links", 0, "target"], "nowhere")),
    ]


@pytest.mark.parametrize("name, text", json_rows(), ids=[row[0] for row in json_rows()])
def test_bad_saved_traces(tmp_path, capsys, name, text):
    with pytest.raises(RatLensError):
        load_traces(text)
    saved = tmp_path / "trace.json"
    saved.write_text(text)
    assert main(["render", str(saved), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_the_table_is_at_least_sixty_rows():
    assert len(api_rows()) + len(CLI_ROWS) + len(json_rows()) >= 60


def test_oversized_saved_traces_are_refused_before_parsing_or_building(monkeypatch):
    big = " " * (rat_lens.result.SAVED_CHARS_BUDGET + 1) + "{}"
    start = time.perf_counter()
    with pytest.raises(RatLensError, match="SAVED_CHARS_BUDGET"):
        load_traces(big)
    with pytest.raises(RatLensError, match="SAVED_CHARS_BUDGET"):
        TraceResult.from_json(big)
    assert time.perf_counter() - start < 1  # not parsed: a parse of 64 MB takes seconds
    result = rat_lens.trace(load("induction-2l"), TEXT, top_beam=3)
    data = result.to_dict()
    monkeypatch.setattr(rat_lens.result, "SAVED_BEAM_BUDGET", 2 * len(data["beams"]) - 1)
    assert load_traces(json.dumps(data))[0] == result  # within the budget: read as before
    with pytest.raises(RatLensError, match="SAVED_BEAM_BUDGET"):
        load_traces(json.dumps([data, data]))  # over it, counted across the document
    many = dict(data, beams=data["beams"] * 2, paths_text=data["paths_text"] * 2)
    with pytest.raises(RatLensError, match="SAVED_BEAM_BUDGET"):
        TraceResult.from_dict(many)


def test_unknown_keywords_keep_the_real_signature_and_python_errors_inside():
    assert list(inspect.signature(rat_lens.verify).parameters)[:3] == ["model", "result", "token"]
    assert "layers" in inspect.signature(PatternCapture).parameters
    assert rat_lens.verify.__doc__.startswith("Ablate each beam")
    with pytest.raises(
        RatLensError, match=r"did you mean 'n_random'\?\); it takes \(model, result"
    ):
        rat_lens.verify(None, None, n_randm=3)
    with pytest.raises(TypeError):  # raised inside the body (None has no shape): not a binding
        generate(load("induction-2l"), None, 1)


def test_attention_that_requires_grad_traces_as_the_plain_tensor():
    """Documented: a tensor that requires grad is traced detached (the same beams)."""
    mask = torch.tensor([0, 1, 1])
    plain = trace_attention(A, top_beam=3, attention_mask=mask)
    grad = A.clone().requires_grad_()
    assert trace_attention(grad, top_beam=3, attention_mask=mask.bool()) == plain
    assert not grad.grad_fn and grad.requires_grad  # the caller's tensor is untouched


def test_a_cache_of_the_patterns_alone_is_only_checked_by_its_shape(setup):
    """The documented limit: without embed.hook_in or hook_embed there are no token ids to
    compare; a cache of the patterns alone is accepted on its (batch, seq) shape."""
    model = setup[0]
    same = _cache(model, TEXT, keep="none")
    from_cache = rat_lens.trace(model, TEXT, cache=same, layer=1)
    assert from_cache.beams == rat_lens.trace(model, TEXT, layer=1).beams
