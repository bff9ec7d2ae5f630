"""Headless Chromium through Playwright (Debian's chromium: Playwright's own download is not used)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
from pathlib import Path

from tests.conftest import IN_CI, REPO, require

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DOCS_SCREENSHOT = REPO / "docs" / "dashboard.png"


@contextlib.contextmanager
def chromium_page(width: int = 1280, height: int = 2000):
    """(page, requested URLs); fails under CI=true when Playwright or chromium is missing, else skips."""
    require(importlib.util.find_spec("playwright") is not None, "playwright is not installed (pip install playwright)")
    require(Path(CHROMIUM).is_file(), f"chromium not found at {CHROMIUM} (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            yield page, requests
        finally:
            browser.close()


def save_screenshot(page, path: Path, *, docs: bool = False) -> Path:
    """Screenshot to `path`; with `docs`, also to docs/dashboard.png (the README's) when that is missing or
    TELEMETRY_UPDATE_SCREENSHOT=1, so a test run does not rewrite a committed file every time."""
    page.screenshot(path=str(path), full_page=True)
    if docs and not IN_CI and (os.environ.get("TELEMETRY_UPDATE_SCREENSHOT") == "1" or not DOCS_SCREENSHOT.exists()):
        DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(path, DOCS_SCREENSHOT)
    return path
