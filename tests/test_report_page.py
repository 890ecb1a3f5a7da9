"""The HTML report as a browser shows it: headless Chromium with a CJK font, at a wide and a narrow window."""

import pytest

from browser import headless_chromium

# Does anything make the page wider than the window (tables must scroll in their own box), and do Chinese
# characters render as glyphs in the page's font stack? Without a CJK font every character draws the same box,
# the box a private-use code point draws.
PROBE = """
function ink(text) {
  const canvas = document.createElement('canvas'); canvas.width = 64; canvas.height = 64;
  const context = canvas.getContext('2d');
  context.font = '48px ' + getComputedStyle(document.body).fontFamily;
  context.fillText(text, 4, 52);
  return Array.from(context.getImageData(0, 0, 64, 64).data).join(',');
}
const tables = Array.from(document.querySelectorAll('table'));
return {innerWidth: window.innerWidth, scrollWidth: document.documentElement.scrollWidth,
  tables: tables.length, scrolledTables: tables.filter(t => t.closest('.scroll')).length,
  widestScrollBox: Math.max(...Array.from(document.querySelectorAll('.scroll')).map(d => d.clientWidth)),
  cjkText: document.body.innerText.includes('医学'),
  inked: ink('医') !== ink(' '), distinct: ink('医') !== ink('法'), notTofu: ink('医') !== ink('\\ue000')};
"""


@pytest.mark.parametrize("width", [1900, 700])
def test_the_report_fits_the_window_and_renders_chinese_in_headless_chromium(demo, width):
    with headless_chromium(width=width) as browser:
        browser.get((demo / "results" / "report.html").as_uri())
        probe = browser.execute_script(PROBE)
    assert probe["innerWidth"] == width
    assert probe["scrollWidth"] <= width  # the page never scrolls sideways: wide tables scroll in their box
    assert probe["tables"] >= 3 and probe["scrolledTables"] == probe["tables"]
    assert probe["widestScrollBox"] <= width
    assert probe["cjkText"]  # the per-subject exam table names its Chinese subjects
    assert probe["inked"] and probe["distinct"] and probe["notTofu"], probe


def test_a_screenshot_of_the_report_shows_its_page(demo, tmp_path):
    from PIL import Image

    shot = tmp_path / "report.png"
    with headless_chromium(width=1900) as browser:
        browser.get((demo / "results" / "report.html").as_uri())
        assert browser.save_screenshot(str(shot))
    with Image.open(shot) as image:
        width = image.size[0]
        colours = image.convert("L").getcolors(maxcolors=1 << 16)
    assert width == 1900
    assert colours is not None and len(colours) > 8  # text and tables drawn, not a blank or error page
