"""Start `streamlit run app.py` on a free port and Debian's chromium, for browser tests and benches."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ui.protocol import wait_healthy

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
IDLE = "[data-testid='stApp'][data-test-script-state='notRunning']"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def streamlit_server(log_name: str = "streamlit.log", extra_env: dict[str, str] | None = None) -> Iterator[str]:
    """A fresh server process; yields its base URL once /_stcore/health answers (before any page
    has been requested, so the first request a test makes is the server's first)."""
    with streamlit_process(log_name, extra_env) as (base, _process):
        yield base


@contextmanager
def streamlit_process(
    log_name: str = "streamlit.log", extra_env: dict[str, str] | None = None
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Like streamlit_server, also yielding the process (benchmarks sample its memory)."""
    port = free_port()
    log_dir = ROOT / "artifacts"
    log_dir.mkdir(exist_ok=True)
    with open(log_dir / log_name, "w") as output:
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
            env={**os.environ, **(extra_env or {})},
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            try:
                wait_healthy(base, [process], 90)
            except RuntimeError:
                raise RuntimeError(f"streamlit did not start; see {log_dir / log_name}") from None
            yield base, process
        finally:
            process.terminate()
            process.wait(timeout=20)


@contextmanager
def chromium() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: run `bash .ci/setup` (installs Debian's chromium)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
