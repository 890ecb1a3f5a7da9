"""The HTML report as a browser shows it: headless Chromium with a CJK font, at a wide and a narrow window."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

PACKAGES = ["chromium", "fonts-noto-cjk"]

# Runs in the page after load: does anything make the page itself wider than the window (tables must scroll in
# their own box), and do Chinese characters render as glyphs in the page's font stack? Tofu (missing glyphs)
# draws one identical box for every character, the same box as a private-use code point.
PROBE = """<script>
function ink(text) {
  const canvas = document.createElement('canvas'); canvas.width = 64; canvas.height = 64;
  const context = canvas.getContext('2d');
  context.font = '48px ' + getComputedStyle(document.body).fontFamily;
  context.fillText(text, 4, 52);
  return Array.from(context.getImageData(0, 0, 64, 64).data).join(',');
}
const result = {innerWidth: window.innerWidth, scrollWidth: document.documentElement.scrollWidth,
  tables: document.querySelectorAll('table').length,
  scrolledTables: Array.from(document.querySelectorAll('table')).filter(t => t.closest('.scroll')).length,
  widestScrollBox: Math.max(...Array.from(document.querySelectorAll('.scroll')).map(d => d.clientWidth)),
  cjkText: document.body.innerText.includes('医学'),
  inked: ink('医') !== ink(' '), distinct: ink('医') !== ink('法'), notTofu: ink('医') !== ink('\\ue000')};
const out = document.createElement('pre'); out.id = 'probe'; out.textContent = JSON.stringify(result);
document.body.appendChild(out);
</script>"""


def browser() -> str:
    """Chromium and a CJK font, installed with apt-get when missing (needs root and a Debian mirror)."""
    fonts = subprocess.run(["fc-list", ":lang=zh"], capture_output=True, text=True).stdout if shutil.which(
        "fc-list") else ""
    if not shutil.which("chromium") or not fonts.strip():
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES], check=True,
                       env=env, stdout=subprocess.DEVNULL)
    return shutil.which("chromium")


def chromium(binary: str, page: Path, width: int, *args: str) -> str:
    command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--mute-audio",
               f"--window-size={width},1000", "--virtual-time-budget=3000", *args, page.as_uri()]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.fixture(scope="module")
def page(demo, tmp_path_factory) -> Path:
    html = (demo / "results" / "report.html").read_text(encoding="utf-8")
    probed = tmp_path_factory.mktemp("report") / "report.html"
    probed.write_text(html.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    return probed


@pytest.mark.parametrize("width", [1900, 700])
def test_the_report_fits_the_window_and_renders_chinese_in_headless_chromium(page, width):
    dom = chromium(browser(), page, width, "--dump-dom")
    probe = json.loads(re.search(r'<pre id="probe">(.*?)</pre>', dom).group(1).replace("&quot;", '"'))
    assert probe["innerWidth"] == width
    assert probe["scrollWidth"] <= width  # the page never scrolls sideways: wide tables scroll in their box
    assert probe["tables"] >= 3 and probe["scrolledTables"] == probe["tables"]
    assert probe["widestScrollBox"] <= width
    assert probe["cjkText"]  # the per-subject exam table names its Chinese subjects
    assert probe["inked"] and probe["distinct"] and probe["notTofu"], probe


def test_a_screenshot_of_the_report_shows_its_page(page, tmp_path):
    from PIL import Image

    shot = tmp_path / "report.png"
    chromium(browser(), page, 1900, f"--screenshot={shot}")
    with Image.open(shot) as image:
        assert image.size == (1900, 1000)
        colours = image.convert("L").getcolors(maxcolors=1 << 16)
    assert colours is not None and len(colours) > 8  # text and tables drawn, not a blank or error page
