"""The rendered page in a real browser: Debian's chromium driven by Playwright, the page opened
from file:// with every other request aborted, checked against the data it embeds.

Each test leaves a screenshot in $RAT_LENS_SCREENSHOTS (default: <pytest basetemp>/screenshots).
Without chromium or playwright these tests skip, except under CI=true, where they fail.
"""

import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from test_render import HOSTILE, causal, embedded, make_result

from rat_lens import SankeyData, TraceResult
from rat_lens.render import html_fragment, to_html
from rat_lens.render._payload import payload
from rat_lens.result import node_id

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
        """data-id / data-source>data-target → class list, for every element matching."""
        return self.page.eval_on_selector_all(
            selector,
            """els => Object.fromEntries(els.map(e =>
            [e.dataset.id || e.dataset.source + '>' + e.dataset.target,
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
    return f"{link['source']}>{link['target']}"


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
    opened = open_page(to_html(result))
    nodes, links = opened.classes(".ratlens-node"), opened.classes(".ratlens-link")
    assert set(nodes) == {n.id for n in result.sankey.nodes}
    assert set(links) == {f"{lk.source}>{lk.target}" for lk in result.sankey.links}
    assert len(nodes) == len(result.sankey.nodes) and len(links) == len(result.sankey.links)
    target = node_id(result.layer, result.target_pos)
    assert {k for k, c in nodes.items() if "is-target" in c} == ({target} & set(nodes))
    beams = opened.each(".ratlens-link", "e => e.dataset.beams")
    assert sorted(beams) == sorted(
        ",".join(map(str, lk.beam_indices)) for lk in result.sankey.links
    )
    opened.assert_clean()


def test_the_induction_model_trace_renders(open_page):
    from rat_lens import trace
    from rat_lens.models import load

    result = trace(
        load("induction-2l"), "cat dog red blue green cat dog red", layers=(0, 1), agg_heads="none"
    )
    opened = open_page(to_html(result))
    assert opened.page.locator(".ratlens-node").count() == len(result.sankey.nodes)
    assert opened.page.locator(".ratlens-link").count() == len(result.sankey.links)
    # Its strip comes from the captured attention, averaged over the traced layers and heads.
    opened.page.locator(f'.ratlens-tok[data-pos="{result.target_pos}"]').hover()
    readout = opened.page.locator(".ratlens-readout").text_content()
    assert " attends to: " in readout and "(traced layers)" in readout
    opened.assert_clean()


def test_clicking_a_node_highlights_exactly_the_links_of_its_beams(open_page):
    result = layers_result()
    data = payload(result)
    opened = open_page(to_html(result))
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
    opened.page.locator(".ratlens-diagram svg").click(position={"x": 3, "y": 3})  # background
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
    assert f"{beam.edge_attns[1]:.3f}" in text and f"{beam.score_norm:.3f}" in text
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
    # The readout names each edge's layer and head (L<layer> H<head>), strongest first.
    best = max((r for r in rows if r["key"] == key), key=lambda r: r["weight"])
    assert readout.split(": ", 1)[1].startswith(
        f"\u201c\u2068{visible(result.tokens[best['query']])}\u2069\u201d@{best['query']} "
        f"{best['weight']:.2f} (L{best['layer']} H{best['head']})"
    )
    opened.assert_clean()


def test_export_gives_an_svg_of_the_diagram_and_a_png(open_page, tmp_path):
    result = layers_result()
    opened = open_page(to_html(result))
    with opened.page.expect_download() as download:
        opened.page.locator(".ratlens-export-svg").click()
    svg = tmp_path / download.value.suggested_filename
    download.value.save_as(svg)
    assert svg.name == f"rat_lens_trace_L{result.layer}_P{result.target_pos}.svg"
    root = ET.fromstring(svg.read_text())
    paths = root.findall(".//{http://www.w3.org/2000/svg}path")
    assert len(paths) == len(result.sankey.links) and float(root.get("width")) > 100
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
    page = opened.page
    viewport = page.locator(".ratlens-viewport")
    before = viewport.get_attribute("transform")
    box = page.locator(".ratlens-diagram svg").bounding_box()
    page.mouse.move(box["x"] + 40, box["y"] + 40)
    page.mouse.wheel(0, -400)
    page.wait_for_function(
        "t => document.querySelector('.ratlens-viewport').getAttribute('transform') !== t",
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
