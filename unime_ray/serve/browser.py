"""A headless browser for the Serve app's pages: Debian's chromium driven by selenium, as the browser
tests (tests/test_web.py) and the documentation's screenshots (scripts/screenshots.py) use it.

Its traffic stays on 127.0.0.1: every other host name fails to resolve, and the browser's own background
services (updates, sync, safe browsing) are off. The driver's path is given, so selenium never looks for
(or downloads) one. selenium is in the dev extra; chromium and chromedriver come from apt
(scripts/install.sh installs them when run as root).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

WAIT_S = 60  # the longest wait for a page load or a condition


class BrowserUnavailable(RuntimeError):
    """selenium, chromium or chromedriver is missing on this machine (the message says which)."""


def chromium(profile: str | Path, width: int = 1280, height: int = 1400) -> Any:
    """A headless chromium (selenium WebDriver) with its profile in the folder `profile` and a window of
    `width` x `height` CSS pixels; raises BrowserUnavailable, saying what is missing. The caller quits it."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        raise BrowserUnavailable(
            "selenium is not installed (it is in the dev extra: pip install -e '.[dev]')"
        ) from None
    binary = next((p for p in map(shutil.which, ["chromium", "chromium-browser"]) if p), None)
    driver_path = shutil.which("chromedriver")
    if not binary or not driver_path:
        raise BrowserUnavailable(
            "no chromium or chromedriver on PATH (scripts/install.sh installs Debian's chromium and "
            "chromium-driver with apt when run as root)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in [
        "--headless=new",
        "--no-sandbox",  # CI runs as root, where chromium's sandbox refuses to start
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--window-size={width},{height}",
        f"--user-data-dir={profile}",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--no-first-run",
    ]:
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.set_page_load_timeout(WAIT_S)
    return driver


def wait(driver: Any, condition: Callable[[Any], Any], what: str) -> Any:
    """`condition(driver)`'s first truthy value, polled every 0.1 s; selenium's TimeoutException naming
    `what` after WAIT_S seconds."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(lambda d: condition(d), message=what)


def open_search(driver: Any, url: str, key: str = "") -> None:
    """The search page at `url` + "/", ready (its script ran), with `key` in its API-key field."""
    driver.get(url + "/")
    wait(driver, lambda d: d.execute_script("return document.body.dataset.state") == "idle", "page ready")
    field = driver.find_element("id", "key")
    field.clear()
    if key:
        field.send_keys(key)


def completed(driver: Any) -> int:
    """How many searches the page has finished (its body's data-completed)."""
    return int(driver.execute_script("return document.body.dataset.completed || '0'"))


def run_search(driver: Any, action: Callable[[], Any]) -> str:
    """Do `action` (which starts a search), wait for that search to finish; its state: done or error."""
    before = completed(driver)
    action()
    wait(driver, lambda d: completed(d) > before, "the search to finish")
    return driver.execute_script("return document.body.dataset.state")


def wait_for_thumbnails(driver: Any) -> None:
    """Every result's thumbnail decoded by the browser, or marked failed by the page."""
    wait(
        driver,
        lambda d: d.execute_script(
            "return [...document.querySelectorAll('#results img.thumb')]"
            ".every(i => (i.complete && i.naturalWidth > 0) || i.dataset.failed)"
        ),
        "thumbnails to load",
    )
