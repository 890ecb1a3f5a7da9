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


def test_ten_runs_fit_at_1400px_sort_by_a_click_and_answer_the_same_row_side_by_side(tmp_path):
    from PIL import Image
    from report_runs import ten_runs
    from selenium.webdriver.common.by import By

    from snaketune.report import write_report

    picture = tmp_path / "sum.png"
    Image.new("RGB", (320, 240), (30, 90, 200)).save(picture)
    plots = {"loss": {"sums": str(tmp_path / "loss.png")}, "metrics": {"sums": str(tmp_path / "m.png")}}
    write_report(ten_runs(tmp_path, image=str(picture)), tmp_path / "leaderboard.csv", tmp_path / "report.html",
                 plot_files=plots)
    first_runs = ("return Array.from(document.querySelector('table.sortable').tBodies[0].rows)"
                  ".map(r => r.cells[0].innerText)")
    visible_rows = ("return Array.from(document.querySelectorAll('table.side tbody tr'))"
                    ".filter(r => r.offsetParent).length")
    with headless_chromium(width=1400) as browser:
        browser.get((tmp_path / "report.html").as_uri())
        assert browser.execute_script("return document.documentElement.scrollWidth") <= 1400
        heading = browser.find_element(By.XPATH, "(//table[@class='sortable'])[1]//th[text()='exact match']")
        heading.click()  # the first click sorts from the best down
        assert browser.execute_script(first_runs)[:2] == ["tuned-9", "tuned-8"]
        heading.click()
        assert browser.execute_script(first_runs)[:2] == ["base", "tuned-1"]

        side = browser.execute_script("""
            const table = document.querySelector('table.side');
            const names = Array.from(table.tHead.rows[0].cells).map(c => c.innerText);
            const row = Array.from(table.tBodies[0].rows).find(r => r.cells[0].innerText === 'q005');
            return {names: names, cells: Array.from(row.cells).map(c => c.innerText),
                    thumbnails: table.querySelectorAll('img.thumb').length};""")
        answers = dict(zip(side["names"], side["cells"], strict=True))
        assert answers["question"].strip() == "What is 5 plus 5?" and answers["reference"] == "10"
        assert (answers["base"], answers["tuned-1"], answers["tuned-2"]) == ("I do not know", "I do not know", "10")
        assert side["thumbnails"] == 30

        assert browser.execute_script(visible_rows) == 20  # a sample first
        browser.find_element(By.CSS_SELECTOR, ".answers input.all").click()
        assert browser.execute_script(visible_rows) == 30
        browser.find_element(By.CSS_SELECTOR, ".answers input.filter").send_keys("27 plus")
        assert browser.execute_script(visible_rows) == 1

        shown = ("return Array.from(document.querySelectorAll('figure img')).filter(i => i.offsetParent)"
                 ".map(i => i.className)")
        assert browser.execute_script(shown) == ["linear", ""]
        browser.find_element(By.ID, "log-scale").click()
        assert browser.execute_script(shown) == ["log", ""]
        assert browser.execute_script("return document.documentElement.scrollWidth") <= 1400
