"""Serving a class (issue 20): deploy/serve's replicas behind HAProxy, sticky sessions through it, the
shared result store, a first answer before the full one, and every process stopped on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import TEST_STORE
from tests.serving import IDLE, ROOT, chromium, free_port
from ui.protocol import open_page, open_pages_at_once, sticky_cookie, wait_healthy

pytestmark = pytest.mark.browser
SERVE = ROOT / "deploy" / "serve"


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


@contextmanager
def serve(
    tmp_path: Path, replicas: int = 2, env: dict[str, str] | None = None, store: Path | None = None
) -> Iterator[tuple[str, subprocess.Popen]]:
    port = free_port()
    log = open(tmp_path / "serve.out", "w")  # noqa: SIM115 - closed below, after the process
    process = subprocess.Popen(
        [sys.executable, str(SERVE), str(port), "--replicas", str(replicas),
         "--store", str(store or tmp_path / "store"), "--datasets", str(tmp_path / "datasets"),
         "--log-dir", str(tmp_path / "logs")],
        cwd=ROOT, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, [process], 180)
        while "serving http://" not in (tmp_path / "serve.out").read_text():  # its replicas are warm
            assert process.poll() is None
            time.sleep(0.2)
        yield base, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
        log.close()


def _replica_address(logs: Path, replica: str) -> str:
    """Where replica `replica` ('r0') listens, as haproxy.cfg names it: '127.0.0.1:PORT'."""
    line = next(row for row in (logs / "haproxy.cfg").read_text().splitlines() if f"server {replica} " in row)
    return line.split()[2]


def _replica_pid(serve_pid: int, logs: Path, replica: str) -> int:
    """The pid of replica `replica`, found by the port haproxy.cfg gives it in its command line."""
    port = _replica_address(logs, replica).split(":")[1]
    for pid in _children(serve_pid):
        arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"--server.port" in arguments and arguments[arguments.index(b"--server.port") + 1] == port.encode():
            return pid
    raise AssertionError(f"no process serves {replica}")


async def _kill_mid_computation(base: str, serve_pid: int, logs: Path, link: str) -> float:
    """Ask replica r0 for a new result, kill -9 it while it computes; when it was killed."""
    asking = asyncio.create_task(open_page(base, "accuracy", link, cookie="QLAB_REPLICA=r0"))
    await asyncio.sleep(3)  # r0 is computing
    assert not asking.done()
    os.kill(_replica_pid(serve_pid, logs, "r0"), signal.SIGKILL)
    killed = time.perf_counter()
    with pytest.raises(Exception):  # noqa: B017, PT011 - the dead replica's websocket closes, however
        await asking
    return killed


@pytest.mark.slow
def test_replicas_behind_haproxy_share_results_outlive_a_killed_one_and_stop_together(tmp_path, mnist):
    """One deploy/serve with two replicas (each start is ~10 s of two cores, so one test walks it all):
    - sessions spread over both (each page load is sent a replica cookie), an upload through the balancer is
      the uploading browser's model on every page (its websocket and its upload reached the same replica),
      and a result one replica computed is read from the store by the other;
    - issue 35: kill -9 of the replica computing a new what-if used to stop deploy/serve and every
      student's server, and left its lock in the store for 15 minutes. Now the server keeps serving, the
      replica is started again, and a session asking for the same result gets it well within those 15
      minutes: 22 s after the kill on a quiet 2-core machine, 42 s on a loaded one (CI's machines vary by
      3x), so the bound is 2 minutes, far below the 15 minutes the old lock held the result;
    - SIGTERM then stops every process deploy/serve started, the replaced replica among them."""
    import torch

    from qcore.models.checkpoint import checkpoint_bytes, fingerprint
    from qcore.models.net import Net

    logs = tmp_path / "logs"
    with serve(tmp_path) as (base, process):
        assert len(_children(process.pid)) == 3  # two Streamlit replicas and HAProxy
        cookies = {sticky_cookie(base) for _ in range(6)}
        assert {c.split("QLAB_REPLICA=")[1].split(";")[0] for c in cookies} == {"r0", "r1"}
        # one new link computed by one replica, then asked of both: the second is the store's answer
        link = "weight_bits=5&act_bits=5&seed=77"
        first = asyncio.run(open_page(base, "accuracy", link, cookie="QLAB_REPLICA=r0"))
        both = asyncio.run(open_pages_at_once(base, [("accuracy", link)] * 4))
        assert first.exceptions == 0 and all(run.exceptions == 0 for run in both)
        assert max(run.seconds for run in both) < first.seconds  # nobody computed it again
        assert any("r1" in run.cookie for run in both)

        torch.manual_seed(3)
        uploaded = Net()
        with chromium() as browser:
            page = browser.new_context(viewport={"width": 1400, "height": 1600}).new_page()
            page.goto(f"{base}/model")
            page.wait_for_selector(IDLE, timeout=120_000)
            page.get_by_role("tab", name="Upload a checkpoint").click()
            page.locator("[data-testid='stFileUploaderDropzoneInput']").set_input_files(
                {"name": "mine.pt", "mimeType": "application/octet-stream", "buffer": checkpoint_bytes(uploaded)}
            )
            main = "document.querySelector(\"[data-testid='stMain']\")"  # the model card names its fingerprint
            page.wait_for_function(f"() => {main}?.innerText.includes('{fingerprint(uploaded)}')", timeout=120_000)
            for title in ("Activations", "Accuracy", "Deploy", "One number"):
                page.locator("[data-testid='stSidebarNavLink']").filter(has_text=title).click()
                page.wait_for_timeout(300)
                page.wait_for_selector(IDLE, timeout=120_000)
                assert "Model: uploaded mine.pt" in page.locator("[data-testid='stSidebar']").inner_text(), title
                assert page.locator("[data-testid='stException']").count() == 0

        # a report nothing else computes, several seconds alone: the residual net's float and bias-corrected
        link = "model=fashion-resnet&weight_bits=5&act_bits=7&methods=bias-correction&seed=91"
        killed = asyncio.run(_kill_mid_computation(base, process.pid, logs, link))
        again = asyncio.run(open_page(base, "accuracy", link, cookie="QLAB_REPLICA=r0"))
        waited = time.perf_counter() - killed
        assert again.exceptions == 0 and process.poll() is None
        assert waited < 120, f"the result came {waited:.1f} s after the kill"
        deadline = time.monotonic() + 120
        while "replica 0 exited (code -9); restarting it" not in (tmp_path / "serve.out").read_text():
            assert time.monotonic() < deadline
            time.sleep(0.5)
        replaced = _replica_pid(process.pid, logs, "r0")
        wait_healthy("http://" + _replica_address(logs, "r0"), [], 120)
        back = asyncio.run(open_page(base, "", "", cookie="QLAB_REPLICA=r0"))  # the replica serves again
        assert back.exceptions == 0 and Path(f"/proc/{replaced}").exists()
        print(f"the same result {waited:.1f} s after the kill")

        started = sorted(_children(process.pid))
        assert replaced in started and len(started) == 3
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    time.sleep(0.5)
    assert not [pid for pid in started if Path(f"/proc/{pid}").exists()]  # every process it started is gone


@pytest.mark.slow
def test_without_haproxy_it_says_so_and_serves_one_process(tmp_path):
    with serve(tmp_path, env={"QLAB_HAPROXY": ""}) as (base, process):  # as on a machine without it
        assert len(_children(process.pid)) == 1
        run = asyncio.run(open_page(base, "", ""))
        assert run.exceptions == 0
    assert (
        "HAProxy is not installed (apt-get install haproxy): serving ONE Streamlit process"
        in (tmp_path / "serve.out").read_text()
    )


@pytest.mark.slow
def test_a_new_what_if_shows_a_labelled_first_answer_then_the_full_one(tmp_path):
    """In a real browser: a new config's first accuracy on 1,000 test images, with its interval and its
    slice named, then the full 10,000-image figure in its place. On fashion-resnet, whose full report
    takes seconds: the bundled net's now takes about one, and its first answer could come and go
    between two looks of the browser's."""
    from qcore.analysis.tables import quantize_for
    from qcore.data import load_dataset
    from qcore.inference.evaluate import evaluate, slice_estimate
    from qcore.models.checkpoint import load_model
    from qcore.quantize.config import QuantConfig

    data, model = load_dataset("fashion-mnist", download=False), load_model(None, "fashion-resnet")
    qnet = quantize_for(model, data, QuantConfig(act_bits=7))
    first = slice_estimate(qnet, data.test, 1000)
    full = f"{100 * evaluate(qnet, data.test).accuracy:.2f}%"
    # the session's store: the page opens on fashion-resnet's defaults, which the browser walks computed
    # (10 s here otherwise); W8A7 is asked of no other test, so it is a new what-if
    with serve(tmp_path, replicas=1, store=Path(TEST_STORE)) as (base, _process), chromium() as browser:
        page = browser.new_page(viewport={"width": 1400, "height": 1600})
        page.goto(f"{base}/accuracy?model=fashion-resnet")
        page.wait_for_selector(IDLE, timeout=120_000)
        slider = page.locator("[data-testid='stSidebar'] [data-testid='stSlider']").filter(has_text="Activation bits")
        slider.locator("input[type='range']").focus()
        changed = time.perf_counter()
        page.keyboard.press("ArrowLeft")  # 8 -> 7
        answer = page.get_by_text("First answer: quantized accuracy", exact=False)
        answer.wait_for(timeout=60_000)
        shown = time.perf_counter() - changed
        text = answer.inner_text()
        assert f"{100 * first.accuracy:.1f}% (95% interval {100 * first.low:.1f} to {100 * first.high:.1f}%)" in text
        assert "measured on the first 1,000 of the 10,000 test images" in text
        answer.wait_for(state="detached", timeout=120_000)
        page.wait_for_selector(IDLE, timeout=120_000)
        metric = page.locator("[data-testid='stSidebar'] [data-testid='stMetric']").filter(
            has_text="Quantized accuracy"
        )
        assert metric.locator("[data-testid='stMetricValue']").inner_text().strip() == full
        print(f"first answer {shown:.2f} s after the change")
