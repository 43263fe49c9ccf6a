"""Headless Chromium for the report tests: render a page, take a screenshot, return console errors."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def console_lines(page_path: Path, screenshot: Path) -> list[str]:
    """Console messages and uncaught errors Chromium printed while rendering ``page_path``."""
    assert CHROMIUM is not None
    proc = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--enable-logging=stderr",
            "--v=0",
            f"--user-data-dir={screenshot.parent / 'profile'}",
            f"--screenshot={screenshot}",
            "--window-size=1280,2000",
            page_path.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return [line for line in proc.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
