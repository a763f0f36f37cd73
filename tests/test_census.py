"""The census: every prompt's trace on disk as it goes, exact resumption, per-head counts that
equal a hand count, role scores that are TransformerLens's detector's, each prompt's causal check
when asked, and the same result from 1 or 2 processes under torchrun. (Its page:
tests/test_render.py and tests/test_render_browser.py.)"""

import importlib.metadata
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformer_lens.head_detector import detect_head

import rat_lens
from rat_lens import RatLensError, TraceResult
from rat_lens import corpus as census_module
from rat_lens.cli import main
from rat_lens.corpus import Census, census, read_prompts
from rat_lens.models import load
from rat_lens.result import beam_weights

WORDS = [
    "cat",
    "dog",
    "red",
    "blue",
    "green",
    "sun",
    "moon",
    "sky",
    "tree",
    "fox",
    "owl",
    "bee",
    "ant",
    "cow",
    "pig",
    "hen",
]
OPTIONS = dict(layers=(0, 1), agg_heads="none", top_beam=3)
# TransformerLens 3.x's bridge ignores pattern edits, so verify refuses it (docs/verify.md): the
# causal checks run on its HookedTransformer there.
OLD_BRIDGE = int(importlib.metadata.version("transformer-lens").split(".")[0]) < 4


def prompts(n: int, seed: int = 0) -> list[str]:
    """Random words, then a repeat of their first few: the induction circuit's favourite."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        half = rng.sample(WORDS, rng.randint(4, 10))
        out.append(" ".join(half + half[: rng.randint(2, len(half))]))
    return out


@pytest.fixture(scope="module")
def model():
    return load("induction-2l")


def assert_close_dicts(got, expected, where="trace"):
    """Equal structure, strings and ints; floats within 1e-5 (a padded batch's forward rounds
    differently from one prompt's)."""
    if isinstance(expected, dict):
        assert sorted(got) == sorted(expected), where
        for key in expected:
            assert_close_dicts(got[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert len(got) == len(expected), where
        for i, (g, e) in enumerate(zip(got, expected)):
            assert_close_dicts(g, e, f"{where}[{i}]")
    elif isinstance(expected, float):
        assert got == pytest.approx(expected, abs=1e-5), where
    else:
        assert got == expected, where


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_records_are_each_prompts_own_trace_and_counts_are_a_hand_count(model, tmp_path):
    texts = prompts(12)
    found = census(model, texts, tmp_path, targets=[-1, -2] * 6, progress=False, **OPTIONS)
    records = lines(tmp_path / "traces.jsonl")
    assert [r["prompt"] for r in records] == list(range(12))
    expected = [rat_lens.trace(model, t, -1 - i % 2, **OPTIONS) for i, t in enumerate(texts)]
    for record, alone in zip(records, expected):  # batched: one padded forward, 8 prompts
        assert_close_dicts(record["trace"], alone.to_dict())
    # The oracle: the counts by hand from the traces, stays in the residual stream left out.
    mass, edges, top = {}, {}, {}
    for result in [TraceResult.from_dict(r["trace"]) for r in records]:
        for rank, (beam, share) in enumerate(zip(result.beams, beam_weights(result.beams))):
            kinds = beam.kinds or ["head"] * beam.num_edges
            for layer, head, weight, kind in zip(beam.layers, beam.heads, beam.edge_weights, kinds):
                if kind == "residual":
                    continue
                mass[layer, head] = mass.get((layer, head), 0.0) + share * weight
                edges[layer, head] = edges.get((layer, head), 0) + 1
                if rank == 0:
                    top.setdefault((layer, head), set()).add(id(result))
    got = {(h.layer, h.head): h for h in found.heads}
    assert set(got) == set(mass)
    for key, h in got.items():
        assert h.traced_mass == pytest.approx(mass[key], rel=1e-12)
        assert h.edges == edges[key] and h.top_beam_prompts == len(top.get(key, ()))
    assert sum(h.mass_share for h in found.heads) == pytest.approx(1.0)
    assert [h.traced_mass for h in found.heads] == sorted(
        (h.traced_mass for h in found.heads), reverse=True
    )
    saved = json.loads((tmp_path / "census.json").read_text())
    assert Census.from_dict(saved) == found and found.roles is None
    assert found.traces() == [TraceResult.from_dict(r["trace"]) for r in records]
    assert (tmp_path / "census.csv").read_text().count("\n") == len(found.heads) + 1
    assert not (tmp_path / ".shards").exists()
    assert "L1.H" in found.table()


def test_an_interrupted_census_resumes_without_redoing_finished_prompts(
    model, tmp_path, monkeypatch
):
    texts = prompts(10, seed=1)
    full = census(model, texts, tmp_path / "full", progress=False, **OPTIONS)
    real = census_module._trace_batch
    calls = []

    def crash_after(limit):
        def trace_batch(tracer, batch, targets, options):
            if len(calls) + len(batch) > limit:
                raise KeyboardInterrupt  # the user's Ctrl-C, or a killed process
            calls.extend(batch)
            return real(tracer, batch, targets, options)

        return trace_batch

    monkeypatch.setattr(census_module, "_trace_batch", crash_after(7))
    with pytest.raises(KeyboardInterrupt):
        census(model, texts, tmp_path / "cut", batch_size=3, progress=False, **OPTIONS)
    shard = tmp_path / "cut" / ".shards" / "rank0.jsonl"
    assert len(shard.read_text().splitlines()) == 6  # two whole batches reached the disk
    with shard.open("a") as handle:
        handle.write('{"prompt": 6, "trace": {"seq_l')  # a line torn by the kill
    calls.clear()
    monkeypatch.setattr(census_module, "_trace_batch", crash_after(10**9))
    again = census(model, texts, tmp_path / "cut", batch_size=3, progress=False, **OPTIONS)
    assert calls == texts[6:]  # only the unfinished prompts were traced
    assert_close_dicts(again.to_dict()["heads"], full.to_dict()["heads"])  # batches of 3, not 8
    assert_close_dicts(
        lines(tmp_path / "cut" / "traces.jsonl"), lines(tmp_path / "full" / "traces.jsonl")
    )
    calls.clear()
    census(model, texts, tmp_path / "cut", progress=False, **OPTIONS)
    assert calls == []  # finished: nothing to redo
    census(model, texts, tmp_path / "cut", resume=False, progress=False, **OPTIONS)
    assert calls == texts  # resume=False starts over


def test_parquet_holds_the_same_traces(model, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    texts = prompts(5, seed=2)
    a = census(model, texts, tmp_path / "j", roles=True, progress=False, **OPTIONS)
    b = census(
        model,
        texts,
        tmp_path / "p",
        format="parquet",
        batch_size=2,
        roles=True,
        progress=False,
        **OPTIONS,
    )
    assert_close_dicts(b.to_dict(), {**a.to_dict(), "path": b.path})  # batches of 2, not 8
    assert_close_dicts([t.to_dict() for t in b.traces()], [t.to_dict() for t in a.traces()])
    table = pq.read_table(tmp_path / "p" / "traces.parquet").to_pydict()
    assert table["prompt"] == list(range(5))
    assert [json.loads(r) for r in table["roles"]] == [
        r["roles"] for r in lines(tmp_path / "j" / "traces.jsonl")
    ]
    assert_close_dicts(
        [json.loads(t) for t in table["trace"]],
        [r["trace"] for r in lines(tmp_path / "j" / "traces.jsonl")],
    )


def test_two_processes_under_torchrun_give_the_one_process_census(tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text(
        "".join(
            json.dumps({"text": t, "pos": -1 - i % 2}) + "\n"
            for i, t in enumerate(prompts(200, seed=3))
        )
    )
    flags = [
        *("census", str(data), "--layers", "0:1", "--agg-heads", "none", "--target", "pos"),
        "--roles",
    ]
    assert main([*flags, "-o", str(tmp_path / "one")]) == 0
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    done = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "rat_lens.cli",
            *flags,
            "-o",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = (json.loads((tmp_path / d / "census.json").read_text()) for d in ("one", "two"))
    assert one.pop("path") != two.pop("path")
    assert_close_dicts(two, one)  # each rank batches its own prompts: rounding differs
    assert_close_dicts(
        lines(tmp_path / "two" / "traces.jsonl"), lines(tmp_path / "one" / "traces.jsonl")
    )
    assert one["n_prompts"] == 200 and not (tmp_path / "two" / ".shards").exists()
    assert one["roles"]["layers"] == [0, 1]


def test_prompts_from_jsonl_csv_and_text(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "cat dog", "t": 1}\n\n{"text": "sun", "t": -1}\n')
    (tmp_path / "a.csv").write_text("text,t\ncat dog,1\nsun,-1\n")
    (tmp_path / "a.txt").write_text("cat dog\n\nsun\n")
    for name in ("a.jsonl", "a.csv"):
        assert read_prompts(tmp_path / name, target_column="t") == (["cat dog", "sun"], [1, -1])
    assert read_prompts(tmp_path / "a.txt") == (["cat dog", "sun"], None)
    with pytest.raises(RatLensError, match="no text column 'body'"):
        read_prompts(tmp_path / "a.jsonl", text_column="body")
    with pytest.raises(RatLensError, match="column 'text' is not an integer"):
        read_prompts(tmp_path / "a.csv", target_column="text")
    with pytest.raises(RatLensError, match="plain-text prompt file has no columns"):
        read_prompts(tmp_path / "a.txt", target_column="t")
    with pytest.raises(RatLensError, match="cannot read prompts"):
        read_prompts(tmp_path / "missing.jsonl")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompts=[]), "prompts is empty"),
        (dict(targets=[1, 2]), "targets has 2 positions for 1 prompts"),
        (dict(targets="first"), "give 'last', a position"),
        (dict(batch_size=0), "batch_size must be >= 1"),
        (dict(format="csv"), "format='csv' not in"),
        (dict(top_k=0), "top_k must be >= 1"),
        (dict(options=rat_lens.TraceOptions(), topk=2), "did you mean 'top_k'"),
        (dict(roles="yes"), "roles must be True or False"),
        (dict(verify={"n_rand": 3}), "verify=.*rat_lens.verify's keywords"),
    ],
)
def test_bad_census_input_is_one_error_and_writes_nothing(
    model, tmp_path, kwargs, message, no_typecheck
):
    args = dict(prompts=["cat dog red cat"], targets="last")
    args.update(kwargs)
    with pytest.raises(RatLensError, match=message):
        census(model, args.pop("prompts"), tmp_path / "out", progress=False, **args)
    assert not (tmp_path / "out").exists()


def test_the_cli_census_errors_before_loading(tmp_path, capsys):
    assert main(["census", str(tmp_path / "none.jsonl"), "-o", str(tmp_path / "o")]) == 2
    assert "cannot read prompts" in capsys.readouterr().err
    (tmp_path / "p.txt").write_text("cat dog red cat\n")
    assert main(["census", str(tmp_path / "p.txt"), "-o", str(tmp_path / "o"), "--top-k", "0"]) == 2
    assert not (tmp_path / "o").exists()


def test_role_scores_are_the_head_detectors_averaged_over_the_prompts(model, tmp_path):
    texts = prompts(6, seed=4)
    found = census(model, texts, tmp_path, roles=True, progress=False, **OPTIONS)
    assert found.roles.layers == [0, 1]
    for name, rows in found.roles.scores.items():
        theirs = detect_head(model, texts, name)  # TransformerLens's own, [layer, head]
        torch.testing.assert_close(
            torch.tensor(rows, dtype=torch.float64), theirs.double(), rtol=0, atol=1e-6
        )
    assert Census.from_json((tmp_path / "census.json").read_text()) == found
    header, *rows = (tmp_path / "census.csv").read_text().splitlines()
    names = header.split(",")[6:]
    assert sorted(names) == sorted(found.roles.scores)
    for row, h in zip(rows, found.heads):
        scores = [float(x) for x in row.split(",")[6:]]
        expected = [found.roles.get(n, h.layer, h.head) for n in names]
        assert scores == pytest.approx(expected, rel=1e-5)  # 6 significant digits
    # Records traced without role scores cannot give them: said, not guessed.
    census(model, texts, tmp_path / "plain", progress=False, **OPTIONS)
    with pytest.raises(RatLensError, match="traced without roles.*resume=False"):
        census(model, texts, tmp_path / "plain", roles=True, progress=False, **OPTIONS)


def test_each_prompts_causal_check_is_kept_with_its_trace(tmp_path):
    model = load("induction-2l", source="hooked" if OLD_BRIDGE else "bridge")
    texts = prompts(3, seed=5)
    check = {"n_random": 4, "token_importance": False, "percents": [50]}
    census(model, texts, tmp_path, verify=check, progress=False, **OPTIONS)
    for record, text in zip(lines(tmp_path / "traces.jsonl"), texts):
        expected = rat_lens.verify(model, rat_lens.trace(model, text, **OPTIONS), **check)
        assert TraceResult.from_dict(record["trace"]).verification == expected


def test_the_cli_census_writes_the_page_and_checks_when_asked(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("cat dog red cat dog\nsun moon sky sun moon\n")
    out = tmp_path / "o"
    flags = ["--layers", "0:1", "--agg-heads", "none", "--roles", "--verify"]
    if OLD_BRIDGE:  # the CLI loads the bridge, which cannot be verified there
        flags.remove("--verify")
    assert main(["census", str(tmp_path / "p.txt"), "-o", str(out), *flags]) == 0
    assert str(out / "census.html") in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [
        "census.csv",
        "census.html",
        "census.json",
        "traces.jsonl",
    ]
    records = lines(out / "traces.jsonl")
    assert all(r["roles"] and bool(r["trace"]["verification"]) != OLD_BRIDGE for r in records)


def test_a_census_never_adds_up_two_kinds_of_edge_weight(model, tmp_path, monkeypatch):
    """Over PATTERN_BUDGET the per-head default stays value_norm (in the bounded store): every
    prompt of a census, short or long, adds up edges of one kind, the kind asked for."""
    import rat_lens.options

    texts = ["cat dog red", "cat dog red blue green cat dog red blue green cat"]
    dense = census(
        model, texts, tmp_path / "dense", progress=False, layers=(0, 1), agg_heads="none"
    )
    # Per-head patterns (2 layers x 4 heads x 4 n^2 bytes) and the head-means' triangles (2
    # layers x 4 n^2 / 2) both pass it: bounded, without a rollout.
    monkeypatch.setattr(rat_lens.options, "PATTERN_BUDGET", 400)
    with pytest.warns(RuntimeWarning, match="no rollout"):
        found = census(model, texts, tmp_path, layers=(0, 1), agg_heads="none", progress=False)
    assert {t.edge_weight for t in found.traces()} == {"value_norm"}
    for got, expected in zip(found.traces(), dense.traces()):
        assert [b.positions for b in got.beams] == [b.positions for b in expected.beams]
        assert [b.heads for b in got.beams] == [b.heads for b in expected.beams]


class CtrlC:
    """The user's Ctrl-C in the first forward that runs ``text`` (alone or in a batch, padded on
    the right): a torch hook, untouched by TransformerLens's hooks."""

    def __init__(self, model, texts: list[str], at: int):
        tokens, mask = rat_lens.Tracer(model).tokenize(texts)
        ids = [row[m.bool()].tolist() for row, m in zip(tokens, mask)]
        assert not any(other[: len(ids[at])] == ids[at] for other in ids[:at])  # only prompt at
        self.model, self.ids = model, ids[at]

    def __enter__(self):
        def pre(module, args):
            if any(row[: len(self.ids)] == self.ids for row in args[0].tolist()):
                raise KeyboardInterrupt

        self.handle = self.model.embed.register_forward_pre_hook(pre)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_ctrl_c_in_a_census_keeps_finished_batches_and_says_how_far_it_got(model, tmp_path):
    texts = prompts(10, seed=3)
    full = census(model, texts, tmp_path / "full", batch_size=3, progress=False, **OPTIONS)
    with CtrlC(model, texts, at=7), pytest.raises(census_module.CensusInterrupted) as stop:
        census(model, texts, tmp_path / "cut", batch_size=3, progress=False, **OPTIONS)
    assert isinstance(stop.value, KeyboardInterrupt)  # what a Ctrl-C handler catches
    assert (stop.value.done, stop.value.total) == (6, 10)  # prompt 7's batch was under way
    expected = lines(tmp_path / "full" / "traces.jsonl")
    assert lines(tmp_path / "cut" / ".shards" / "rank0.jsonl") == expected[:6]
    again = census(model, texts, tmp_path / "cut", batch_size=3, progress=False, **OPTIONS)
    assert again.heads == full.heads
    assert lines(tmp_path / "cut" / "traces.jsonl") == expected


def test_ctrl_c_in_the_cli_census_is_one_line_and_exit_130(model, tmp_path, capsys, monkeypatch):
    texts = prompts(5, seed=4)
    data, out = tmp_path / "p.txt", tmp_path / "o"
    data.write_text("\n".join(texts) + "\n")
    command = ["census", str(data), "-o", str(out), "--batch-size", "2", "--layers", "0:1"]
    monkeypatch.setattr(rat_lens.models, "load", lambda *args, **kwargs: model)
    with CtrlC(model, texts, at=3):
        assert main(command) == 130
    assert capsys.readouterr().err.splitlines() == [
        "rat-lens census: interrupted after 2 of 5 prompts; run the same command to resume"
    ]
    with CtrlC(model, texts, at=1):
        assert main([*command, "--no-resume"]) == 130
    assert capsys.readouterr().err.splitlines() == [
        "rat-lens census: interrupted after 0 of 5 prompts; run it again without --no-resume "
        "to resume"
    ]
    assert main(command) == 0
    capsys.readouterr()
    expected = census(model, texts, tmp_path / "api", batch_size=2, layers=(0, 1), progress=False)
    assert lines(out / "traces.jsonl") == lines(tmp_path / "api" / "traces.jsonl")
    assert expected.n_prompts == 5

    def interrupted_load(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(rat_lens.models, "load", interrupted_load)
    assert main(command) == 130
    assert capsys.readouterr().err.splitlines() == [
        "rat-lens census: interrupted; run the same command to resume"
    ]
