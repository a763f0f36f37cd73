"""The rat-lens command: the README's main job, every flag of trace, bad values, exit codes."""

import json
import os
import subprocess
import sys

import pytest

import rat_lens
from rat_lens.cli import main
from rat_lens.models import load
from rat_lens.result import TraceResult

TEXT = "cat dog red blue green cat dog red"


def test_the_readme_main_job_runs_offline_as_a_real_command(tmp_path):
    """Exactly the README's line: installed console script, no flags, no network."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run(
        ["rat-lens", "trace", TEXT],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "target 8 'red', layers 0..1, 5 beams:" in done.stdout
    assert "  'red'@8 ←L1.H" in done.stdout and "(score: " in done.stdout  # per head
    page = tmp_path / "rat_lens_out" / "index.html"
    assert page.exists() and f"wrote {page.relative_to(tmp_path)}" in done.stdout
    saved = TraceResult.from_json((tmp_path / "rat_lens_out" / "trace.json").read_text())
    assert saved.beams == rat_lens.trace(load("induction-2l"), TEXT).beams


def run(capsys, *args):
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def saved(out_dir):
    data = json.loads((out_dir / "trace.json").read_text())
    return [TraceResult.from_dict(d) for d in (data if isinstance(data, list) else [data])]


def test_every_trace_flag_reaches_the_tracer(tmp_path, capsys):
    out = tmp_path / "o"
    code, stdout, _ = run(
        capsys,
        "trace",
        "--text",
        TEXT,
        "--model",
        "induction-2l",
        "--target-pos",
        "-1",
        "-2",
        "--layers",
        "0:1",
        "--top-beam",
        "3",
        "--top-k",
        "4",
        "--min-attn",
        "0.01",
        "--agg-heads",
        "none",
        "--length-norm",
        "pow:0.5",
        "--residual",
        "rollout",
        "--exclude-bos",
        "--no-stop-at-bos",
        "--output",
        str(out),
        "--format",
        "json,md",
        "--predictions",
        "2",
        "--device",
        "cpu",
    )
    assert code == 0
    results = saved(out)
    assert [r.target_pos for r in results] == [8, 7]
    expected = rat_lens.ReverseAttentionTracer(load("induction-2l")).trace_text(
        TEXT,
        -2,
        layers=(0, 1),
        top_beam=3,
        top_k=4,
        min_attn=0.01,
        agg_heads="none",
        length_norm="pow:0.5",
        residual="rollout",
        exclude_bos=True,
        stop_at_bos=False,
    )
    assert results[1].beams == expected.beams
    assert (results[1].top_beam, results[1].top_k, results[1].residual) == (3, 4, "rollout")
    assert not (out / "index.html").exists()
    markdown = (out / "trace.md").read_text()
    assert markdown.count("'red'@8") >= 1 and "| " in markdown
    assert "←L1.H" in stdout
    assert "Traced mass by head" in stdout and "Predictions at traced positions" in stdout
    assert len(results[0].predictions[0].token_ids) == 2


def test_layer_flag_chain_mode_and_html_only(tmp_path, capsys):
    code, _, _ = run(
        capsys, "trace", TEXT, "--layer", "0", "--out", str(tmp_path), "--format", "html"
    )
    assert code == 0
    assert (tmp_path / "index.html").exists()
    (result,) = saved(tmp_path)  # the page's own trace.json
    assert (result.mode, result.layer) == ("chain", 0)


def test_generate_traces_each_generated_token(tmp_path, capsys):
    code, stdout, _ = run(
        capsys, "trace", "cat dog red blue cat dog", "--generate", "2", "--out", str(tmp_path)
    )
    assert code == 0
    results = saved(tmp_path)
    assert [r.target_pos for r in results] == [6, 7]  # the positions that produced them
    assert results[0].tokens[-2:] == ["red", "blue"]  # the induction model continues the copy
    assert stdout.count(", layers 0..1, 5 beams:") == 2  # the default: per head, full depth


def test_render_round_trips_a_trace_written_by_trace(tmp_path, capsys):
    assert run(capsys, "trace", TEXT, "--out", str(tmp_path / "a"))[0] == 0
    code, stdout, _ = run(
        capsys, "render", str(tmp_path / "a" / "trace.json"), "-o", str(tmp_path / "b")
    )
    assert code == 0 and stdout.strip().endswith("index.html")
    assert saved(tmp_path / "b") == saved(tmp_path / "a")


def test_models_lists_what_loads_offline(capsys):
    code, stdout, _ = run(capsys, "models")
    assert code == 0
    line = next(row for row in stdout.splitlines() if row.startswith("induction-2l"))
    assert "offline" in line


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["trace", TEXT, "--layers", "1-3"], 2, "--layers: layers '1-3' is not LO:HI"),
        (["trace", TEXT, "--layer", "0", "--layers", "0:1"], 2, "not allowed with argument"),
        (["trace", TEXT, "--format", "pdf"], 2, "'pdf' not in {html, json, md}"),
        (["trace", TEXT, "--agg-heads", "sum"], 2, "invalid choice: 'sum'"),
        (["trace", TEXT, "--top-beam", "x"], 2, "invalid int value: 'x'"),
        (["trace"], 2, "give the text to trace"),
        (["trace", TEXT, "--model", "no-such-model"], 1, "no-such-model"),
        (["trace", TEXT, "--layers", "0:5"], 2, "layers[1]=5 out of range for n_layers 2"),
        (["trace", TEXT, "--layer", "7"], 2, "layer=7 out of range for n_layers 2"),
        (["trace", TEXT, "--target-pos", "99"], 2, "target_pos=99 out of range"),
        (["trace", TEXT, "--target-pos", "9"], 1, "target_pos=9 out of range"),
        (["trace", TEXT, "--top-k", "0"], 2, "top_k must be >= 1, got 0"),
        (["trace", TEXT, "--length-norm", "avg"], 2, "length_norm='avg' not in"),
        (["trace", TEXT, "--layer", "1", "--residual", "rollout"], 2, "needs layers mode"),
        (["trace", TEXT, "--generate", "90"], 1, "exceeds the model's context of 64"),
        (["trace", "cat zebra"], 1, "zebra"),
        (["trace", TEXT, "--query-chunk", "0"], 1, "query_chunk must be >= 1, got 0"),
        (["trace", TEXT, "--query-chunk", "4"], 1, "ignored the KV cache across query chunks"),
        (
            ["trace", TEXT, "--query-chunk", "x"],
            2,
            "--query-chunk 'x' is not a number, auto or off",
        ),
        (["render", "missing.json", "-o", "x"], 2, "cannot read a trace from 'missing.json'"),
        ([], 2, "required: COMMAND"),
    ],
)
def test_bad_values_exit_with_one_line_naming_the_problem(
    tmp_path, monkeypatch, capsys, args, code, message
):
    monkeypatch.chdir(tmp_path)
    try:
        got = main(args)  # an uncaught exception here would be a traceback for the user
    except SystemExit as exit:  # argparse's own usage errors
        got = exit.code
    err = capsys.readouterr().err
    assert got == code
    assert message in err
    assert len([line for line in err.splitlines() if "error" in line]) == 1


def test_errors_are_one_line_without_traceback_from_the_installed_command(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "rat_lens.cli", "trace", TEXT, "--layer", "9"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2  # checked against the config, before the load
    assert done.stderr.strip() == (
        "rat-lens trace: error: layer=9 out of range for n_layers 2 (valid: -2..1)"
    )


def test_open_browser_opens_the_written_page(tmp_path, capsys, monkeypatch):
    opened = []
    monkeypatch.setattr("webbrowser.open", lambda url: opened.append(url) or True)
    code, _, _ = run(capsys, "trace", TEXT, "--out", str(tmp_path), "--open-browser")
    assert code == 0
    assert opened == [(tmp_path / "index.html").resolve().as_uri()]


def test_store_flag_keeps_the_beams_and_refuses_what_it_cannot_bound(tmp_path, capsys):
    per_head = ["--layers", "0:1", "--agg-heads", "none", "--edge-weight", "attention"]
    for store in ("dense", "bounded"):
        code, _, _ = run(
            capsys, "trace", TEXT, *per_head, "--store", store, "-o", str(tmp_path / store)
        )
        assert code == 0
    dense, bounded = saved(tmp_path / "dense"), saved(tmp_path / "bounded")
    assert dense[0].beams == bounded[0].beams and dense[0].head_rows == bounded[0].head_rows
    # one head-mean matrix has no per-head rows
    code, _, err = run(
        capsys, "trace", TEXT, "--layers", "0:1", "--agg-heads", "mean", "--store", "bounded"
    )
    assert code == 1 and "store='bounded' is for per-head traces" in err
