"""The renderer without a browser: the embedded data, its escaping, the page's self-containment,
files written, the vendored D3, and the ``rat-lens render`` command."""

import dataclasses
import difflib
import hashlib
import importlib.metadata
import itertools
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rat_lens
from rat_lens import RatLensError, TraceResult
from rat_lens.cli import main
from rat_lens.render import _census, _html, html_fragment, render_html, to_html
from rat_lens.render._payload import inline_json, payload
from rat_lens.result import (
    BeamPath,
    Prediction,
    SankeyData,
    SankeyNode,
    beam_weights,
    build_sankey,
    node_id,
    path_text,
)

RENDER = Path(rat_lens.__file__).parent / "render"
SNAPSHOTS = Path(__file__).parent / "snapshots"
HOSTILE = [
    "</script><script>window.__pwned = 1</script>",
    '<img src=x onerror="alert(1)">',
    '"><svg onload=alert(2)>',
    "<!--",
    "-->",
    "a\u2028b",
    "c\u2029d",
    "&amp;",
    "🙂👍🏽",
    "שלום",
    "مرحبا",
    "\\u003c/script>",
]


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
        seq_len=len(tokens),
        target_pos=target % len(tokens),
        layer=layer,
        top_beam=opts.get("top_beam", 5),
        top_k=opts.get("top_k", 5),
        tokens=tokens,
        beams=paths,
        sankey=build_sankey(paths, tokens, mode, layer),
        paths_text=[path_text(p) for p in paths],
        mode=mode,
        layer_lo=layer_lo,
        agg_heads=opts.get("agg_heads", "mean"),
        token_ids=ids,
    )


# A full-depth per-head route as a contribution-weighted trace of SmolLM2 finds them (DESIGN.md):
# (layer, head, key) of each move from the target, stays everywhere else. Prompt: 20 random words
# repeated, the target the repeat's last word; beam 0 is the induction circuit (a previous-token
# head, then an induction head reading the token after the earlier copy).
DEEP_ROUTES = [
    [(18, 6, 20), (2, 1, 19)],
    [(17, 3, 20), (13, 1, 19)],
    [(23, 2, 20)],
    [(18, 6, 20), (11, 1, 19), (1, 2, 18)],
    [(27, 4, 0)],
]


def deep_result(n_tokens: int = 40, n_layers: int = 30, prompt_len=None) -> TraceResult:
    """A synthetic trace at SmolLM2's shape (30 layers, 9 heads, per head, full depth, edges of
    contribution weight with residual stays): every edge of every beam is known here, so the
    page can be checked against it."""
    words = [f" w{i}" for i in range(n_tokens // 2 - 1)]
    tokens = ["<bos>", *words, *words][:n_tokens] + [" x"] * max(0, n_tokens - 2 * len(words) - 1)
    target = n_tokens - 1
    beams = []
    for rank, moves in enumerate(DEEP_ROUTES):
        at = {lay: (head, key) for lay, head, key in moves}
        positions, weights, heads, kinds, pos = [target], [], [], [], target
        for layer in range(n_layers - 1, -1, -1):
            head, key = at.get(layer, (None, pos))
            weights.append(0.12 + 0.05 * rank if head is not None else 0.8)
            heads.append(head)
            kinds.append("residual" if head is None else "head")
            pos = key
            positions.append(pos)
        score = -0.5 * rank - 0.1
        beams.append(
            BeamPath(
                positions,
                [tokens[p] for p in positions],
                list(positions),
                score_raw=score,
                score_norm=score,
                edge_weights=weights,
                edge_attns=[None if h is None else 0.6 for h in heads],
                layers=list(range(n_layers - 1, -1, -1)),
                heads=heads,
                bos_mass=[0.5] * n_layers,
                kinds=kinds,
            )
        )
    result = TraceResult(
        n_tokens,
        target,
        n_layers - 1,
        len(beams),
        5,
        tokens,
        beams,
        build_sankey(beams, tokens, "layers", n_layers - 1),
        [path_text(b) for b in beams],
        mode="layers",
        layer_lo=0,
        agg_heads="none",
        length_norm="none",
        token_ids=list(range(n_tokens)),
        edge_weight="value_norm",
        move_threshold=0.05,
        depth_discount=0.9,
        predictions=[
            Prediction(
                target, tokens[target], [1, 2, 3], [" w0", " the", " w1"], [0.62, 0.05, 0.03]
            )
        ],
    )
    if prompt_len is not None:
        result.prompt_len = prompt_len
    return result


def causal(*shape: int, seed: int = 0, sharp: float = 3.0) -> torch.Tensor:
    """Random causal attention ``[*, n, n]``; ``sharp`` scales the logits (peakier rows)."""
    n = shape[-1]
    logits = torch.randn(*shape, n, generator=torch.Generator().manual_seed(seed)) * sharp
    return logits.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf")).softmax(-1)


def embedded(page: str) -> dict[str, dict]:
    """Widget id → the data inlined for it."""
    found = re.findall(
        r'<script type="application/json" id="ratlens-data-(\w+)">(.*?)</script>', page, re.S
    )
    return {uid: json.loads(text) for uid, text in found}


@pytest.fixture
def small():
    """A 3-token chain whose beams can be checked by hand."""
    A = torch.tensor([[1.0, 0.0, 0.0], [0.7, 0.3, 0.0], [0.1, 0.6, 0.3]])
    return make_result(A, ["<bos>", " cat", " sat"], top_beam=2)


def test_payload_of_a_hand_made_chain(small):
    data = payload(small)
    assert [b["positions"] for b in data["beams"]] == [[2, 1, 0], [2, 0]]
    assert [b["node_ids"] for b in data["beams"]] == [
        ["L0_P2", "L0_P1", "L0_P0"],
        ["L0_P2", "L0_P0"],
    ]
    assert [n["id"] for n in data["nodes"]] == ["L0_P0", "L0_P1", "L0_P2"]
    # Link weight: softmax(score_norm over beams) × edge attention (reverse-attention's rule).
    s1, s2 = math.log(0.6 * 0.7) / 2, math.log(0.1)
    w1 = 1 / (1 + math.exp(s2 - s1))
    links = {(lk["source"], lk["target"]): lk for lk in data["links"]}
    assert set(links) == {("L0_P1", "L0_P2"), ("L0_P0", "L0_P1"), ("L0_P0", "L0_P2")}
    assert links["L0_P1", "L0_P2"]["value"] == pytest.approx(w1 * 0.6, rel=1e-5)
    assert links["L0_P0", "L0_P2"]["beams"] == [1]
    assert data["strip"] == {
        "source": "edges",
        "rows": [
            {"query": 2, "key": 1, "weight": 0.6, "layer": 0, "head": None},
            {"query": 1, "key": 0, "weight": 0.7, "layer": 0, "head": None},
            {"query": 2, "key": 0, "weight": 0.1, "layer": 0, "head": None},
        ],
    }
    assert data["tokens"] == small.tokens and data["meta"]["mode"] == "chain"
    assert data["meta"]["target_node_id"] == "L0_P2"


def test_payload_of_a_per_head_layers_trace_names_heads_and_node_layers():
    result = make_result(
        causal(3, 2, 6), [f"t{i}" for i in range(6)], layers=(0, 2), agg_heads="none"
    )
    data = payload(result)
    for beam, b in zip(result.beams, data["beams"]):
        layers = beam.layers + [beam.layers[-1] - 1]
        assert b["node_ids"] == [node_id(lay, p) for lay, p in zip(layers, beam.positions)]
        assert all(isinstance(h, int) for h in b["heads"])
    assert len(data["nodes"]) == len(result.sankey.nodes)
    assert {(r["query"], r["key"], r["layer"], r["head"]) for r in data["strip"]["rows"]} == {
        (b.positions[i], b.positions[i + 1], b.layers[i], b.heads[i])
        for b in result.beams
        for i in range(b.num_edges)
    }


def beam_edges(result: TraceResult, data: dict) -> dict[tuple, list[tuple[int, float]]]:
    """(key node, query node, layer, head) → [(beam index, attention)] over the beams' edges."""
    edges = {}
    for b, (beam, ids) in enumerate(zip(result.beams, (d["node_ids"] for d in data["beams"]))):
        for i, w in enumerate(beam.edge_weights):
            edges.setdefault((ids[i + 1], ids[i], beam.layers[i], beam.heads[i]), []).append((b, w))
    return edges


@pytest.mark.parametrize("mode", [{"layers": (0, 2)}, {"layer": 1}], ids=["layers", "chain"])
def test_per_head_links_are_one_per_layer_head_key_query_edge(mode):
    result = make_result(
        causal(3, 3, 7, seed=4),
        [f"t{i}" for i in range(7)],
        agg_heads="none",
        top_beam=8,
        top_k=4,
        **mode,
    )
    data = payload(result)
    edges, weights = beam_edges(result, data), beam_weights(result.beams)
    links = {(lk["source"], lk["target"], lk["layer"], lk["head"]): lk for lk in data["links"]}
    assert len(links) == len(data["links"]) and set(links) == set(edges)
    assert len({h for *_, h in links}) > 1  # several heads: the case the merged links hid
    for edge, used in edges.items():
        # Σ over the beams using the edge of softmax(score_norm over beams) × edge weight.
        assert links[edge]["value"] == pytest.approx(sum(weights[b] * w for b, w in used), 1e-5)
        assert links[edge]["beams"] == sorted({b for b, _ in used})
    # The heads of one key → query pair add up to the Sankey graph's link, which merges them.
    summed = {}
    for (source, target, _, _), lk in links.items():
        summed[source, target] = summed.get((source, target), 0) + lk["value"]
    merged = {(lk.source, lk.target): lk.value for lk in result.sankey.links}
    assert summed == pytest.approx(merged, rel=1e-5)  # each link rounded to 6 digits


def test_aggregated_links_are_the_sankey_graphs(small):
    assert payload(small)["links"] == [
        {
            "source": lk.source,
            "target": lk.target,
            "value": pytest.approx(lk.value, rel=1e-5),
            "beams": lk.beam_indices,
            "layer": lk.layer,
            "head": None,
        }
        for lk in small.sankey.links
    ]


def test_a_contribution_weighted_traces_residual_stays_are_links_of_their_own():
    from rat_lens.models import load

    result = rat_lens.trace(
        load("induction-2l"),
        "cat dog red blue green cat dog red",
        layers=(0, 1),
        agg_heads="none",
        edge_weight="value_norm",
    )
    data = payload(result)
    assert [b["kinds"] for b in data["beams"]] == [b.kinds for b in result.beams]
    stays = {
        (b["node_ids"][i + 1], b["node_ids"][i], b["layers"][i])
        for b in data["beams"]
        for i, kind in enumerate(b["kinds"])
        if kind == "residual"
    }
    residual = [lk for lk in data["links"] if lk.get("residual")]
    assert stays and {(lk["source"], lk["target"], lk["layer"]) for lk in residual} == stays
    assert all(lk["head"] is None and lk["residual"] is True for lk in residual)
    assert all("residual" not in lk for lk in data["links"] if lk["head"] is not None)
    assert schema_problems(data, "Payload", typedefs(), "p", set()) == []


def test_predictions_and_head_rows_reach_the_payload(small):
    small.predictions = [Prediction(2, " sat", [5, 6], ["</script>", " on"], [0.91234567, 0.05])]
    data = payload(small)
    assert data["predictions"] == [
        {"position": 2, "tokens": ["</script>", " on"], "probs": [0.912346, 0.05]}
    ]
    assert "head_rows" not in data
    row = {"layer": 0, "head": None, "query": 2, "keys": [0, 1, 2], "weights": [0.1, 0.6, 0.3]}
    small.head_rows = [row]  # optional: a result from a tracer that records them
    assert payload(small)["head_rows"] == [row]

    class HeadRow:  # or objects with the same attributes
        layer, head, query, keys, weights = 0, 3, 2, [1], [0.25]

    small.head_rows = [HeadRow()]
    assert payload(small)["head_rows"] == [
        {"layer": 0, "head": 3, "query": 2, "keys": [1], "weights": [0.25]}
    ]
    small.head_rows = [row]  # the page also summarises the result: saved-trace fields only
    assert list(embedded(to_html(small)).values())[0]["predictions"] == data["predictions"]


def test_node_ids_are_the_sankey_graphs_own(small):
    # The payload reads ids from result.sankey.nodes (made by node_id in build_sankey) instead of
    # formatting them again: renamed nodes stay consistent across beams, links and nodes ...
    for n in small.sankey.nodes:
        n.id = f"node{n.position}"
    for lk in small.sankey.links:
        lk.source, lk.target = (f"node{lk.source[-1]}", f"node{lk.target[-1]}")
    data = payload(small)
    assert [b["node_ids"] for b in data["beams"]] == [
        ["node2", "node1", "node0"],
        ["node2", "node0"],
    ]
    assert data["meta"]["target_node_id"] == "node2"
    drawn = {n["id"] for n in data["nodes"]}
    assert {i for b in data["beams"] for i in b["node_ids"]} == drawn
    assert {lk["source"] for lk in data["links"]} | {lk["target"] for lk in data["links"]} <= drawn
    # ... and a node the graph lacks gets node_id's id, which matches nothing drawn.
    small.sankey = SankeyData([SankeyNode("node0", "<bos>", 0, 0)], [])
    data = payload(small)
    assert data["beams"][0]["node_ids"] == ["L0_P2", "L0_P1", "node0"]
    assert data["meta"]["target_node_id"] == node_id(0, 2)


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
    ours = "".join(
        p.read_text() for p in [*sorted((RENDER / "js").glob("*.js")), *RENDER.glob("*.css")]
    )
    for banned in (
        "fetch(",
        "XMLHttpRequest",
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        ".html(",
        "eval(",
        "document.write",
        "import(",
    ):
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
    with pytest.raises(RatLensError, match="cannot write"):
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
    assert list(embedded((tmp_path / "b" / "index.html").read_text()).values()) == list(
        embedded(page).values()
    )


def test_cli_reports_unreadable_traces(tmp_path, capsys):
    (tmp_path / "bad.json").write_text('{"not": "a trace"}')
    assert main(["render", str(tmp_path / "bad.json"), "-o", str(tmp_path / "out")]) == 2
    assert "bad.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["render", str(tmp_path / "bad.json")])  # -o is required


def test_cli_runs_as_a_module(small, tmp_path):
    (tmp_path / "t.json").write_text(small.to_json())
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "rat_lens.cli",
            "render",
            str(tmp_path / "t.json"),
            "-o",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(done.stdout.strip()).is_file()


def test_the_page_carries_the_circuit_summary_escaped():
    tokens = ["<bos>", "</script><img src=x onerror=alert(1)>", " sat"]
    A = torch.tensor([[1.0, 0.0, 0.0], [0.7, 0.3, 0.0], [0.1, 0.6, 0.3]])
    beams = [BeamPath.from_beam(b, tokens, [0, 1, 2]) for b in rat_lens.trace_attention(A)]
    result = TraceResult(
        3,
        2,
        0,
        5,
        5,
        tokens,
        beams,
        build_sankey(beams, tokens, "chain", 0),
        [path_text(b) for b in beams],
    )
    page = to_html(result)
    panel = page[page.index('<details class="ratlens-summary"') :]
    panel = panel[: panel.index("</details>")]
    assert "Circuit summary" in panel and "Traced mass by head" in panel
    assert "&lt;/script&gt;&lt;img" in panel  # shown as text (long tokens are shortened)
    assert "<img" not in panel and "<script" not in panel


def test_a_page_of_several_targets_links_to_each(small):
    A = torch.tensor([[1.0, 0.0, 0.0], [0.7, 0.3, 0.0], [0.1, 0.6, 0.3]])
    other = make_result(A, small.tokens, 1, top_beam=2)  # the same prompt from position 1
    page = html_fragment([small, other])
    nav = page[page.index('<nav class="ratlens-targets">') : page.index("</nav>")]
    ids = re.findall(r'href="#(ratlens-[0-9a-f]+)"', nav)
    assert len(ids) == 2 and all(f'id="{i}"' in page for i in ids)
    assert f"@{small.target_pos}" in nav and "@1" in nav
    # Each target with the token after it: on a --generate page, what the model produced there.
    assert "&#x27; cat&#x27;@1 → &#x27; sat&#x27;" in nav and "prompt" not in nav
    assert '<nav class="ratlens-targets">' not in html_fragment(small)
    other.batch_index = 1  # several prompts: each target names its prompt
    nav = html_fragment([small, other]).split('<nav class="ratlens-targets">')[1]
    nav = nav[: nav.index("</nav>")]
    assert "(prompt 0)" in nav and "(prompt 1)" in nav


def test_a_generate_run_prints_the_continuation_and_its_page_names_each_next_token(
    tmp_path, capsys
):
    out = tmp_path / "out"
    text = "cat dog red blue green cat dog"
    assert main(["trace", text, "--generate", "2", "--layers", "0:1", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "generated 2 tokens: 'red blue'" in printed
    assert "target 7 'dog' -> 'red' (generated)" in printed
    assert "target 8 'red' -> 'blue' (generated)" in printed
    page = (out / "index.html").read_text()
    nav = page[page.index('<nav class="ratlens-targets">') : page.index("</nav>")]
    assert (
        "&#x27;dog&#x27;@7 → &#x27;red&#x27;" in nav
        and "&#x27;red&#x27;@8 → &#x27;blue&#x27;" in nav
    )


# --- The page's data against its documented schema (rat_lens/render/js/schema.js) -------------


def typedefs() -> dict[str, dict[str, tuple[str, bool]]]:
    """schema.js's JSDoc records: typedef name → {field: (type, optional)}."""
    found = {}
    for block in re.findall(r"/\*\*(.*?)\*/", (RENDER / "js" / "schema.js").read_text(), re.S):
        name = re.search(r"@typedef\s+\{Object\}\s+(\w+)", block)
        if name:
            fields = re.findall(r"@property\s+\{([^}]+)\}\s+(\[\w+\]|\w+)", block)
            found[name.group(1)] = {f.strip("[]"): (t, f.startswith("[")) for t, f in fields}
    return found


def depths(text: str) -> list[int]:
    """The bracket depth after each character of a type expression."""
    return list(itertools.accumulate((c in "(<[") - (c in ")>]") for c in text))


def split_top(text: str, sep: str) -> list[str]:
    """``text`` split at ``sep`` outside brackets: ``A|Array<B|C>`` → ``A``, ``Array<B|C>``."""
    cuts = [i for i, (c, d) in enumerate(zip(text, depths(text))) if c == sep and d == 0]
    return [text[a + 1 : b] for a, b in zip([-1, *cuts], [*cuts, len(text)])]


def schema_problems(value, type_: str, types: dict, where: str, seen: set) -> list[str]:
    """What in ``value`` does not match the JSDoc type ``type_`` (the forms schema.js uses:
    records, ``T[]``, ``Array<T>``, ``Object<string, T>``, ``?T``, ``A|B``, string literals,
    number / string / boolean); the records met are added to ``seen``."""
    t = type_.strip()
    if t.startswith("(") and 0 not in depths(t)[:-1]:  # (A|B), not (A)|(B)
        t = t[1:-1]
    if len(alternatives := split_top(t, "|")) > 1:
        found = [schema_problems(value, a, types, where, seen) for a in alternatives]
        return [] if [] in found else [p for ps in found for p in ps]
    if t.startswith("?"):
        return [] if value is None else schema_problems(value, t[1:], types, where, seen)
    item = t[:-2] if t.endswith("[]") else (re.fullmatch(r"Array<(.+)>", t) or [None, None])[1]
    if item is not None:
        if not isinstance(value, list):
            return [f"{where}: {value!r} is not a list"]
        return [
            p
            for i, v in enumerate(value)
            for p in schema_problems(v, item, types, f"{where}[{i}]", seen)
        ]
    if m := re.fullmatch(r"Object<string,\s*(.+)>", t):
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            return [f"{where}: {value!r} is not a map of strings"]
        return [
            p
            for k, v in value.items()
            for p in schema_problems(v, m[1], types, f"{where}.{k}", seen)
        ]
    if t.startswith('"'):
        return [] if value == json.loads(t) else [f"{where}: {value!r} is not {t}"]
    plain = {"number": (int, float), "string": str, "boolean": bool}
    if t in plain:
        ok = isinstance(value, plain[t]) and (t == "boolean" or not isinstance(value, bool))
        return [] if ok else [f"{where}: {value!r} is not a {t}"]
    if t not in types:
        return [f"{where}: schema.js uses the type {t}, which it does not define"]
    seen.add(t)
    if not isinstance(value, dict):
        return [f"{where}: {value!r} is not a {t} record"]
    fields = types[t]
    required = {f for f, (_, optional) in fields.items() if not optional}
    problems = (
        [
            f"{where}: {t} has fields {sorted(set(value) - set(fields))} that schema.js "
            f"does not document"
        ]
        if set(value) - set(fields)
        else []
    )
    problems += [f"{where}: {t} lacks {f}" for f in sorted(required - set(value))]
    return problems + [
        p
        for f, v in value.items()
        if f in fields
        for p in schema_problems(v, fields[f][0], types, f"{where}.{f}", seen)
    ]


def fake_head_rows(result: TraceResult) -> list[dict]:
    """What the tracer may one day record as ``result.head_rows`` (optional): for each traced
    (layer, head, query), a row over every key up to the query, here made up so that the beams'
    own edges keep their weights and the rest of the row shares what is left."""
    rows = {}
    for beam in result.beams:
        for i, w in enumerate(beam.edge_weights):
            q, k = beam.positions[i], beam.positions[i + 1]
            rows.setdefault((beam.layers[i], beam.heads[i], q), {})[k] = w
    made = []
    for (layer, head, q), known in rows.items():
        rest = [k for k in range(q + 1) if k not in known]
        left = max(0.0, 1 - sum(known.values()))
        weights = {**{k: left / len(rest) for k in rest}, **known} if rest else known
        keys = sorted(weights)
        made.append(
            {
                "layer": layer,
                "head": head,
                "query": q,
                "keys": keys,
                "weights": [weights[k] for k in keys],
            }
        )
    return made


@pytest.fixture(scope="module")
def induction_payloads():
    """A per-head two-layer trace of the embedded model (strip from its attention, the model's
    predictions), plain, and explained against a foil (its lens and head writes) with a causal
    check (on the logit difference) and (made-up) whole head rows: together with ``small`` they
    hold every record of the schema."""
    from rat_lens.models import load

    model = load("induction-2l")
    text = "cat dog red blue cat dog red"
    result = rat_lens.trace(model, text, layers=(0, 1), agg_heads="none", predictions=3)
    plain = payload(result)
    result = rat_lens.trace(
        model, text, layers=(0, 1), agg_heads="none", predictions=3, foil_token=" cat"
    )
    result.verification = rat_lens.verify(model, result, n_random=3)
    result.head_rows = fake_head_rows(result)
    return plain, payload(result)


def run_census(out: Path) -> tuple:
    """A census of the embedded model into ``out``, with role scores and a causal check of every
    prompt: (the Census, its traces, ``out``)."""
    from rat_lens.models import load

    texts = [
        "cat dog red blue cat dog red",
        "sun moon sky tree sun moon",
        "owl fox bee owl fox",
        "red green blue red green",
        "cow pig hen ant cow pig hen",
    ]
    check = {"n_random": 3, "token_importance": False, "percents": []}
    # TransformerLens 3.x's bridge ignores pattern edits (verify refuses it): its
    # HookedTransformer there.
    old = int(importlib.metadata.version("transformer-lens").split(".")[0]) < 4
    found = rat_lens.census(
        load("induction-2l", source="hooked" if old else "bridge"),
        texts,
        out,
        layers=(0, 1),
        agg_heads="none",
        top_beam=3,
        roles=True,
        verify=check,
        progress=False,
    )
    return found, found.traces(), out


@pytest.fixture(scope="module")
def census_run(tmp_path_factory):
    return run_census(tmp_path_factory.mktemp("census"))


def census_data(page: str) -> dict:
    """The data inlined in a census page."""
    (text,) = re.findall(
        r'<script type="application/json" id="ratlens-census-data-\w+">(.*?)</script>', page, re.S
    )
    return json.loads(text)


def test_schema_js_documents_every_record_and_field(induction_payloads, small, census_run):
    types = typedefs()
    assert {
        "Payload",
        "Meta",
        "Beam",
        "Node",
        "Link",
        "Strip",
        "StripRow",
        "Verification",
        "BeamEffect",
        "Prediction",
        "HeadRow",
        "StayWrite",
        "BlockWrite",
    } <= set(types)
    assert types["Payload"]["verification"] == ("Verification", True)  # only when checked
    assert types["Payload"]["head_rows"] == ("HeadRow[]", True)  # only when the tracer has them
    assert types["Link"]["head"] == ("?number", False)
    assert types["StripRow"].keys() == {"query", "key", "weight", "layer", "head"}
    seen = set()
    payloads = [*induction_payloads, payload(small)]
    for i, data in enumerate(payloads):
        assert schema_problems(data, "Payload", types, f"payload{i}", seen) == []
    found, results, _ = census_run
    unchecked = dataclasses.replace(results[0], verification=None)
    plain = _census.census_payload(rat_lens.corpus.Census(1, "", {}, found.heads), [unchecked])
    for i, data in enumerate([_census.census_payload(found, results), plain]):
        assert schema_problems(data, "CensusPayload", types, f"census{i}", seen) == []
    assert "roles" not in plain and "verification" not in plain["prompts"][0]
    assert seen == set(types), "a record schema.js documents never appeared"
    assert "verification" in payloads[1] and "verification" not in payloads[0]
    assert "head_rows" in payloads[0] and "head_rows" not in payloads[2]  # a bare tensor trace
    assert payloads[0]["predictions"] and payloads[2]["predictions"] == []
    assert (
        payloads[0]["strip"]["source"] == "attention" and payloads[2]["strip"]["source"] == "edges"
    )


def test_the_schema_check_catches_an_undocumented_or_missing_field(small):
    types, data = typedefs(), payload(small)
    data["strip"]["rows"][0]["extra"] = 1
    del data["meta"]["mode"]
    data["beams"][0]["heads"][0] = "H0"
    assert schema_problems(data, "Payload", types, "p", set()) == [
        "p.meta: Meta lacks mode",
        "p.beams[0].heads[0]: 'H0' is not a number",
        "p.strip.rows[0]: StripRow has fields ['extra'] that schema.js does not document",
    ]


# --- The JavaScript: one function, concatenated -------------------------------------------------


def js_code(text: str) -> str:
    """JavaScript without its comments and with its string literals emptied."""
    return re.sub(
        r'"(?:[^"\\\n]|\\.)*"|\'(?:[^\'\\\n]|\\.)*\'|//[^\n]*|/\*.*?\*/',
        lambda m: '""' if m[0][0] in "\"'" else " ",
        text,
        flags=re.S,
    )


def contract(text: str) -> tuple[set[str], dict[str, set[str]]]:
    """A file's header lines ``// Defines: a, b.`` and ``// Uses: util.js: c, d; diagram.js: e.``
    (either continued on lines indented ``//   ``): the names defined, and file → names used."""
    found, key = {}, None
    for line in itertools.takewhile(lambda line: line.startswith("//"), text.splitlines()):
        if m := re.match(r"// (Defines|Uses):(.*)", line):
            key, found[m[1]] = m[1], m[2]
        elif key and line.startswith("//   "):
            found[key] += line[2:]
        else:
            key = None
    defines = found["Defines"]
    return (
        set() if defines.strip().startswith("nothing") else set(re.findall(r"\w+", defines)),
        {
            f: set(re.findall(r"\w+", names))
            for f, names in re.findall(r"(\w+\.js):([^;]*)", found["Uses"])
        },
    )


def test_every_js_file_is_on_a_page():
    pages = set(_html.SCRIPTS) | set(_census.CENSUS_SCRIPTS)
    assert {f"js/{p.name}" for p in (RENDER / "js").glob("*.js")} == pages


@pytest.mark.parametrize(
    "scripts", [_html.SCRIPTS, _census.CENSUS_SCRIPTS], ids=["trace", "census"]
)
def test_each_js_file_says_what_it_defines_and_uses_from_the_files_before_it(scripts):
    assert scripts[0] == "js/schema.js"
    earlier: dict[str, set[str]] = {}  # file → its top-level names
    for path in scripts:
        name, text = path.removeprefix("js/"), (RENDER / path).read_text()
        code = js_code(text)
        assert not re.search(r"\bvar\b", code), f"{name}: var (use const or let)"
        top = set(re.findall(r"^(?:function|const|let)\s+(\w+)", code, re.M))
        defines, uses = contract(text)
        assert top == defines, f"{name}: defines {sorted(top)}, its header says {sorted(defines)}"
        owner = {n: f for f, names in earlier.items() for n in names}
        assert not top & set(owner), f"{name} redefines {sorted(top & set(owner))}"
        used = {}
        for n in re.findall(r"(?<![\w.$])([A-Za-z_$][\w$]*)\b(?!:)", code):
            if n in owner:
                used.setdefault(owner[n], set()).add(n)
        assert used == uses, f"{name}: uses {used}, its header says {uses}"
        earlier[name] = top
    assert js_code((RENDER / "js" / "schema.js").read_text()).strip() == ""  # types only


def test_the_page_of_a_small_trace_matches_its_snapshot(small, monkeypatch):
    """The whole page of the ``small`` trace, text for text, against
    ``tests/snapshots/small_trace.html``: any change to the markup, the style, the scripts or the
    data shows up in review as a diff of that file.

    Widget ids are numbered instead of random (``_new_id`` patched), and the vendored D3 and
    d3-sankey are replaced by a one-line placeholder (their files are checked byte for byte by
    ``test_vendored_d3_is_the_unmodified_npm_dist``). After a deliberate change to the page,
    regenerate the snapshot and read its diff before committing it::

        RAT_LENS_UPDATE_SNAPSHOTS=1 python -m pytest tests/test_render.py -k snapshot
    """
    ids = itertools.count(1)
    monkeypatch.setattr(_html, "_new_id", lambda: f"{next(ids):012x}")
    page = to_html(small)
    vendor = "\n;\n".join(_html._asset(name) for name in _html.VENDOR)
    assert page.count(vendor) == 1
    page = page.replace(vendor, f"/* {' + '.join(_html.VENDOR)}: left out of the snapshot */")
    snapshot = SNAPSHOTS / "small_trace.html"
    if os.environ.get("RAT_LENS_UPDATE_SNAPSHOTS"):
        snapshot.parent.mkdir(exist_ok=True)
        snapshot.write_text(page, encoding="utf-8")
    if not snapshot.exists():
        pytest.fail(f"no snapshot {snapshot}: RAT_LENS_UPDATE_SNAPSHOTS=1 writes it")
    expected = snapshot.read_text(encoding="utf-8")
    diff = list(
        itertools.islice(
            difflib.unified_diff(
                expected.splitlines(),
                page.splitlines(),
                str(snapshot),
                "to_html(small)",
                lineterm="",
            ),
            80,
        )
    )
    assert page == expected, (
        "the page differs from its snapshot (RAT_LENS_UPDATE_SNAPSHOTS=1 "
        "rewrites it):\n" + "\n".join(diff)
    )


# --- The census page (rat_lens/render/_census.py) -----------------------------------------------


def test_the_census_payload_is_the_census_and_its_traces(census_run):
    found, results, _ = census_run
    data = _census.census_payload(found, results)
    assert data["meta"]["n_prompts"] == data["meta"]["listed"] == len(results) == 5
    assert data["meta"]["layers"] == [1, 0]
    assert data["meta"]["heads"] == list(range(max(h.head for h in found.heads) + 1))
    assert [(h["layer"], h["head"], h["top_beam_prompts"], h["edges"]) for h in data["heads"]] == [
        (h.layer, h.head, h.top_beam_prompts, h.edges) for h in found.heads
    ]
    for shown, h in zip(data["heads"], found.heads):
        assert shown["traced_mass"] == pytest.approx(h.traced_mass, rel=1e-5)
        assert shown["mass_share"] == pytest.approx(h.mass_share, rel=1e-5)
    for shown, result in zip(data["prompts"], results):
        pos, best = result.target_pos, result.beams[0]
        tokens = shown["before"] + [shown["target"]] + shown["after"]
        assert tokens == result.tokens[shown["start"] :] and shown["start"] == 0
        assert shown["before"] == result.tokens[:pos] and shown["target_pos"] == pos
        assert (shown["layers"], shown["heads"]) == (best.layers, best.heads)
        assert shown["path"] == result.paths_text[0]
        effect = result.verification.beams[0].effect.effect
        assert shown["verification"]["beams"][0]["effect"] == pytest.approx(effect, rel=1e-5)
    assert data["roles"]["layers"] == found.roles.layers == [0, 1]
    for name, rows in found.roles.scores.items():
        assert torch.tensor(data["roles"]["scores"][name]) == pytest.approx(
            torch.tensor(rows), rel=1e-5, abs=1e-12
        )


def test_the_census_writes_its_page_with_the_table_of_every_head(census_run, tmp_path):
    found, results, out = census_run
    page = (out / "census.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count("<script") == 2  # data, code
    assert not re.search(r"<script[^>]*\bsrc=|<link\b|<iframe\b|<img\b", page)
    assert census_data(page) == _census.census_payload(found, results)
    # D3 and d3-sankey: a prompt's expander draws its trace with the trace page's code.
    assert all(_html._asset(name) in page for name in _html.VENDOR)
    rows = re.findall(
        r'<tr data-layer="(\d+)" data-head="(\d*)"><th scope="row">([^<]*)</th>'
        r"<td>([^<]*)</td><td>[^<]*</td><td>([^<]*)</td>",
        page,
    )
    assert rows == [
        (str(h.layer), str(h.head), f"L{h.layer}.H{h.head}", str(h.top_beam_prompts), str(h.edges))
        for h in found.heads
    ]
    # Drawn again from the census alone: its traces are read back from its folder.
    again = _census.render_census(found, tmp_path / "again")
    assert census_data(Path(again).read_text()) == census_data(page)
    assert census_data(found._repr_html_()) == census_data(page)


def test_a_census_page_keeps_hostile_prompts_in_its_data_and_lists_at_most_max_prompts():
    from rat_lens.corpus import Census, aggregate

    results = [
        make_result(causal(len(HOSTILE) + 1, seed=seed), ["<bos>", *HOSTILE], agg_heads="mean")
        for seed in range(3)
    ]
    found = Census(3, "traces.jsonl", {"layer": -1, "agg_heads": "mean"}, aggregate(results))
    page = _census.census_html(found, results, max_prompts=2)
    assert page.count("<script") == page.count("</script>") == 2
    assert "<!--" not in page and "\u2028" not in page and "\u2029" not in page
    data = census_data(page)
    assert data["meta"]["listed"] == len(data["prompts"]) == 2 and data["meta"]["heads"] == [None]
    shown = data["prompts"][0]
    assert shown["before"] + [shown["target"]] == ["<bos>", *HOSTILE]


def test_census_page_errors_name_the_problem(census_run, no_typecheck):
    found, results, _ = census_run
    with pytest.raises(RatLensError, match="results must be the census's TraceResults"):
        _census.census_html(found, ["not a trace"])
    with pytest.raises(RatLensError, match="max_prompts must be >= 0, got -1"):
        _census.census_html(found, results, max_prompts=-1)
