"""report.html (evaluate --out) and the visualize-layers index.html, checked as files and
in a real headless Chromium: no console errors, every image resolves."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest
from typer.testing import CliRunner

from conftest import EXAMPLES_DIR
from xrayfeat.cli import app

runner = CliRunner()
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed "
                                   "(apt-get install chromium; CI installs it)")
#: Appended to a copy of a page: after load, counts images that did not decode and writes
#: the count into the DOM, where --dump-dom shows it.
_PROBE = """<script>window.addEventListener("load", () => {
  const broken = [...document.images].filter(i => !i.complete || i.naturalWidth === 0);
  broken.forEach(i => console.error("broken image " + i.src));
  document.body.setAttribute("data-images", document.images.length);
  document.body.setAttribute("data-broken", broken.length);
});</script>"""


class _Sources(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "a" and attrs.get("href"):
            self.links.append(attrs["href"])


def _chromium(page: Path, *args: str) -> subprocess.CompletedProcess:
    # Chromium puts a Unix socket in TMPDIR and aborts when its path passes the 108-byte
    # limit, which a long pytest temporary folder does: it gets a short TMPDIR of its own.
    short = "/tmp" if os.path.isdir("/tmp") else None
    with tempfile.TemporaryDirectory(prefix="chromium-", dir=short) as tmp:
        return subprocess.run([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu",
                               "--enable-logging=stderr", "--v=0", *args, page.as_uri()],
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "TMPDIR": tmp})


def check_in_browser(page: Path) -> int:
    """Load ``page`` in headless Chromium: no console message at all, and every image
    decodes (checked on a copy with a probe script appended). Returns the image count."""
    loaded = _chromium(page, f"--screenshot={page.parent / '.shot.png'}",
                       "--window-size=1280,2000")
    console = [line for line in loaded.stderr.splitlines() if ":CONSOLE" in line]
    assert loaded.returncode == 0 and not console, console or loaded.stderr[-2000:]
    probe = page.with_name(".probe.html")
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", _PROBE + "</body>"),
                     encoding="utf-8")
    dumped = _chromium(probe, "--dump-dom", "--virtual-time-budget=10000")
    probe.unlink()
    match = re.search(r'data-images="(\d+)" data-broken="(\d+)"', dumped.stdout)
    assert match, dumped.stdout[-2000:] + dumped.stderr[-2000:]
    images, broken = map(int, match.groups())
    assert broken == 0, [line for line in dumped.stderr.splitlines() if "broken" in line]
    return images


@pytest.fixture(scope="module")
def report_dir(trained_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "ev"
    result = runner.invoke(app, ["evaluate", str(trained_run), str(EXAMPLES_DIR), "--split",
                                 "test", "--out", str(out), "--bootstrap", "100"])
    assert result.exit_code == 0, result.output
    return out


def test_report_links_every_figure_and_shows_provenance(report_dir, trained_run):
    page = report_dir / "report.html"
    text = page.read_text(encoding="utf-8")
    parser = _Sources()
    parser.feed(text)
    targets = [report_dir / unquote(src) for src in parser.images + parser.links]
    assert all(t.resolve().is_relative_to(report_dir.resolve()) and t.is_file()
               for t in targets), targets
    for figure in ("roc.png", "pr.png", "confusion.png", "reliability.png", "scores.png"):
        assert figure in parser.images
    config = json.loads((trained_run / "config.json").read_text())
    assert config["data"]["sha256"][:16] in text  # the data the run was trained on
    assert "accuracy" in text and "Misclassified" in text
    metrics = json.loads((report_dir / "metrics.json").read_text())
    wrong = metrics["confusion_matrix"]["fp"] + metrics["confusion_matrix"]["fn"]
    shown = [s for s in parser.images if s.startswith("misclassified/")]
    assert len(shown) == 2 * min(wrong, 24)  # each: the image and its Grad-CAM


def test_several_runs_are_compared_side_by_side(trained_run, tmp_path):
    other = tmp_path / "copy"
    shutil.copytree(trained_run, other)
    out = tmp_path / "ev"
    result = runner.invoke(app, ["evaluate", str(trained_run), str(other), str(EXAMPLES_DIR),
                                 "--out", str(out), "--bootstrap", "0",
                                 "--choose-threshold", "youden"])
    assert result.exit_code == 0, result.output
    text = (out / "report.html").read_text(encoding="utf-8")
    assert "<th>run</th><th>copy</th>" in text
    runs = json.loads((out / "metrics.json").read_text())["runs"]
    chosen = [r["threshold_for_these_images"]["threshold"] for r in runs.values()]
    row = text.split("threshold chosen on these images (youden)", 1)[1].split("</tr>", 1)[0]
    assert [f"{t:.4f}" in row for t in chosen] == [True, True]


@needs_browser
def test_report_loads_in_a_browser_with_every_image(report_dir):
    assert check_in_browser(report_dir / "report.html") >= 5


@needs_browser
def test_visualize_index_loads_in_a_browser_with_every_image(trained_run, tmp_path):
    image = next((EXAMPLES_DIR / "test").rglob("*.jpeg"))
    out = tmp_path / "v"
    result = runner.invoke(app, ["visualize-layers", str(trained_run), str(image), "--out",
                                 str(out), "--filters"])
    assert result.exit_code == 0, result.output
    assert check_in_browser(out / "index.html") >= 5
