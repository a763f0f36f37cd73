"""The renderer without a browser: the embedded data, its escaping, the page's self-containment,
files written, the vendored D3, and the ``rat-lens render`` command."""

import hashlib
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rat_lens
from rat_lens import RatLensError, TraceResult
from rat_lens.cli import main
from rat_lens.render import html_fragment, render_html, to_html
from rat_lens.render._payload import inline_json, payload
from rat_lens.result import BeamPath, build_sankey, path_text

RENDER = Path(rat_lens.__file__).parent / "render"
HOSTILE = ["</script><script>window.__pwned = 1</script>", '<img src=x onerror="alert(1)">',
           '"><svg onload=alert(2)>', "<!--", "-->", "a\u2028b", "c\u2029d", "&amp;",
           "🙂👍🏽", "שלום", "مرحبا", "\\u003c/script>"]


def make_result(attn: torch.Tensor, tokens: list[str], target: int = -1, **opts) -> TraceResult:
    """Trace a hand-made attention tensor and wrap it as rat_lens.tracer does for a model."""
    beams = rat_lens.trace_attention(attn, target, **opts)
    ids = list(range(len(tokens)))
    paths = [BeamPath.from_beam(b, tokens, ids) for b in beams]
    n_layers = 1 if attn.ndim == 2 else attn.shape[0]
    if "layers" in opts:
        lo, hi = (x % n_layers for x in opts["layers"])
        mode, layer, layer_lo = "layers", hi, lo
    else:
        mode, layer = "chain", opts.get("layer", -1) % n_layers
        layer_lo = layer
    return TraceResult(
        seq_len=len(tokens), target_pos=target % len(tokens), layer=layer,
        top_beam=opts.get("top_beam", 5), top_k=opts.get("top_k", 5), tokens=tokens,
        beams=paths, sankey=build_sankey(paths, tokens, mode, layer),
        paths_text=[path_text(p) for p in paths], mode=mode, layer_lo=layer_lo,
        agg_heads=opts.get("agg_heads", "mean"), token_ids=ids)


def causal(*shape: int, seed: int = 0, sharp: float = 3.0) -> torch.Tensor:
    """Random causal attention ``[*, n, n]``; ``sharp`` scales the logits (peakier rows)."""
    n = shape[-1]
    logits = torch.randn(*shape, n, generator=torch.Generator().manual_seed(seed)) * sharp
    return logits.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf")).softmax(-1)


def embedded(page: str) -> dict[str, dict]:
    """Widget id → the data inlined for it."""
    found = re.findall(r'<script type="application/json" id="ratlens-data-(\w+)">(.*?)</script>',
                       page, re.S)
    return {uid: json.loads(text) for uid, text in found}


@pytest.fixture
def small():
    """A 3-token chain whose beams can be checked by hand."""
    A = torch.tensor([[1.0, 0.0, 0.0], [0.7, 0.3, 0.0], [0.1, 0.6, 0.3]])
    return make_result(A, ["<bos>", " cat", " sat"], top_beam=2)


def test_payload_of_a_hand_made_chain(small):
    data = payload(small)
    assert [b["positions"] for b in data["beams"]] == [[2, 1, 0], [2, 0]]
    assert [b["node_ids"] for b in data["beams"]] == [["L0_P2", "L0_P1", "L0_P0"],
                                                      ["L0_P2", "L0_P0"]]
    assert [n["id"] for n in data["nodes"]] == ["L0_P0", "L0_P1", "L0_P2"]
    # Link weight: softmax(score_norm over beams) × edge attention (reverse-attention's rule).
    s1, s2 = math.log(0.6 * 0.7) / 2, math.log(0.1)
    w1 = 1 / (1 + math.exp(s2 - s1))
    links = {(lk["source"], lk["target"]): lk for lk in data["links"]}
    assert set(links) == {("L0_P1", "L0_P2"), ("L0_P0", "L0_P1"), ("L0_P0", "L0_P2")}
    assert links["L0_P1", "L0_P2"]["value"] == pytest.approx(w1 * 0.6, rel=1e-5)
    assert links["L0_P0", "L0_P2"]["beams"] == [1]
    assert data["strip"] == {"source": "edges", "rows": [[2, 1, 0.6, 0, None], [1, 0, 0.7, 0, None],
                                                        [2, 0, 0.1, 0, None]]}
    assert data["tokens"] == small.tokens and data["meta"]["mode"] == "chain"


def test_payload_of_a_per_head_layers_trace_names_heads_and_node_layers():
    result = make_result(causal(3, 2, 6), [f"t{i}" for i in range(6)], layers=(0, 2),
                         agg_heads="none")
    data = payload(result)
    for beam, b in zip(result.beams, data["beams"]):
        layers = beam.layers + [beam.layers[-1] - 1]
        assert b["node_ids"] == [f"L{lay}_P{p}" for lay, p in zip(layers, beam.positions)]
        assert all(isinstance(h, int) for h in b["heads"])
    assert len(data["nodes"]) == len(result.sankey.nodes)
    assert {(r[0], r[1], r[3], r[4]) for r in data["strip"]["rows"]} == {
        (b.positions[i], b.positions[i + 1], b.layers[i], b.heads[i])
        for b in result.beams for i in range(b.num_edges)}


def test_inline_json_cannot_close_the_script_or_break_lines():
    text = inline_json({"tokens": HOSTILE})
    assert not set(text) & {"<", ">", "&", "\u2028", "\u2029"}
    assert json.loads(text) == {"tokens": HOSTILE}


def test_hostile_tokens_stay_inside_the_data_element(small):
    small.tokens = HOSTILE[:3]
    page = to_html(small)
    assert page.count("<script") == page.count("</script>") == 2  # the data and the code
    assert "<!--" not in page and "\u2028" not in page and "\u2029" not in page
    assert list(embedded(page).values())[0]["tokens"] == HOSTILE[:3]
    title = re.search(r"<title>(.*?)</title>", page, re.S).group(1)
    assert "<" not in title and ">" not in title


def test_page_is_self_contained_and_our_code_never_fetches_or_injects_markup(small):
    page = to_html(small)
    assert not re.search(r"<script[^>]*\bsrc=|<link\b|<iframe\b|<img\b", page)
    ours = "".join(p.read_text() for p in [*sorted((RENDER / "js").glob("*.js")),
                                           RENDER / "widget.css"])
    for banned in ("fetch(", "XMLHttpRequest", "innerHTML", "outerHTML", "insertAdjacentHTML",
                   ".html(", "eval(", "document.write", "import("):
        assert banned not in ours, banned
    assert set(re.findall(r"https?://[^\s\"')]+", ours)) == {"http://www.w3.org/2000/svg"}


def test_every_widget_gets_its_own_ids(small):
    first, second = small._repr_html_(), small._repr_html_()
    assert not first.startswith("<!DOCTYPE") and to_html(small).startswith("<!DOCTYPE html>")
    ids = re.findall(r'id="([^"]+)"', first + second)
    assert len(ids) == len(set(ids)) == 6  # widget, data and summary panel, twice
    several = html_fragment([small, small, small])
    assert len(embedded(several)) == 3 and several.count("<script>") == 1  # D3 inlined once


def test_render_html_writes_a_page_and_the_trace_and_opens_it(small, tmp_path, monkeypatch):
    opened = []
    monkeypatch.setattr("webbrowser.open", opened.append)
    index = render_html(small, tmp_path / "out", open_browser=True)
    assert index == str(tmp_path / "out" / "index.html")
    assert list(embedded(Path(index).read_text()).values()) == [payload(small)]
    assert TraceResult.from_json((tmp_path / "out" / "trace.json").read_text()) == small
    assert opened == [Path(index).resolve().as_uri()]


def test_a_token_with_a_lone_surrogate_still_renders(small, tmp_path):
    small.tokens = ["\ud800", "ok", "\udfff"]  # not valid UTF-8; json escapes it
    index = render_html(small, tmp_path)
    assert list(embedded(Path(index).read_text()).values())[0]["tokens"] == small.tokens


def test_render_html_errors_name_the_problem(small, tmp_path, no_typecheck):
    (tmp_path / "file").write_text("")
    with pytest.raises(RatLensError, match="cannot write the page"):
        render_html(small, tmp_path / "file")
    with pytest.raises(RatLensError, match="TraceResult"):
        to_html([])
    with pytest.raises(RatLensError, match="TraceResult"):
        to_html({"beams": []})


def test_vendored_d3_is_the_unmodified_npm_dist():
    notes = (RENDER / "vendor" / "VENDOR.md").read_text()
    for name in ("d3.min.js", "d3-sankey.min.js"):
        digest = hashlib.sha256((RENDER / "vendor" / name).read_bytes()).hexdigest()
        assert digest in notes, name
    assert "Permission to use" in (RENDER / "vendor" / "LICENSE-d3").read_text()  # ISC
    assert "Redistribution" in (RENDER / "vendor" / "LICENSE-d3-sankey").read_text()


def test_cli_render_round_trips_a_saved_trace_into_the_same_data(small, tmp_path, capsys):
    saved = tmp_path / "trace.json"
    saved.write_text(small.to_json())
    assert main(["render", str(saved), "-o", str(tmp_path / "out")]) == 0
    index = capsys.readouterr().out.strip()
    assert list(embedded(Path(index).read_text()).values()) == [payload(small)]


def test_cli_renders_several_traces_on_one_page(small, tmp_path):
    other = make_result(causal(2, 1, 5), list("abcde"), layers=(0, 1))
    paths = []
    for i, result in enumerate([small, other]):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(result.to_json())
    assert main(["render", *map(str, paths), "-o", str(tmp_path / "out")]) == 0
    page = (tmp_path / "out" / "index.html").read_text()
    assert list(embedded(page).values()) == [payload(small), payload(other)]
    # The trace.json written next to it is a list, and renders the same page again.
    assert main(["render", str(tmp_path / "out" / "trace.json"), "-o", str(tmp_path / "b")]) == 0
    assert list(embedded((tmp_path / "b" / "index.html").read_text()).values()) == \
        list(embedded(page).values())


def test_cli_reports_unreadable_traces(tmp_path, capsys):
    (tmp_path / "bad.json").write_text('{"not": "a trace"}')
    assert main(["render", str(tmp_path / "bad.json"), "-o", str(tmp_path / "out")]) == 2
    assert "bad.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["render", str(tmp_path / "bad.json")])  # -o is required


def test_cli_runs_as_a_module(small, tmp_path):
    (tmp_path / "t.json").write_text(small.to_json())
    done = subprocess.run([sys.executable, "-m", "rat_lens.cli", "render", str(tmp_path / "t.json"),
                           "-o", str(tmp_path / "out")], capture_output=True, text=True,
                          check=True)
    assert Path(done.stdout.strip()).is_file()


def test_the_page_carries_the_circuit_summary_escaped():
    import torch
    import rat_lens
    from rat_lens.render import to_html
    from rat_lens.result import BeamPath, TraceResult, build_sankey, path_text
    tokens = ["<bos>", "</script><img src=x onerror=alert(1)>", " sat"]
    A = torch.tensor([[1.0, 0.0, 0.0], [0.7, 0.3, 0.0], [0.1, 0.6, 0.3]])
    beams = [BeamPath.from_beam(b, tokens, [0, 1, 2]) for b in rat_lens.trace_attention(A)]
    result = TraceResult(3, 2, 0, 5, 5, tokens, beams, build_sankey(beams, tokens, "chain", 0),
                         [path_text(b) for b in beams])
    page = to_html(result)
    panel = page[page.index('<details class="ratlens-summary"'):]
    panel = panel[:panel.index("</details>")]
    assert "Circuit summary" in panel and "Traced mass by head" in panel
    assert "&lt;/script&gt;&lt;img" in panel  # shown as text (long tokens are shortened)
    assert "<img" not in panel and "<script" not in panel


def test_a_page_of_several_targets_links_to_each(small):
    import copy
    other = copy.deepcopy(small)
    other.target_pos = 1
    page = html_fragment([small, other])
    nav = page[page.index('<nav class="ratlens-targets">'):page.index("</nav>")]
    ids = re.findall(r'href="#(ratlens-[0-9a-f]+)"', nav)
    assert len(ids) == 2 and all(f'id="{i}"' in page for i in ids)
    assert f"@{small.target_pos}" in nav and "@1" in nav
    assert '<nav class="ratlens-targets">' not in html_fragment(small)
