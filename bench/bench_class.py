"""A class at once, measured at the server: sessions that speak Streamlit's websocket protocol (no
browser; ui/protocol.py), so the numbers are the server's alone, not chromium's on the same cores.

Two setups in one run, each with a fresh result store: one `streamlit run` process (the store off, as
before deploy/serve), and `deploy/serve` (one replica per core behind HAProxy, sharing the store). For
each, on the Accuracy page:
- one session opening a new what-if link alone;
- N sessions opening one new link at once, then N opening it again (already computed);
- 6 sessions opening 6 different new links at once;
- a mix following a lesson: N sessions each opening the tour, the Model page and One number in turn;
with p50, p95 and max seconds (request to script_finished), exception elements, the serving processes'
CPU seconds per session and the peak RSS of all of them together; ratios to one session alone in the
same run. Then the restart: deploy/serve stopped and started again on its store, the first visitor to
the default page against the first visitor to a bare Streamlit page started the same way.

    QCORE_DATA_DIR=../shared/data python bench/bench_class.py --sessions 30 --json-out bench/results/class.json
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import emit  # noqa: E402
from tests.serving import free_port  # noqa: E402
from ui.protocol import open_page, open_pages_at_once, sticky_cookie, wait_healthy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BARE_APP = 'import streamlit as st\nst.title("A bare page")\nst.write("hello")\n'


def _tree(pid: int) -> list[int]:
    """`pid` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    return found


def _cpu_seconds(pids: list[int]) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
    return total


def _memory_bytes(pids: list[int]) -> tuple[int, int]:
    """(RSS, PSS) summed over `pids`. RSS counts a page every process maps (torch's libraries, shared by
    the replicas) once per process; PSS divides each shared page among its processes."""
    rss = pss = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
        except OSError:
            continue
    return rss, pss


class Sampler:
    """The serving tree's peak RSS, sampled every 0.1 s while it runs."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self.peak_pss, self.stopped = pid, 0, 0, threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stopped.is_set():
            rss, pss = _memory_bytes(_tree(self.pid))
            self.peak, self.peak_pss = max(self.peak, rss), max(self.peak_pss, pss)
            time.sleep(0.1)

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stopped.set()
        self.thread.join()


@contextmanager
def serving(kind: str, store: Path, logs: Path, app: Path | None = None):
    """A fresh server of `kind` ("one process" or "deploy/serve"), yielding (base URL, its pid)."""
    port = free_port()
    env = {**os.environ, "MALLOC_ARENA_MAX": "2"}
    if kind == "deploy/serve":
        command = [
            sys.executable,
            str(ROOT / "deploy" / "serve"),
            str(port),
            "--store",
            str(store),
            "--datasets",
            str(store / "shared-datasets"),  # inside the temporary store: removed with it
            "--log-dir",
            str(logs),
        ]
    else:
        env.pop("QCORE_RESULT_STORE", None)
        command = [
            sys.executable, "-m", "streamlit", "run", str(app or ROOT / "app.py"), "--server.port", str(port),
            "--server.address", "127.0.0.1", "--server.headless", "true",
        ]  # fmt: skip
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"{kind.replace('/', '-')}.out", "w") as output:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_healthy(base, [process], 180)
            while kind == "deploy/serve" and "serving http://" not in (logs / "deploy-serve.out").read_text():
                time.sleep(0.2)  # until it says it serves: its replicas are warm then
            yield base, process.pid
        finally:
            process.terminate()
            process.wait(timeout=60)


def _summary(runs: list, cpu: float, peak: int, peak_pss: int) -> dict[str, float]:
    seconds = sorted(run.seconds for run in runs)
    return {
        "sessions": len(runs),
        "p50": statistics.median(seconds),
        "p95": seconds[min(len(seconds) - 1, round(0.95 * (len(seconds) - 1)))],
        "max": seconds[-1],
        "exceptions": sum(run.exceptions for run in runs),
        "cpu_per_session": cpu / len(runs),
        "peak_rss_gb": peak / 1e9,
        "peak_pss_gb": peak_pss / 1e9,
    }


def _measure(base: str, pid: int, requests: list[tuple[str, str]]) -> dict[str, float]:
    before = _cpu_seconds(_tree(pid))
    with Sampler(pid) as sampler:
        runs = asyncio.run(open_pages_at_once(base, requests))
    return _summary(runs, _cpu_seconds(_tree(pid)) - before, sampler.peak, sampler.peak_pss)


def _lesson(base: str, pid: int, sessions: int) -> dict[str, float]:
    """Each session opens the tour, the Model page and One number in turn, all sessions at once."""

    async def walk(cookie: str) -> list:
        return [await open_page(base, page, "", 600, cookie) for page in ("tour", "", "one_number")]

    async def everyone() -> list:
        cookies = await asyncio.gather(*(asyncio.to_thread(sticky_cookie, base) for _ in range(sessions)))
        return [run for runs in await asyncio.gather(*(walk(c) for c in cookies)) for run in runs]

    before = _cpu_seconds(_tree(pid))
    with Sampler(pid) as sampler:
        runs = asyncio.run(everyone())
    return _summary(runs, _cpu_seconds(_tree(pid)) - before, sampler.peak, sampler.peak_pss)


def measure_setup(kind: str, sessions: int, logs: Path, seed: int) -> dict[str, object]:
    rng = random.Random(seed)
    links = [
        f"weight_bits={rng.randint(3, 8)}&act_bits={rng.randint(3, 8)}&seed={rng.randint(1, 10**6)}" for _ in range(8)
    ]
    with (
        tempfile.TemporaryDirectory(prefix="qlab-store-") as store,
        serving(kind, Path(store), logs / kind.replace("/", "-")) as (base, pid),
    ):
        asyncio.run(open_page(base, "accuracy", ""))  # warm: imports, the data, the float model, the default config
        rows: dict[str, object] = {"setup": kind}
        rows["one new what-if alone"] = _measure(base, pid, [("accuracy", links[0])])
        rows[f"{sessions} sessions, the same new link"] = _measure(base, pid, [("accuracy", links[1])] * sessions)
        rows[f"{sessions} sessions, a link already computed"] = _measure(base, pid, [("accuracy", links[1])] * sessions)
        rows["6 sessions, 6 new links"] = _measure(base, pid, [("accuracy", link) for link in links[2:8]])
        rows[f"{sessions} sessions following a lesson"] = _lesson(base, pid, sessions)
    return rows


def measure_restart(logs: Path) -> dict[str, float]:
    """deploy/serve stopped and started again on its store: the first visitor to the default page,
    against the first visitor to a bare Streamlit page started the same way (same run, same machine)."""
    with tempfile.TemporaryDirectory(prefix="qlab-store-") as store:
        with serving("deploy/serve", Path(store), logs / "restart-1") as (base, _pid):
            asyncio.run(open_page(base, "", ""))  # the default page's results go into the store
        with serving("deploy/serve", Path(store), logs / "restart-2") as (base, _pid):
            ours = asyncio.run(open_page(base, "", "", cookie=sticky_cookie(base)))
    with tempfile.TemporaryDirectory() as folder:
        bare_app = Path(folder) / "bare.py"
        bare_app.write_text(BARE_APP)
        with serving("one process", Path(folder), logs / "bare", bare_app) as (base, _pid):
            bare = asyncio.run(open_page(base, "", ""))
    return {
        "first visitor after a restart": ours.seconds,
        "bare Streamlit page": bare.seconds,
        "extra": ours.seconds - bare.seconds,
    }


def table(result: dict[str, object]) -> str:
    lines = []
    setups = result["setups"]
    assert isinstance(setups, list)
    for rows in setups:
        alone = rows["one new what-if alone"]["max"]
        lines.append(f"{rows['setup']}:")
        lines.append(
            f"  {'measurement':<42} {'p50':>6} {'p95':>6} {'max':>6} {'x alone':>8} {'CPU/sess':>9} {'RSS GB':>7} exc"
        )
        for name, row in rows.items():
            if name == "setup":
                continue
            lines.append(
                f"  {name:<42} {row['p50']:6.2f} {row['p95']:6.2f} {row['max']:6.2f} {row['max'] / alone:7.2f}x "
                f"{row['cpu_per_session']:9.3f} {row['peak_rss_gb']:7.2f} {row['peak_pss_gb']:7.2f} {row['exceptions']}"
            )
    restart = result.get("restart")
    if restart:
        lines.append(
            f"restart of deploy/serve: first visitor {restart['first visitor after a restart']:.2f} s, bare Streamlit "
            f"page {restart['bare Streamlit page']:.2f} s: {restart['extra']:+.2f} s"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=30)
    parser.add_argument("--setups", default="one process,deploy/serve")
    parser.add_argument("--skip-restart", action="store_true")
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--json-out")
    args = parser.parse_args()
    logs = ROOT / "artifacts" / "bench_class"
    result: dict[str, object] = {"sessions": args.sessions, "cores": os.cpu_count(), "setups": []}
    for kind in args.setups.split(","):
        result["setups"].append(measure_setup(kind, args.sessions, logs, args.seed))  # type: ignore[union-attr]
    if not args.skip_restart:
        result["restart"] = measure_restart(logs)
    print(table(result))
    emit(result, args.json_out)


if __name__ == "__main__":
    main()
