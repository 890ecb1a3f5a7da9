"""Headless Chromium for the tests that look at pages as a browser shows them: Debian's chromium, its driver and
a CJK font, installed with apt-get when absent (needs root and a Debian mirror, as the Slurm test does)."""

import os
import shutil
import subprocess
from contextlib import contextmanager

PACKAGES = ["chromium", "chromium-driver", "fonts-noto-cjk"]


def ensure_installed() -> None:
    fonts = subprocess.run(["fc-list", ":lang=zh"], capture_output=True, text=True).stdout if shutil.which(
        "fc-list") else ""
    if shutil.which("chromium") and shutil.which("chromedriver") and fonts.strip():
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES], check=True, env=env,
                   stdout=subprocess.DEVNULL)


@contextmanager
def headless_chromium(width: int = 1280, height: int = 1000):
    """A Selenium driver of headless Chromium with a ``width`` x ``height`` window."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    ensure_installed()
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--hide-scrollbars",
                 f"--window-size={width},{height}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        yield browser
    finally:
        browser.quit()


def screenshot(page: str, out: str, width: int = 1400, height: int = 1800) -> None:
    """Save the top ``height`` pixels of ``page`` as a browser ``width`` pixels wide shows it."""
    from pathlib import Path

    with headless_chromium(width=width, height=height) as browser:
        browser.get(Path(page).resolve().as_uri())
        browser.save_screenshot(out)


if __name__ == "__main__":  # python tests/browser.py results/report.html report.png [width] [height]
    import sys

    screenshot(sys.argv[1], sys.argv[2], *map(int, sys.argv[3:5]))
