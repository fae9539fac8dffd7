"""report.html in a real headless browser (Debian's chromium, driven by Playwright): it opens
with no network and no script, every plot decodes, it is not blank, its results table holds
summary.json's numbers, and printing it cuts no plot across pages."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import shutil

import pytest
from conftest import run_cli, strict_json
from PIL import Image
from support.runs import STUDY, make_run

CHROMIUM = os.environ.get("LENETLAB_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def html_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("html") / "run"
    summary = make_run(run_dir, STUDY)
    return run_dir, summary, (run_dir / "report.html").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no chromium here (apt-get install chromium; .ci/run installs it)")
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)")
    with playwright.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


def _data_images(page_html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', page_html)]


def test_one_self_contained_page_beside_report_md(html_run):
    run_dir, _, page = html_run
    assert page.startswith("<!DOCTYPE html>")
    assert "<script" not in page.lower()
    assert not re.search(r'(src|href)="(?!data:|#)', page)  # nothing outside the page itself
    plots = sorted((run_dir / "plots").glob("*.png"))
    images = _data_images(page)
    assert len(images) == len(plots) > 0
    assert sorted(images) == sorted(p.read_bytes() for p in plots)  # the files themselves, embedded


def test_report_command_writes_it_again(html_run, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(html_run[0], run_dir)
    (run_dir / "report.html").unlink()
    assert run_cli("report", run_dir).returncode == 0
    assert (run_dir / "report.html").read_text(encoding="utf-8") == html_run[2]


def test_in_a_browser_no_request_every_image_decodes_not_blank(browser, html_run, tmp_path):
    run_dir, summary, _ = html_run
    context = browser.new_context(java_script_enabled=False, viewport={"width": 1200, "height": 900})
    page = context.new_page()
    requests = []
    page.on("request", lambda request: requests.append(request.url))
    page.goto((run_dir / "report.html").as_uri())
    # anything but the page itself and its data: images would be a network or file request
    assert [u for u in requests if not u.startswith("data:")] == [(run_dir / "report.html").as_uri()]
    # the browser decoded each image (naturalWidth 0 means it did not)
    sizes = page.evaluate("[...document.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
    assert sizes and all(done and w >= 400 and h >= 300 for done, w, h in sizes), sizes
    shot = Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("L")
    histogram = shot.histogram()
    assert max(histogram) < 0.98 * sum(histogram), "the screenshot is one colour"
    assert shot.height > 2000  # the whole report, plots included, not a stub
    # the page does not scroll sideways; the recipe table, a column per field, scrolls in its box
    page_width = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert page_width[0] <= page_width[1], page_width
    widest = page.evaluate("Math.max(...[...document.querySelectorAll('table')].map(t => t.scrollWidth))")
    assert widest > page_width[1]  # the case this is about: a table wider than the page
    # the run configuration is a block of JSON, as report.md has it, not a line of inline code
    shown = page.evaluate("[...document.querySelectorAll('pre > code')].map(c => c.innerText)")
    assert [json.loads(block) for block in shown] == [strict_json(run_dir / "summary.json")["config"]]
    # the results table as the browser shows it: summary.json's numbers after the report's rounding
    rows = page.evaluate("[...document.querySelector('table').rows]"
                         ".map(r => [...r.cells].map(c => c.innerText))")
    header, body = rows[0], {r[0]: r for r in rows[1:]}
    for config in strict_json(run_dir / "summary.json")["configs"]:
        cells = body[config["name"]]
        for split, title in (("train", "Train"), ("val", "Validation"), ("test", "Test")):
            stats = config["final"][split]
            shown = cells[header.index(title)]
            assert shown.startswith(f"{stats['mean']:.4f}"), (config["name"], split, shown)
            if stats["n"] > 1:
                low, high = stats["ci95"]
                assert shown == f"{stats['mean']:.4f} ± {(high - low) / 2:.4f}"
    context.close()


MM = 96 / 25.4  # CSS pixels per millimetre
A4, MARGIN = (210, 297), 10  # mm


def test_printing_cuts_no_plot_across_pages(browser, html_run, tmp_path):
    """Printed on A4: every plot fits inside one page (chromium moves an image that does not fit
    the rest of a page to the next one, but clips one taller than a page), and each lands on
    exactly one page of the PDF."""
    pypdf = pytest.importorskip("pypdf", reason="pip install pypdf (the test extra)")
    run_dir, _, page_html = html_run
    width, height = ((side - 2 * MARGIN) * MM for side in A4)
    context = browser.new_context(java_script_enabled=False, viewport={"width": int(width), "height": 800})
    page = context.new_page()
    page.goto((run_dir / "report.html").as_uri())
    page.emulate_media(media="print")
    boxes = page.evaluate("[...document.images].map(i => [i.getBoundingClientRect().width, "
                          "i.getBoundingClientRect().height])")
    assert boxes and all(0 < w <= width + 1 and 0 < h <= height for w, h in boxes), (boxes, width, height)
    pdf = tmp_path / "report.pdf"
    margins = {side: f"{MARGIN}mm" for side in ("top", "right", "bottom", "left")}
    page.pdf(path=str(pdf), format="A4", margin=margins)
    context.close()
    reader = pypdf.PdfReader(pdf)
    pages_of: dict[tuple, list[int]] = {}
    for number, pdf_page in enumerate(reader.pages):
        for image in pdf_page.images:
            key = (image.image.size, hashlib.sha256(image.image.tobytes()).hexdigest())
            pages_of.setdefault(key, []).append(number)
    assert len(reader.pages) >= 2
    assert len(pages_of) == len(_data_images(page_html))
    assert all(len(pages) == 1 for pages in pages_of.values()), list(pages_of.values())


def test_in_a_browser_with_scripts_on_a_hostile_name_is_only_text(browser, tmp_path):
    """Names that would be live markup if passed through (an event handler, an image that errors,
    a javascript: link), in a browser that runs scripts: nothing fires, no such element exists,
    and the heading reads as the name was written."""
    from lenetlab.recipes import RECIPES

    run_name = "<b onmouseover=alert(1)>x"
    names = ["<img src=x onerror=alert(2)>", "[go](javascript:alert(3))", "<svg onload=alert(4)>"]
    make_run(tmp_path / "run", [{"name": n, "base": 0.85, "recipe": RECIPES["baseline"]} for n in names],
             kind="sweep", reference=None, seeds=(0,), name=run_name)
    context = browser.new_context(java_script_enabled=True, viewport={"width": 1200, "height": 900})
    page = context.new_page()
    dialogs = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.goto((tmp_path / "run" / "report.html").as_uri())
    for y in range(0, 3000, 50):  # hover over the whole page: an onmouseover would fire
        page.mouse.move(300, y % 900)
        page.mouse.wheel(0, 50)
    assert dialogs == []
    made = page.evaluate("""() => [...document.querySelectorAll('*')].filter(e =>
        ['B', 'A', 'SVG', 'SCRIPT'].includes(e.tagName.toUpperCase()) ||
        [...e.attributes].some(a => a.name.startsWith('on'))).map(e => e.outerHTML.slice(0, 80))""")
    assert made == []
    assert page.inner_text("h1") == f"{run_name}: lenetlab sweep report"
    cells = page.eval_on_selector_all("table tr td:first-child", "cells => cells.map(c => c.textContent)")
    assert set(names) <= set(cells)
    context.close()
