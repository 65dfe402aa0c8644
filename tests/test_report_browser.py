"""The run's page in a real browser (issue 29 item 3): headless Chromium from Debian's packages (`make test-browser`
installs it with apt-get and runs this file; nothing is downloaded at run time) loads the page with every network
name unresolvable, and the plots must have rendered: each image decoded at its PNG's size, and the screenshot's pixels
where it lies are the PNG's own. The same check on a copy whose images are blank PNGs of the same size must fail
there, so the check can tell a rendered plot from an empty box. Skipped, saying why, where no chromium is found.

Chromium runs to completion each time (--dump-dom prints the page after its load event; --screenshot after it):
nothing here waits a set time.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from page_parse import parse
from report_fixture import make_run

from sqltune.report.render import write_page

CHROMIUM = os.environ.get("SQLTUNE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(not CHROMIUM, reason="no chromium binary on PATH (`make test-browser` installs "
                                                     "Debian's chromium with apt-get, then runs this file)")
WIDTH = 1200
# test-only: after the load event, each image's state and place go into an attribute of <html> (no layout change)
PROBE = """<script>
window.addEventListener("load", () => {
  const images = [...document.images].map(i => {
    const r = i.getBoundingClientRect(), s = getComputedStyle(i);
    return {alt: i.alt, complete: i.complete, natural: [i.naturalWidth, i.naturalHeight],
            box: [r.left + scrollX + parseFloat(s.borderLeftWidth), r.top + scrollY + parseFloat(s.borderTopWidth),
                  i.clientWidth, i.clientHeight]};
  });
  document.documentElement.setAttribute("data-probe", JSON.stringify(
      {images, height: document.documentElement.scrollHeight}));
});
</script>"""


def chromium(tmp_path: Path, *args: str) -> str:
    command = [CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", "--no-first-run",
               "--force-device-scale-factor=1", "--host-resolver-rules=MAP * ~NOTFOUND",
               f"--user-data-dir={tmp_path / 'profile'}", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)  # a guard against a hang only
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def probe(tmp_path: Path, page: Path) -> dict:
    """Load a copy of `page` with the probe in it; returns the images' state and places and the page height."""
    copy = page.with_name(page.stem + ".probe.html")
    copy.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = chromium(tmp_path, f"--window-size={WIDTH},1000", "--dump-dom", copy.as_uri())
    html = parse(dom).all("html")[0]
    assert "data-probe" in html.attrs, "the page's load event never ran"
    return json.loads(html.attrs["data-probe"])


def screenshot(tmp_path: Path, page: Path, height: int):
    from PIL import Image

    shot = tmp_path / f"{page.stem}.png"
    chromium(tmp_path, f"--window-size={WIDTH},{height}", f"--screenshot={shot}", page.as_uri())
    return Image.open(shot).convert("RGB")


def pngs(html: str) -> list:
    from PIL import Image

    found = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    return [Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB") for b in found]


def difference(shot, box: list[float], image) -> float:
    """Mean absolute difference (0-255) between the screenshot where the image lies and the image itself."""
    from PIL import ImageChops, ImageStat

    x, y = round(box[0]), round(box[1])
    region = shot.crop((x, y, x + image.width, y + image.height))
    return sum(ImageStat.Stat(ImageChops.difference(region, image)).mean) / 3


def blank_copy(page: Path, images: list) -> Path:
    """The page with every plot replaced by a white PNG of the same size (the same layout, nothing drawn)."""
    from PIL import Image

    blanks = []
    for image in images:
        buffer = io.BytesIO()
        Image.new("RGB", image.size, "white").save(buffer, format="PNG")
        blanks.append('src="data:image/png;base64,' + base64.b64encode(buffer.getvalue()).decode() + '"')
    html = re.sub(r'src="data:image/png;base64,[A-Za-z0-9+/=]+"', lambda m: blanks.pop(0),
                  page.read_text(encoding="utf-8"))
    copy = page.with_name(page.stem + ".blank.html")
    copy.write_text(html, encoding="utf-8")
    return copy


def test_plots_render_in_chromium(tmp_path):
    run = make_run(tmp_path / "runs")
    page = write_page(run, run / "report.html")
    images = pngs(page.read_text(encoding="utf-8"))
    assert len(images) == 4

    seen = probe(tmp_path, page)
    assert len(seen["images"]) == len(images)
    for shown, image in zip(seen["images"], images):
        assert shown["complete"] and shown["natural"] == list(image.size), shown  # decoded, at its own size
        assert shown["box"][2:] == list(image.size), shown  # shown at 1:1 (the page is wide enough)
    shot = screenshot(tmp_path, page, seen["height"])
    for shown, image in zip(seen["images"], images):
        # the plot's own pixels are on screen (measured here: 0.001 of 255)
        assert difference(shot, shown["box"], image) < 1, shown["alt"]

    blank = blank_copy(page, images)
    blank_seen = probe(tmp_path, blank)
    assert [i["box"] for i in blank_seen["images"]] == [i["box"] for i in seen["images"]]  # the same layout
    blank_shot = screenshot(tmp_path, blank, blank_seen["height"])
    for shown, image in zip(blank_seen["images"], images):
        assert difference(blank_shot, shown["box"], image) > 2, shown["alt"]  # an empty box fails (measured: 5-20)
