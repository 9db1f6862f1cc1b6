"""A real browser: Playwright drives Debian's chromium against `streamlit run` on a free port.

Opens every page, moves the weight bit-width slider and checks the accuracy shown changes to
qcore's value, follows a shared URL and sees its config, and saves a screenshot of each page to
artifacts/screenshots/ (ignored by git). Needs /usr/bin/chromium: .ci/setup installs it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from qcore.analysis import quantize_for
from qcore.config import QuantConfig
from qcore.evaluate import evaluate
from tests.conftest import ROOT

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
SHOTS = ROOT / "artifacts" / "screenshots"
IDLE = "[data-testid='stApp'][data-test-script-state='notRunning']"
PAGES = {
    "model": "Model",
    "activations": "Activations",
    "weights": "Weights",
    "accuracy": "Accuracy",
    "deploy": "Deploy",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    port = free_port()
    log = (ROOT / "artifacts").resolve()
    log.mkdir(exist_ok=True)
    with open(log / "streamlit.log", "w") as output:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "streamlit",
                "run",
                "app.py",
                "--server.port",
                str(port),
                "--server.address",
                "127.0.0.1",
                "--server.headless",
                "true",
            ],
            cwd=ROOT,
            env=dict(os.environ),
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 90
            while True:
                try:
                    urllib.request.urlopen(f"{base}/_stcore/health", timeout=2)
                    break
                except OSError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"streamlit did not start; see {log / 'streamlit.log'}") from None
                    time.sleep(0.5)
            yield base
        finally:
            process.terminate()
            process.wait(timeout=20)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: run `bash .ci/setup` (installs Debian's chromium)"
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        yield launched
        launched.close()


def settle(page) -> None:
    """Wait until the script run that a navigation or widget change started has finished."""
    page.wait_for_timeout(300)
    page.wait_for_selector(IDLE, timeout=120_000)
    page.wait_for_selector("[data-testid='stMetricValue']", timeout=120_000)


def sidebar_metric(page, label: str) -> str:
    metric = page.locator("[data-testid='stSidebar'] [data-testid='stMetric']").filter(has_text=label)
    return metric.locator("[data-testid='stMetricValue']").inner_text().strip()


def percent_for(pretrained, mnist, config: QuantConfig) -> str:
    return f"{100 * evaluate(quantize_for(pretrained, mnist, config), mnist.test).accuracy:.2f}%"


def test_pages_slider_and_shared_url(server, browser, pretrained, mnist):
    SHOTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 2600})  # tall: Streamlit scrolls inside the page
    page.goto(server)
    settle(page)
    assert sidebar_metric(page, "Quantized accuracy") == percent_for(pretrained, mnist, QuantConfig())

    for path, title in PAGES.items():
        page.locator("[data-testid='stSidebarNavLink']").filter(has_text=title).click()
        settle(page)
        assert page.locator("[data-testid='stMain'] h1").first.inner_text().strip() == title
        assert page.locator("[data-testid='stException']").count() == 0
        page.screenshot(path=str(SHOTS / f"{path}.png"), full_page=True)

    before = sidebar_metric(page, "Quantized accuracy")
    slider = page.locator("[data-testid='stSlider']").filter(has_text="Weight bits").locator("input[type='range']")
    slider.focus()
    for _ in range(6):  # 8 -> 2 bits, one option per key press
        page.keyboard.press("ArrowLeft")
    page.wait_for_url("**weight_bits=2**", timeout=60_000)
    settle(page)
    after = sidebar_metric(page, "Quantized accuracy")
    assert after != before
    assert after == percent_for(pretrained, mnist, QuantConfig(weight_bits=2))

    shared = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()  # a fresh session
    shared.goto(f"{server}/accuracy?weight_bits=4&act_bits=4&observer=percentile")
    settle(shared)
    sliders = shared.locator("[data-testid='stSlider']")
    assert sliders.filter(has_text="Weight bits").locator("[data-testid='stSliderThumbValue']").inner_text() == "4"
    assert sliders.filter(has_text="Activation bits").locator("[data-testid='stSliderThumbValue']").inner_text() == "4"
    expected = percent_for(pretrained, mnist, QuantConfig(weight_bits=4, act_bits=4, observer="percentile"))
    assert sidebar_metric(shared, "Quantized accuracy") == expected
    shared.screenshot(path=str(SHOTS / "shared_url.png"), full_page=True)
