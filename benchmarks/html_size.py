"""Size of the rendered HTML page for large traces (the issue's bound: under 2 MB).

The headline case: a 30-layer per-head trace (``agg_heads="none"``) of a 2,000-token prompt,
from a random causal attention stack ``[30, heads, 2000, 2000]`` (4 heads by default, to keep
~2 GB of memory; the page holds only traced edges, so the head count barely changes its size).
Also a 2,000-token chain-mode trace on a previous-token matrix, where every beam runs ~2,000
hops: the most nodes a trace of that length can have.

Then the page in a browser (issue 14: per-head links, the heads grid, the head heatmap, the key):
the same chain, and a 12-layer x 12-head per-head trace of the same prompt, each loaded from
``file://`` in Debian's Chromium (headless, through Playwright; skipped without it): the page's
size, how many links it draws (one per head in per-head mode), its first contentful paint, when
the widget is drawn (``data-ratlens-ready``) and the frame after, medians of 5 fresh loads.

With ``--census 100,1000``: the census page (``census.html``) of the embedded model for that many
prompts (a few random words, then the first of them again), with each prompt's trace embedded for
its expander and without (``PAGE_TRACE_CHARS`` = 0), and its load in Chromium.

Usage: python benchmarks/html_size.py [--tokens 2000] [--layers 30] [--heads 4] [--no-browser]
       [--census 100,1000]
"""

import argparse
import dataclasses
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from beam_search import previous_token_matrix  # same matrix as the search benchmark

import rat_lens
from rat_lens.render import to_html
from rat_lens.render._payload import inline_json, payload
from rat_lens.result import BeamPath, TraceResult, build_sankey, path_text

WORDS = [
    " the",
    " cat",
    " sat",
    " on",
    " mat",
    ",",
    ".",
    "\n",
    " attention",
    " sink",
    " über",
    " 東京",
    " 🙂",
    "\t",
    " supercalifragilisticexpialidocious",
]


def causal_stack(layers: int, heads: int, n: int, seed: int = 0) -> torch.Tensor:
    """Random causal attention, one layer at a time (peak memory: the stack plus one layer)."""
    gen = torch.Generator().manual_seed(seed)
    future = ~torch.ones(n, n, dtype=torch.bool).tril()
    stack = torch.empty(layers, heads, n, n)
    for layer in range(layers):
        logits = torch.randn(heads, n, n, generator=gen) * 3
        stack[layer] = logits.masked_fill_(future, float("-inf")).softmax(-1)
    return stack


def as_result(beams, tokens, layer_ids, *, chain, agg_heads, top_beam, top_k) -> TraceResult:
    """A TraceResult built from tensor-search beams the way rat_lens.tracer builds one."""
    ids = list(range(len(tokens)))
    mode = "chain" if chain else "layers"
    paths = [BeamPath.from_beam(beam, tokens, ids) for beam in beams]
    return TraceResult(
        seq_len=len(tokens),
        target_pos=len(tokens) - 1,
        layer=layer_ids[0],
        top_beam=top_beam,
        top_k=top_k,
        tokens=tokens,
        beams=paths,
        sankey=build_sankey(paths, tokens, mode, layer_ids[0]),
        paths_text=[path_text(p) for p in paths],
        mode=mode,
        layer_lo=layer_ids[-1],
        agg_heads=agg_heads,
        token_ids=ids,
    )


def measure(name: str, result: TraceResult) -> None:
    page = to_html(result).encode()
    data = inline_json(payload(result)).encode()
    print(
        f"| {name} | {len(result.beams)} | {len(result.sankey.nodes)} | "
        f"{len(result.sankey.links)} | {len(data) / 1e3:,.1f} kB | {len(page) / 1e6:.3f} MB | "
        f"{'yes' if len(page) < 2e6 else 'NO'} |"
    )


CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
# In ms since the navigation started: __ratlensReady when the page marks its widget drawn (the
# end of mount()), __ratlensPainted when the frame after that has been painted (a timeout queued
# from the next animation frame runs after its paint).
READY = """
window.__ratlensReady = null;
window.__ratlensPainted = null;
new MutationObserver(function (changes, observer) {
  if (document.querySelector("[data-ratlens-ready]")) {
    window.__ratlensReady = performance.now();
    observer.disconnect();
    requestAnimationFrame(function () {
      setTimeout(function () { window.__ratlensPainted = performance.now(); }, 0);
    });
  }
}).observe(document, {subtree: true, attributes: true, attributeFilter: ["data-ratlens-ready"]});
"""


def paint_times(page_html: str, runs: int = 5) -> tuple[float, float, float]:
    """Median first contentful paint, widget-drawn and diagram-painted times (ms) of ``runs``
    fresh loads of the page from file:// at 1280 x 900, every other request aborted."""
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as folder, sync_playwright() as pw:
        path = Path(folder) / "index.html"
        path.write_text(page_html, encoding="utf-8")
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        paints, readies, painted = [], [], []
        for _ in range(runs):
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            context.route(
                "**/*", lambda r: r.continue_() if r.request.url == path.as_uri() else r.abort()
            )
            page = context.new_page()
            page.add_init_script(READY)
            page.goto(path.as_uri())
            page.wait_for_function("window.__ratlensPainted !== null", timeout=120_000)
            page.wait_for_function(
                "performance.getEntriesByName('first-contentful-paint').length > 0"
            )
            paints.append(
                page.evaluate("performance.getEntriesByName('first-contentful-paint')[0].startTime")
            )
            readies.append(page.evaluate("window.__ratlensReady"))
            painted.append(page.evaluate("window.__ratlensPainted"))
            context.close()
        browser.close()
    return statistics.median(paints), statistics.median(readies), statistics.median(painted)


def measure_page(name: str, result: TraceResult, browser: bool) -> None:
    page = to_html(result)
    data = payload(result)
    labels = sum(link["head"] is not None for link in data["links"])
    paint, ready, painted = paint_times(page) if browser else (float("nan"),) * 3
    print(
        f"| {name} | {len(data['nodes'])} | {len(result.sankey.links)} | {len(data['links'])} | "
        f"{labels} | {len(inline_json(data).encode()) / 1e3:,.1f} kB | "
        f"{len(page.encode()) / 1e6:.3f} MB | {paint:,.0f} ms | {ready:,.0f} ms | "
        f"{painted:,.0f} ms |"
    )


def census_sizes(counts: list[int], browser: bool) -> None:
    """The census page of the embedded model for each count of prompts, traces embedded or not."""
    from screenshots import census_prompts

    from rat_lens.models import load
    from rat_lens.render import _census

    print("| census | prompts with a trace | HTML | HTML without traces | drawn |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        found = rat_lens.census(
            load("induction-2l"),
            census_prompts(max(counts)),
            Path(folder),
            layers=(0, 1),
            agg_heads="none",
            progress=False,
        )
        results = found.traces()
        for n in counts:
            part = dataclasses.replace(found, n_prompts=n)
            page = _census.census_html(part, results[:n])
            data = _census.census_payload(part, results[:n])
            budget, _census.PAGE_TRACE_CHARS = _census.PAGE_TRACE_CHARS, 0
            bare = _census.census_html(part, results[:n])
            _census.PAGE_TRACE_CHARS = budget
            _, ready, _ = paint_times(page) if browser else (None, float("nan"), None)
            print(
                f"| embedded model, {n:,} prompts | {data['meta']['with_trace']:,} | "
                f"{len(page.encode()) / 1e6:.2f} MB | {len(bare.encode()) / 1e6:.2f} MB | "
                f"{ready:,.0f} ms |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--no-browser", action="store_true", help="sizes only, no Chromium")
    parser.add_argument("--census", help="census pages of these many prompts, e.g. 100,1000")
    args = parser.parse_args()
    if args.census:
        browser = not args.no_browser and Path(CHROMIUM).exists()
        census_sizes([int(n) for n in args.census.split(",")], browser)
        return
    n = args.tokens
    tokens = ["<bos>"] + random.Random(0).choices(WORDS, k=n - 1)

    start = time.perf_counter()
    stack = causal_stack(args.layers, args.heads, n)
    print(f"random stack {tuple(stack.shape)} built in {time.perf_counter() - start:.1f} s\n")
    print("| trace | beams | nodes | links | inline data | HTML | < 2 MB |")
    print("|---|---|---|---|---|---|---|")
    for top_beam, top_k in [(5, 5), (20, 10)]:
        beams = rat_lens.trace_attention(
            stack,
            n - 1,
            layers=(0, args.layers - 1),
            agg_heads="none",
            top_beam=top_beam,
            top_k=top_k,
            bos_positions=[0],
            exclude_bos=True,
        )
        result = as_result(
            beams,
            tokens,
            list(range(args.layers - 1, -1, -1)),
            chain=False,
            agg_heads="none",
            top_beam=top_beam,
            top_k=top_k,
        )
        measure(
            f"layers {args.layers - 1}→0, {args.heads} heads, per head, {n} tokens, "
            f"top_beam {top_beam}, top_k {top_k}",
            result,
        )
    del stack

    beams = rat_lens.trace_attention(previous_token_matrix(n), n - 1, top_beam=5, top_k=5)
    chain = as_result(beams, tokens, [0], chain=True, agg_heads="mean", top_beam=5, top_k=5)
    measure(f"chain, previous-token matrix, {n} tokens, top_beam 5, top_k 5", chain)

    browser = not args.no_browser and Path(CHROMIUM).exists()
    print(
        "\n### The page in Chromium\n\n"
        + (
            "Headless Chromium (software rendering), 1280 x 900, page from file://; in ms "
            "since the navigation began, medians of 5 fresh loads: first paint = Chromium's "
            "first contentful paint (on a long page, text painted while the page still "
            "parses, before the widget), drawn = the widget's mount() done, diagram painted = "
            "the first frame after it.\n"
            if browser
            else "(no Chromium here: sizes only)\n"
        )
    )
    print(
        "| trace | nodes | Sankey links | links drawn | head labels | inline data | HTML | "
        "first paint | drawn | diagram painted |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    measure_page(f"chain, previous-token matrix, {n} tokens, top_beam 5, top_k 5", chain, browser)
    stack = causal_stack(12, 12, n, seed=1)
    for top_beam, top_k in [(5, 5), (20, 10)]:
        beams = rat_lens.trace_attention(
            stack,
            n - 1,
            layers=(0, 11),
            agg_heads="none",
            top_beam=top_beam,
            top_k=top_k,
            bos_positions=[0],
            exclude_bos=True,
        )
        result = as_result(
            beams,
            tokens,
            list(range(11, -1, -1)),
            chain=False,
            agg_heads="none",
            top_beam=top_beam,
            top_k=top_k,
        )
        measure_page(
            f"layers 11→0, 12 x 12 heads, per head, {n} tokens, top_beam {top_beam}, top_k {top_k}",
            result,
            browser,
        )


if __name__ == "__main__":
    main()
