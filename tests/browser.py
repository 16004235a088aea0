"""The web page in a real headless chromium, driven by selenium through Debian's chromedriver.

Shared by tests/test_web_browser.py and docs/make_screenshots.py. Nothing is downloaded: the browser and its
driver are the system's (`apt-get install chromium chromium-driver`), passed to selenium by path, so
Selenium Manager never runs. Every wait is on a DOM condition, with a deadline.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = ("chromium", "/usr/bin/chromium", "chromium-browser")
CHROMEDRIVER = ("chromedriver", "/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")
WAIT_S = 60  # a deadline for a condition that should hold within a second or two, on a loaded CI machine
# Console errors a page may log without being broken: the request it reports is the one the test made fail.
EXPECTED_CONSOLE = "Failed to load resource: the server responded with a status of"


def find_program(candidates: tuple[str, ...]) -> str | None:
    """The first of `candidates` (a name on PATH or an absolute path) that is an executable, or None."""
    for candidate in candidates:
        found = shutil.which(candidate)
        if found:
            return found
    return None


@contextmanager
def chromium(browser: str, driver: str, width: int = 1000, height: int = 760) -> Iterator[webdriver.Chrome]:
    """A headless chromium (`browser`) under its chromedriver (`driver`), with a `width` x `height` viewport."""
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-extensions", "--hide-scrollbars",
                "--force-device-scale-factor=1", f"--window-size={width},{height}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    chrome = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    try:
        yield chrome
    finally:
        chrome.quit()


class Page:
    """The clip-pacl page at `url` in `driver`: open it, pick a tab, fill and submit its forms, wait on the DOM."""

    def __init__(self, driver: webdriver.Chrome, url: str):
        self.driver = driver
        self.url = url

    def open(self, path: str = "/") -> Page:
        """Load the page afresh and wait until it has its server's health (then every form's handler is attached).

        Through about:blank: from the same page, a URL that differs only in its #fragment would not reload it."""
        self.driver.get("about:blank")
        self.driver.get(f"{self.url}{path}")
        self.wait_for("the page to reach its server", lambda: self.text("status") not in ("", "connecting…"))
        return self

    def find(self, selector: str) -> WebElement:
        return self.driver.find_element(By.CSS_SELECTOR, selector)

    def all(self, selector: str) -> list[WebElement]:
        return self.driver.find_elements(By.CSS_SELECTOR, selector)

    def text(self, element_id: str) -> str:
        return self.driver.find_element(By.ID, element_id).text

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def wait_for(self, what: str, condition, timeout: float = WAIT_S) -> Any:
        """Wait until `condition()` is truthy and return its value; `what` names it in the timeout message."""
        return WebDriverWait(self.driver, timeout, poll_frequency=0.05).until(
            lambda _: condition(), message=f"timed out waiting for {what}")

    def tab(self, name: str) -> WebElement:
        """Click tab `name` (search, classify, segment); wait until its panel is the one shown and return it."""
        self.find(f"#tab-{name}").click()
        panel = self.find(f"#{name}-section")
        self.wait_for(f"the {name} tab", panel.is_displayed)
        return panel

    def fill(self, selector: str, value: str) -> None:
        field = self.find(selector)
        field.clear()
        field.send_keys(value)

    def choose_file(self, selector: str, path: Path) -> None:
        self.find(selector).send_keys(str(Path(path).resolve()))

    def submit(self, form_id: str) -> None:
        """Click the form's button, once it is enabled (it is disabled while the form's last request runs)."""
        button = self.find(f"#{form_id} button[type=submit]")
        self.wait_for(f"#{form_id}'s button to be enabled", button.is_enabled)
        button.click()

    def wait_for_error(self, message_id: str) -> str:
        """Wait until the message under a form shows an error; return its text."""
        self.wait_for(f"an error in #{message_id}", lambda: "error" in self.find(f"#{message_id}").get_attribute(
            "class").split())
        return self.text(message_id)

    def images_loaded(self, selector: str) -> bool:
        """Whether every image matching `selector` (at least one) has loaded and decoded to a non-empty picture."""
        return self.js("const imgs = [...document.querySelectorAll(arguments[0])];"
                       "return imgs.length > 0 && imgs.every((i) => i.complete && i.naturalWidth > 0);", selector)

    def console_errors(self) -> list[str]:
        """Severe console messages since the last call (JS exceptions, CSP violations), less EXPECTED_CONSOLE."""
        return [entry["message"] for entry in self.driver.get_log("browser")
                if entry["level"] == "SEVERE" and EXPECTED_CONSOLE not in entry["message"]]

    def screenshot(self, path: Path) -> None:
        """The whole page as a PNG at `path` (the viewport is first sized to the page's content, grown or shrunk)."""
        width, height, extra = self.js("return [window.outerWidth, Math.ceil(document.body.scrollHeight), "
                                       "window.outerHeight - window.innerHeight];")
        self.driver.set_window_size(width, height + extra)
        self.wait_for("the window to resize", lambda: self.js("return window.innerHeight") == height)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(path))
