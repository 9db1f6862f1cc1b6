"""What a user sees: real chromium against a real `streamlit run app.py`, on the Accuracy page.

Measures, in one run, next to qcore's own float eval of the 10k test set:
  cold start         server start (process launch) to the first page fully rendered, a deep link
  new config         a sidebar change to a settled page, for a config not computed yet
  cached config      the same, for a config computed before
  10 same            10 new browser sessions opening the same new config at once, over one alone
  6 distinct         6 sessions opening 6 different new configs at once, over one alone
  peak RSS           the server's peak resident memory during the concurrent rows
  training           one epoch in the app (click to "now the current model") over `python -m qcore train`

    QCORE_DATA_DIR=../shared/data python bench/bench_browser.py [--json-out bench/results/browser.json]

Goals (issue 9): cold start <= 3x float eval; new config <= 1.2x; cached <= 0.3 s; 10 same <= 2x one
alone; 6 distinct <= 5x one alone; peak RSS <= 2 GB; training <= 1.1x the CLI.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import emit, float_eval_seconds  # noqa: E402

from tests.serving import IDLE, chromium, streamlit_process  # noqa: E402

STATE = "document.querySelector(\"[data-testid='stApp']\")?.getAttribute('data-test-script-state')"
VIEWPORT = {"width": 1400, "height": 1200}
GOALS = {
    "cold_start_over_float_eval": 3.0,
    "new_config_over_float_eval": 1.2,
    "cached_config_seconds": 0.3,
    "ten_same_over_one": 2.0,
    "six_distinct_over_one": 5.0,
    "peak_rss_gb": 2.0,
    "training_app_over_cli": 1.1,
}


def rendered(page, timeout_ms: int = 60_000, charts: bool = True) -> None:
    """The script run is over and the page's charts (where it has some) are drawn."""
    page.wait_for_selector(IDLE, timeout=timeout_ms)
    page.wait_for_selector("[data-testid='stMetricValue']", timeout=timeout_ms)
    if charts:
        page.wait_for_function(
            "() => document.querySelectorAll('.js-plotly-plot .main-svg').length > 0", timeout=timeout_ms
        )


def after_change(page, change) -> float:
    """Seconds from a widget change until its script run has finished and the page is drawn."""
    started = time.perf_counter()
    change()
    try:  # a run starts within a few frames; a very fast one may have finished before we look
        page.wait_for_function(f"() => {STATE} === 'running'", timeout=3000, polling=10)
    except Exception:  # noqa: BLE001 - playwright's TimeoutError: the run was already over
        pass
    page.wait_for_function(f"() => {STATE} === 'notRunning'", timeout=60_000, polling=10)
    page.wait_for_function("() => document.querySelectorAll('.js-plotly-plot .main-svg').length > 0")
    return time.perf_counter() - started


def set_seed(page, seed: int) -> None:
    box = page.get_by_label("Calibration sample seed")
    box.fill(str(seed))
    box.press("Enter")


CPU: dict[str, dict[str, float]] = {}


def open_at_once(browser, urls: list[str], server_pid: int, label: str) -> float:
    """Seconds from opening every URL (each in a new session) until the last one is rendered; the
    server's and chromium's CPU seconds meanwhile go to CPU[label]."""
    pages = [browser.new_context(viewport=VIEWPORT).new_page() for _ in urls]
    with CpuSplit(server_pid) as split:
        started = time.perf_counter()
        for page, url in zip(pages, urls, strict=True):
            page.goto(url, wait_until="commit")
        for page in pages:
            rendered(page)
        elapsed = time.perf_counter() - started
    CPU[label] = {"server_cpu_s": split.server_cpu, "browser_cpu_s": split.browser_cpu, "wall_s": elapsed}
    for page in pages:
        page.context.close()
    return elapsed


TICKS = 100  # /proc/*/stat CPU times are in clock ticks (USER_HZ, 100 on Linux)


def cpu_seconds(match) -> float:
    """User + system CPU seconds of the processes whose command line satisfies `match`."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if match(stat.parent.name, cmdline):
                fields = stat.read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
        except OSError:
            continue
    return total / TICKS


class CpuSplit:
    """CPU seconds spent by the server and by chromium while the block runs: on this machine they
    share the same 2 cores, which a class's browsers (each on its own laptop) would not."""

    def __init__(self, server_pid: int) -> None:
        self.server = lambda pid, cmd: pid == str(server_pid)
        self.browser = lambda pid, cmd: "chrom" in cmd and "--type=" in cmd or cmd.startswith("/usr/lib/chromium")

    def __enter__(self) -> CpuSplit:
        self.server_start, self.browser_start = cpu_seconds(self.server), cpu_seconds(self.browser)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server_cpu = cpu_seconds(self.server) - self.server_start
        self.browser_cpu = cpu_seconds(self.browser) - self.browser_start


class PeakRss:
    """Samples the server process's resident memory every 50 ms while running."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak_kib, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        self.peak_kib = max(self.peak_kib, int(line.split()[1]))
            except OSError:
                return
            time.sleep(0.05)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def cli_epoch_seconds(tmp: Path) -> float:
    out = tmp / "bench_epoch.pt"
    done = subprocess.run(
        [sys.executable, "-m", "qcore", "train", "--epochs", "1", "--out", str(out), "--force", "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    out.unlink(missing_ok=True)
    return float(json.loads(done.stdout)["seconds"])


def app_epoch_seconds(browser, base: str) -> float:
    page = browser.new_context(viewport={"width": 1400, "height": 1600}).new_page()
    page.goto(base)
    rendered(page, charts=False)  # the Model page draws no chart before training
    page.get_by_role("tab", name="Train a new net").click()
    page.get_by_label("Epochs").fill("1")
    page.get_by_label("Epochs").press("Tab")
    started = time.perf_counter()
    page.get_by_role("button", name="Train", exact=True).click()
    page.get_by_text("It is now the current model").wait_for(timeout=600_000)
    elapsed = time.perf_counter() - started
    page.context.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json-out")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument(
        "--server-env", action="append", default=[], metavar="KEY=VALUE", help="set for the server (repeatable)"
    )
    args = parser.parse_args()
    server_env = dict(item.split("=", 1) for item in args.server_env)

    float_eval = statistics.median(float_eval_seconds(args.repeats))
    seconds: dict[str, float] = {"float_eval_10k": float_eval}

    with chromium() as browser:
        launched = time.perf_counter()
        with streamlit_process(log_name="bench_browser.log", extra_env=server_env) as (base, process):
            page = browser.new_context(viewport=VIEWPORT).new_page()
            page.goto(f"{base}/accuracy")
            rendered(page)
            seconds["cold_start"] = time.perf_counter() - launched
            print(f"cold start {seconds['cold_start']:.2f} s", file=sys.stderr)

            page.get_by_text("Calibration and scheme").click()
            new = [after_change(page, lambda s=s: set_seed(page, s)) for s in range(1, args.repeats + 1)]
            # seeds 0..N-1: all computed already (0 is the default, drawn at the cold start), and none is
            # the seed now set (N), so each entry is a real change
            cached = [after_change(page, lambda s=s: set_seed(page, s)) for s in range(args.repeats)]
            seconds["new_config"] = statistics.median(new)
            seconds["cached_config"] = statistics.median(cached)
            print(f"new {new}, cached {cached}", file=sys.stderr)
            page.context.close()

            url = f"{base}/accuracy?seed={{}}"
            with PeakRss(process.pid) as rss:
                pid = process.pid
                seconds["one_alone"] = open_at_once(browser, [url.format(1000)], pid, "one_alone")
                seconds["ten_same"] = open_at_once(browser, [url.format(1001)] * 10, pid, "ten_same")
                seconds["one_alone_again"] = open_at_once(browser, [url.format(1002)], pid, "one_alone_again")
                six = [url.format(1010 + i) for i in range(6)]
                seconds["six_distinct"] = open_at_once(browser, six, pid, "six_distinct")
            peak_gb = rss.peak_kib / 1024**2
            if not args.skip_training:
                seconds["training_epoch_app"] = app_epoch_seconds(browser, base)
    if not args.skip_training:
        seconds["training_epoch_cli"] = cli_epoch_seconds(ROOT / "artifacts")

    one = statistics.mean([seconds["one_alone"], seconds["one_alone_again"]])
    ratios = {
        "cold_start_over_float_eval": seconds["cold_start"] / float_eval,
        "new_config_over_float_eval": seconds["new_config"] / float_eval,
        "ten_same_over_one": seconds["ten_same"] / one,
        "six_distinct_over_one": seconds["six_distinct"] / one,
    }
    if "training_epoch_app" in seconds:
        ratios["training_app_over_cli"] = seconds["training_epoch_app"] / seconds["training_epoch_cli"]
    measured = {**ratios, "cached_config_seconds": seconds["cached_config"], "peak_rss_gb": peak_gb}
    rows = [
        ("server start to first page rendered", "cold_start_over_float_eval", f"{seconds['cold_start']:.2f} s"),
        ("widget change, new config", "new_config_over_float_eval", f"{seconds['new_config']:.2f} s"),
        ("widget change, cached config", "cached_config_seconds", f"{seconds['cached_config']:.2f} s"),
        ("10 sessions, same new config", "ten_same_over_one", f"{seconds['ten_same']:.2f} s"),
        ("6 sessions, 6 new configs", "six_distinct_over_one", f"{seconds['six_distinct']:.2f} s"),
        ("server peak RSS (GB)", "peak_rss_gb", f"{peak_gb:.2f} GB"),
    ]
    if "training_app_over_cli" in ratios:
        rows.append(
            ("one training epoch, app over CLI", "training_app_over_cli", f"{seconds['training_epoch_app']:.1f} s")
        )
    print(f"float eval of the 10k test set: {float_eval:.3f} s; one session alone: {one:.2f} s")
    print(f"{'measurement':<38} {'measured':>10} {'ratio/value':>12} {'goal':>6}  met")
    for label, key, raw in rows:
        value = measured[key]
        print(f"{label:<38} {raw:>10} {value:>12.2f} {GOALS[key]:>6}  {'yes' if value <= GOALS[key] else 'NO'}")
    print("CPU seconds during each concurrent row (server process / chromium, same 2 cores):")
    for label, split in CPU.items():
        wall, server, browser_cpu = split["wall_s"], split["server_cpu_s"], split["browser_cpu_s"]
        print(f"  {label:<16} wall {wall:6.2f}  server {server:6.2f}  chromium {browser_cpu:6.2f}")
    if server_env:
        print(f"server environment: {server_env}")
    emit(
        {"seconds": seconds, "ratios_and_values": measured, "goals": GOALS, "cpu": CPU, "server_env": server_env},
        args.json_out,
    )


if __name__ == "__main__":
    main()
