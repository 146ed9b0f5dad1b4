"""Debian's chromium, driven by Playwright for Python, for the page's browser tests.

Playwright's own browser download is not reachable from these machines, so the tests launch
/usr/bin/chromium through ``executable_path``. Outside CI a missing browser (or Playwright) skips the
test with a message saying how to install it; with CI=true it fails, so CI cannot pass without them.
"""
from __future__ import annotations

import os

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


def _missing(message: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def playwright():
    """Playwright's sync API for the module."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the browser tests need Playwright for Python: pip install playwright")
    with sync_playwright() as p:
        yield p


def launch_chromium(playwright):
    """A headless Debian chromium, or skip/fail (CI=true) naming how to install it."""
    if not os.path.exists(CHROMIUM):
        _missing(f"the browser tests need Debian's chromium at {CHROMIUM}: apt-get install chromium "
                 "(Playwright for Python drives it; its own browser download is not used)")
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)


def watch_errors(page) -> list[str]:
    """Every console error and uncaught page error of ``page``, collected as they happen."""
    errors: list[str] = []
    page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    return errors


def enter_token(page, token: str) -> None:
    """The page asks for the server's token before any API call; give it."""
    from playwright.sync_api import expect

    expect(page.locator("#token-panel")).to_be_visible()
    page.fill("#token", token)
    page.click("#token-form button[type=submit]")
