"""A real headless Chromium (Debian's ``chromium`` package) driven by Playwright, for the HTML report.

Playwright never downloads a browser here: it launches the system Chromium. Run as a script to
take a screenshot of a report: ``python Testing/browser.py REPORT.html SCREENSHOT.png [HEIGHT]``
(the top HEIGHT CSS pixels of the page, else all of it, at 75 % scale with 256 colours, small
enough for the README).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> Path | None:
    """The system Chromium ($ENTROPYMERGE_CHROMIUM, else ``chromium`` on PATH), or None when it is not installed."""
    found = os.environ.get("ENTROPYMERGE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    return Path(found) if found and Path(found).exists() else None


def missing_reason() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    if chromium_path() is None:
        return "Chromium is not installed (apt-get install chromium; .ci/run installs it)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -c constraints.txt -e '.[test]')"
    return None


@contextlib.contextmanager
def browser_context(width: int = 1280, height: int = 900, scale: float = 1.0):
    """A Playwright browser context of the system Chromium with a fresh, temporary profile; ``scale``: device pixels per CSS pixel."""
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="entropymerge-chromium-") as profile, sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=str(chromium_path()), args=CHROMIUM_ARGS, headless=True,
            viewport={"width": width, "height": height}, device_scale_factor=scale)
        try:
            yield context
        finally:
            context.close()


def open_report(context, report: Path):
    """Open ``report`` from disk and wait until its images are drawn; returns (page, console errors, requested URLs)."""
    page = context.new_page()
    errors: list[str] = []
    requests: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("request", lambda request: requests.append(request.url))
    page.goto(Path(report).resolve().as_uri())
    page.wait_for_selector("body[data-ready=true]", timeout=60_000)
    return page, errors, requests


def main(report: str, screenshot: str, height: str | None = None) -> None:
    from PIL import Image

    with browser_context(scale=0.75) as context:
        page, errors, _ = open_report(context, Path(report))
        if errors:
            sys.exit(f"console errors: {errors}")
        clip = {"x": 0, "y": 0, "width": 1280, "height": int(height)} if height else None
        page.screenshot(path=screenshot, full_page=True, clip=clip)
    image = Image.open(screenshot).convert("RGB")
    image.quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(screenshot, optimize=True)
    print(f"{screenshot}: {image.size[0]} x {image.size[1]} pixels, {Path(screenshot).stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main(*sys.argv[1:])
