"""Times how fast a dnd report's index loads in headless Chromium (Debian's
/usr/bin/chromium through Playwright): from navigation start to the first render of the
neuron table (index.js's `dnd-table-rendered` mark) and to the load event. Each load is a
fresh browser context (a cold page cache). `dnd bench report` runs it on a synthetic job.

Usage: python3 bench/report_load.py INDEX_HTML [LOADS] [EXPECTED_NEURONS]
"""

import json
import os
import statistics
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

CHROMIUM = os.environ.get("DND_CHROMIUM", "/usr/bin/chromium")


def main(index: Path, loads: int, expected: int) -> None:
    url = index.resolve().as_uri()
    rendered, loaded = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        for _ in range(loads):
            context = browser.new_context(viewport={"width": 1366, "height": 900})
            page = context.new_page()
            page.goto(url, wait_until="load")
            page.wait_for_function("performance.getEntriesByName('dnd-table-rendered').length > 0")
            t = page.evaluate(
                """() => ({
                    rendered: performance.getEntriesByName('dnd-table-rendered')[0].startTime,
                    loaded: performance.getEntriesByType('navigation')[0].loadEventEnd,
                    rows: document.querySelectorAll('#neurons tbody tr').length,
                    total: window.DND_REPORT.rows.length,
                })"""
            )
            assert t["total"] == expected or expected == 0, t
            assert t["rows"] > 0, t
            rendered.append(t["rendered"])
            loaded.append(t["loaded"])
            context.close()
        browser.close()
    size = sum(f.stat().st_size for f in index.parent.glob("*.*") if f.is_file())
    result = {
        "index": str(index),
        "neurons": expected,
        "loads": loads,
        "first_table_render_ms": {"median": statistics.median(rendered), "min": min(rendered), "max": max(rendered)},
        "load_event_ms": {"median": statistics.median(loaded), "min": min(loaded), "max": max(loaded)},
        "index_files_bytes": size,
    }
    print(json.dumps(result, indent=2))
    print(
        f"index of {expected} neurons: table rendered {result['first_table_render_ms']['median']:.0f} ms, "
        f"load event {result['load_event_ms']['median']:.0f} ms after navigation start (median of {loads})"
    )


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 5, int(sys.argv[3]) if len(sys.argv) > 3 else 0)
