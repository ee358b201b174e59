"""Drives a dnd HTML report in headless Chromium (Debian's /usr/bin/chromium through
Playwright; no browser is downloaded), as a user would, and checks it.

Usage: python3 tests/report_browser.py REPORT_DIR SCREENSHOT_DIR EXPECTED_JSON
  EXPECTED_JSON: {"neurons": ["layer4:0", ...], "page": "layer4-0.html"}
Checks: the index lists every neuron (over all its pages); typing a label word into the
filter narrows the table to the rows whose labels contain it; the layer and score filters
and sorting work; a neuron link opens with the keyboard; the given neuron page shows its
top images (with crop boxes), crops, candidates and their generated images, every image
loads and links to a full-size file in the report; no request leaves the local files.
Writes SCREENSHOT_DIR/index.png and SCREENSHOT_DIR/neuron.png.
Exit codes: 0 ok, 1 a check failed, 3 Playwright or Chromium is missing.
"""

import json
import os
import re
import sys
from pathlib import Path

CHROMIUM = os.environ.get("DND_CHROMIUM", "/usr/bin/chromium")

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # the Rust test decides whether this is fatal (it is under CI)
    print("missing Python package: playwright; pip install -r tests/requirements-browser.txt", file=sys.stderr)
    sys.exit(3)
if not os.path.exists(CHROMIUM):
    print(f"{CHROMIUM} is missing; apt-get install chromium", file=sys.stderr)
    sys.exit(3)


def shown_count(page) -> int:
    text = page.locator("#count").inner_text()
    return int(re.match(r"(\d+)", text).group(1))


def all_listed(page) -> list:
    """Every (layer, neuron) the table shows, page by page."""
    seen = []
    while True:
        for row in page.locator("#neurons tbody tr").all():
            cells = row.locator("td").all_inner_texts()
            seen.append(f"{cells[0]}:{cells[1]}")
        nxt = page.locator("#next")
        if nxt.is_disabled():
            return seen
        nxt.click()


def main(report: Path, shots: Path, expected: dict) -> None:
    shots.mkdir(parents=True, exist_ok=True)
    index_url = (report / "index.html").resolve().as_uri()
    requests = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        context = browser.new_context(viewport={"width": 1366, "height": 900})

        def guard(route):
            # Anything but a local file is recorded and refused.
            requests.append(route.request.url)
            if route.request.url.startswith("file://"):
                route.continue_()
            else:
                route.abort()

        context.route("**/*", guard)
        context.on("request", lambda r: requests.append(r.url))
        page = context.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)

        # The index lists every neuron.
        page.goto(index_url)
        page.wait_for_selector("#neurons tbody tr")
        total = len(expected["neurons"])
        assert shown_count(page) == total, (page.locator("#count").inner_text(), total)
        listed = all_listed(page)
        assert sorted(listed) == sorted(expected["neurons"]), (listed, expected["neurons"])
        page.goto(index_url)
        page.wait_for_selector("#neurons tbody tr")
        page.screenshot(path=str(shots / "index.png"), full_page=True)

        # Typing a label word narrows the table to the rows whose labels contain it.
        rows = page.evaluate("window.DND_REPORT.rows")
        texts = [((r[2] or "") + " | " + (r[6] or "")).lower() for r in rows]
        words = sorted({w for t in texts for w in re.findall(r"[a-z]{3,}", t)})
        narrowing = [w for w in words if 0 < sum(w in t for t in texts) < len(texts)]
        word = narrowing[0] if narrowing else (words[0] if words else "zzzz")
        want = sum(word in t for t in texts)
        box = page.locator("#f-text")
        box.focus()
        box.press_sequentially(word, delay=20)
        page.wait_for_function(f"document.getElementById('count').textContent.startsWith('{want} ')")
        for row in page.locator("#neurons tbody tr").all():
            cells = [c.lower() for c in row.locator("td").all_inner_texts()]
            assert word in cells[2] or word in cells[-1], (word, cells)
        if narrowing:
            assert want < total, (word, want, total)
        box.fill("no label has this word qqq")
        page.wait_for_function("document.getElementById('count').textContent.startsWith('0 ')")
        box.fill("")

        # The layer filter, the score filter and sorting.
        layers = sorted({n.split(":")[0] for n in expected["neurons"]})
        layer = layers[0]
        page.select_option("#f-layer", layer)
        want = sum(1 for n in expected["neurons"] if n.split(":")[0] == layer)
        assert shown_count(page) == want, (page.locator("#count").inner_text(), want)
        page.select_option("#f-layer", "")
        scores = sorted(r[3] for r in rows if r[3] is not None)
        if scores:
            median = scores[len(scores) // 2]
            page.fill("#f-min", str(median))
            want = sum(1 for r in rows if r[3] is not None and r[3] >= median)
            assert shown_count(page) == want, (page.locator("#count").inner_text(), want)
            page.fill("#f-min", "")
            page.click("th button[data-sort=score]")
            first = page.locator("#neurons tbody tr").first.locator("td").nth(3).inner_text()
            assert abs(float(first) - scores[-1]) < 1e-3, (first, scores[-1])
            assert page.locator("th[data-key=score]").get_attribute("aria-sort") == "descending"

        # A neuron link opens with the keyboard.
        link = page.locator("#neurons tbody tr a").first
        link.focus()
        with page.expect_navigation():
            page.keyboard.press("Enter")
        assert "/neurons/" in page.url, page.url

        # The neuron page: top images with crop boxes, crops, candidates, generated images.
        page.goto((report / "neurons" / expected["page"]).resolve().as_uri())
        page.evaluate("document.querySelectorAll('img').forEach(i => i.loading = 'eager')")
        page.wait_for_function("Array.from(document.images).every(i => i.complete)")
        counts = page.evaluate(
            """() => ({
                top: document.querySelectorAll('#top-images figure img').length,
                boxes: document.querySelectorAll('#top-images .box').length,
                crops: document.querySelectorAll('#crops figure img').length,
                captions: document.querySelectorAll('#captions tbody tr').length,
                candidates: document.querySelectorAll('#candidates section.candidate').length,
                generated: document.querySelectorAll('#candidates section.candidate figure img').length,
                broken: Array.from(document.images).filter(i => !(i.naturalWidth > 0)).map(i => i.src),
                labels: document.querySelectorAll('#labels ol.labels li').length,
            })"""
        )
        for key in ["top", "boxes", "crops", "captions", "candidates", "generated", "labels"]:
            assert counts[key] > 0, (key, counts)
        assert not counts["broken"], counts["broken"]
        for href in page.eval_on_selector_all("a.frame", "as => as.map(a => a.href)"):
            assert href.startswith("file://"), href
            path = Path(href[len("file://"):])
            assert path.is_file() and report.resolve() in path.parents, href
        page.screenshot(path=str(shots / "neuron.png"), full_page=True)
        # The full-size image opens from its thumbnail.
        with page.expect_navigation():
            page.locator("#top-images a.frame").first.click()
        assert "/images/" in page.url, page.url
        browser.close()

    outside = [u for u in requests if not u.startswith("file://")]
    assert not outside, f"requests left the local files: {outside}"
    assert not errors, f"the pages logged errors: {errors}"
    print(json.dumps({"neurons": total, "filter_word": word, "neuron_page": counts, "requests": len(requests)}))


if __name__ == "__main__":
    if len(sys.argv) != 4:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    try:
        main(Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3]))
    except AssertionError as e:
        print(f"check failed: {e}", file=sys.stderr)
        raise
