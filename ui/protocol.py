"""A Streamlit session without a browser: the websocket protocol a browser speaks, for warming a
replica before it serves (deploy/serve), timing the server alone (bench/bench_class.py) and testing
the serving setup.

A session connects to /_stcore/stream (subprotocol "streamlit"), asks for a script run with a BackMsg
`rerun_script` (the page and the URL's query string, as a browser's first message does), and reads
ForwardMsgs until `script_finished` (a run that ends early for a rerun is followed by the rerun's own).
Its time is from the request to that message; exception elements are counted.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass

import websockets
from streamlit.proto.BackMsg_pb2 import BackMsg
from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

STREAM = "/_stcore/stream"
HEALTH = "/_stcore/health"


def wait_healthy(base: str, processes: Sequence[subprocess.Popen] = (), seconds: float = 120) -> None:
    """Until `base`'s health check answers "ok"; RuntimeError when one of `processes` (the server's)
    stops first or `seconds` pass."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(base + HEALTH, timeout=2) as answer:
                if answer.read().strip() == b"ok":
                    return
        except OSError:
            pass
        if any(process.poll() is not None for process in processes):
            raise RuntimeError(f"{base}: a server process stopped while starting; see its log")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{base} did not answer its health check within {seconds:.0f} s")
        time.sleep(0.2)


@dataclass(frozen=True)
class Run:
    seconds: float  # from the rerun request to script_finished
    exceptions: int  # exception elements the run drew
    texts: tuple[str, ...]  # the markdown and text elements it drew (for checks)
    status: int  # ForwardMsg.ScriptFinishedStatus
    cookie: str  # the balancer's sticky cookie the session was sent with ("" without one)


def sticky_cookie(base: str) -> str:
    """What a browser's first GET of the page sets (HAProxy's replica cookie behind deploy/serve)."""
    with urllib.request.urlopen(base + "/", timeout=30) as answer:
        cookies = [value.split(";", 1)[0] for key, value in answer.headers.items() if key.lower() == "set-cookie"]
    return "; ".join(cookies)


async def open_page(base: str, page: str = "", query: str = "", timeout: float = 600, cookie: str = "") -> Run:
    """One new session asking for `page` (its URL path; "" the default page) with `query` (the URL's
    query string, without "?"), timed to the end of its script run."""
    url = base.replace("http://", "ws://").replace("https://", "wss://") + STREAM
    headers = {"Cookie": cookie} if cookie else {}
    async with websockets.connect(url, subprotocols=["streamlit"], additional_headers=headers, max_size=None) as ws:
        request = BackMsg()
        request.rerun_script.query_string = query
        request.rerun_script.page_name = page
        began = time.perf_counter()
        await ws.send(request.SerializeToString())
        exceptions, texts = 0, []
        while True:
            message = ForwardMsg()
            message.ParseFromString(await asyncio.wait_for(ws.recv(), timeout))
            kind = message.WhichOneof("type")
            if kind == "delta" and message.delta.WhichOneof("type") == "new_element":
                element = message.delta.new_element
                which = element.WhichOneof("type")
                exceptions += which == "exception"
                if which == "markdown":
                    texts.append(element.markdown.body)
                elif which == "text":
                    texts.append(element.text.body)
            elif kind == "script_finished" and message.script_finished != ForwardMsg.FINISHED_EARLY_FOR_RERUN:
                return Run(time.perf_counter() - began, exceptions, tuple(texts), message.script_finished, cookie)


async def open_pages_at_once(base: str, requests: list[tuple[str, str]], timeout: float = 600) -> list[Run]:
    """Many sessions at the same moment, each (page, query); each gets the balancer's cookie first, as
    each browser would."""
    cookies = await asyncio.gather(*(asyncio.to_thread(sticky_cookie, base) for _ in requests))
    return list(
        await asyncio.gather(
            *(
                open_page(base, page, query, timeout, cookie)
                for (page, query), cookie in zip(requests, cookies, strict=True)
            )
        )
    )
