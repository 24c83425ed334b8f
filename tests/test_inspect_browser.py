"""The HTML report in a real headless browser (Debian's chromium, over the DevTools pipe): it
renders, every image loads, the console stays clean, it fits a laptop screen, and a screenshot
shows the sample grid and the plots."""

from __future__ import annotations

import io
import os
import re

import imagegen
import pytest
from browser import CHROMIUM, Browser
from conftest import convert, row, write_input
from PIL import Image

from engine.inspect.report import inspect_dataset, write_report

# skipped on a machine without chromium, never in CI (where scripts/install.sh installs it)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"),
    reason="chromium is not installed (scripts/install.sh installs it)",
)

BAR_BLUE = (0x3B, 0x6F, 0xB6)  # report_html's histogram bars
RECTS = """JSON.stringify({
  grid: (e => e ? [e.getBoundingClientRect().x, e.getBoundingClientRect().y + scrollY,
                   e.getBoundingClientRect().width, e.getBoundingClientRect().height] : null)\
(document.querySelector('#samples .grid')),
  plots: [...document.querySelectorAll('#images .plot')].map(e => { const r = e.getBoundingClientRect();
                                                                    return [r.x, r.y + scrollY,\
 r.width, r.height]; })
})"""


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    images = {f"img/{i}.jpg": imagegen.noise_jpeg((160, 120), seed=i) for i in range(10)}
    rows = [row(f"id{i}", f"img/{i}.jpg", split="test" if i >= 8 else None) for i in range(10)]
    inp = write_input(root / "in", rows, images)
    out = root / "out"
    assert convert(inp, out) == 0
    full = root / "report.html"
    write_report(inspect_dataset(str(out), samples=8), str(full))
    no_samples = root / "no-samples.html"
    write_report(inspect_dataset(str(out), samples=0), str(no_samples))
    no_plots = root / "no-plots.html"
    no_plots.write_text(re.sub(r'<figure class="plot">.*?</figure>', "", full.read_text(), flags=re.S))
    return {"full": full, "no-samples": no_samples, "no-plots": no_plots}


def visible_regions(png: bytes, rects: dict) -> list[str]:
    """What is missing from the screenshot: the grid must show many colours (photos), each plot
    its bars (enough pixels of the bar colour) and some detail (axes, labels)."""
    shot = Image.open(io.BytesIO(png)).convert("RGB")
    missing = []
    grid = rects["grid"]
    if not grid or grid[2] < 100 or grid[3] < 100:
        missing.append("sample grid")
    else:
        crop = shot.crop((int(grid[0]), int(grid[1]), int(grid[0] + grid[2]), int(grid[1] + grid[3])))
        if len(crop.getcolors(1 << 24)) < 2000:
            missing.append("sample grid")
    if len(rects["plots"]) < 5:
        missing.append("plots")
    for x, y, w, h in rects["plots"]:
        crop = shot.crop((int(x), int(y), int(x + w), int(y + h)))
        colours = dict((c, n) for n, c in crop.getcolors(1 << 24))
        if colours.get(BAR_BLUE, 0) < 0.01 * w * h or len(colours) < 20:
            missing.append(f"plot at y={int(y)}")
    return missing


def test_report_renders_every_image_loads_and_console_is_clean(reports):
    with Browser() as b:
        b.load(reports["full"].as_uri())
        images = b.evaluate("[...document.images].map(i => [i.complete, i.naturalWidth, i.alt])")
        assert len(images) == 8 + 5 + 1  # samples, image histograms, the price histogram
        assert all(done and width > 0 for done, width, _ in images), images
        assert b.problems() == []
        # readable on a laptop: no horizontal scrolling at 1280 px, and none at 1024 either
        assert b.evaluate("document.documentElement.scrollWidth") <= 1280
        b.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1024, "height": 768, "deviceScaleFactor": 1, "mobile": False},
            session=True,
        )
        assert b.evaluate("document.documentElement.scrollWidth") <= 1024


def test_the_harness_sees_broken_images_and_console_errors(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text(
        '<!doctype html><html><body><img src="data:image/png;base64,AAAA"><img src="missing.png">'
        '<script>console.error("boom")</script></body></html>'
    )
    with Browser() as b:
        b.load(page.as_uri())
        assert b.evaluate("[...document.images].map(i => i.naturalWidth)") == [0, 0]
        problems = b.problems()
    assert "console.error: boom" in problems
    assert any("ERR_FILE_NOT_FOUND" in p and p.endswith("missing.png") for p in problems), problems


def test_screenshot_shows_the_grid_and_the_plots(reports, tmp_path):
    found = {}
    with Browser() as b:
        for name, page in reports.items():
            b.load(page.as_uri())
            rects = __import__("json").loads(b.evaluate(RECTS))
            png = b.screenshot()
            (tmp_path / f"{name}.png").write_bytes(png)
            found[name] = visible_regions(png, rects)
    assert found["full"] == []
    assert found["no-samples"] == ["sample grid"]
    assert found["no-plots"] == ["plots"]
