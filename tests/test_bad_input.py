"""One table of bad input across the API, the CLI and saved JSON. Every row must give one
RatLensError (or, from the CLI, one line and exit 1/2), leave no hook on the model, leave its
logits and train/eval mode as they were, and write no output."""

import json
import math

import pytest
import torch
from conftest import hook_count

import rat_lens
from rat_lens import RatLensError, TraceOptions
from rat_lens.capture import capture_patterns
from rat_lens.cli import main
from rat_lens.models import load
from rat_lens.result import load_traces
from rat_lens.summary import summarize

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
        ("residual in chain", lambda m, x, r, o: t(m, TEXT, residual="rollout")),
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
        ("search budget", lambda m, x, r, o: t(m, TEXT, top_beam=10**6)),
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


@pytest.mark.parametrize("name, call", api_rows(), ids=[row[0] for row in api_rows()])
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
    (["trace", TEXT, "--layer", "4"], 1),
    (["trace", TEXT, "--target-pos", "50"], 1),
    (["trace", " ".join(["cat"] * 70)], 1),
    (["trace", TEXT, "--generate", "90"], 1),
    (["render", "missing.json", "-o", OUT], 2),
    (["frobnicate"], 2),
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
        ("string weight", with_(["beams", 0, "edge_attns", 0], "0.9")),
        ("position past tokens", with_(["beams", 0, "positions", 1], 500)),
        ("tokens not strings", with_(["tokens"], [1, 2, 3, 4, 5, 6, 7, 8, 9])),
        ("version from the future", with_(["format_version"], 2)),
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
