"""Abandoned work on a real server: sessions that ask for long work and then close their tabs.

A fresh `streamlit run app.py` (MALLOC_ARENA_MAX=2, as docs/serving.md serves a class) is warmed by one
session; then N browser sessions each ask for long new work and close their tabs after --hold
seconds: every other one opens Diagnose (a diagnosis that shows progress), the others Accuracy with
AdaRound (a report that shows nothing until done), each on a config of its own; the gate runs two
at a time, the rest wait in line. From the moment the last tab closed: how long the server keeps
computing (CPU time from /proc every 0.25 s; idle = under 10% of a core for a whole second), its
memory then against warm, and how long a later visitor waits for a new what-if.

With --uploads N (issue 35), N sessions instead upload the heaviest ONNX model the import's bounds let
through (four 3x3 convolutions of 64 channels, 87M multiply-adds an image) and close their tabs during its
import and arrival check.

    QCORE_DATA_DIR=../shared/data python bench/bench_abandoned.py [--sessions 8] [--hold 4] [--json-out FILE]
    QCORE_DATA_DIR=../shared/data python bench/bench_abandoned.py --uploads 2 --hold 1.5
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import emit  # noqa: E402

from tests.serving import IDLE, chromium, streamlit_process  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
CONFIGS = [(w, a) for w in (2, 3, 4, 5) for a in (3, 4, 5)]  # new configs, none the default


def abandoned_link(index: int, weight_bits: int, act_bits: int) -> str:
    if index % 2 == 0:
        return f"diagnose?weight_bits={weight_bits}&act_bits={act_bits}"
    return f"accuracy?weight_bits={weight_bits}&act_bits={act_bits}&methods=adaround"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def rss_gb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024**2
    raise RuntimeError("no VmRSS")


def seconds_until_idle(pid: int, limit: float) -> float:
    """From now until the server used under 10% of a core over a whole second (four 0.25 s samples)."""
    started = time.monotonic()
    samples = [(time.monotonic(), cpu_seconds(pid))]
    while time.monotonic() - started < limit:
        time.sleep(0.25)
        samples.append((time.monotonic(), cpu_seconds(pid)))
        if len(samples) >= 5:
            (t0, c0), (t1, c1) = samples[-5], samples[-1]
            if (c1 - c0) / (t1 - t0) < 0.1:
                return t0 - started
    return float("inf")


def time_new_whatif(browser, base: str, query: str) -> float:
    page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
    started = time.monotonic()
    page.goto(f"{base}/accuracy?{query}")
    page.locator("[data-testid='stSidebar'] [data-testid='stMetric']").filter(has_text="Quantized accuracy").wait_for(
        timeout=600_000
    )
    page.wait_for_selector(IDLE, timeout=600_000)
    seconds = time.monotonic() - started
    page.context.close()
    return seconds


def heaviest_import() -> bytes:
    """Four 3x3 convolutions of 64 channels with ReLUs, global pooling and a Gemm: 87M multiply-adds an image
    (the bound is 100M), 0.4 MB (the upload limit is 2 MB)."""
    from onnx import helper

    from tests.hostile_files import _model, _weights

    nodes, inits, source, channels = [], [], "image", 1
    for i in range(4):
        inits.append(_weights(f"w{i}", (64, channels, 3, 3), i))
        nodes.append(helper.make_node("Conv", [source, f"w{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"))
        source, channels = f"r{i}", 64
    nodes += [
        helper.make_node("GlobalAveragePool", [source], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w"], ["scores"], name="fc", transB=1),
    ]
    return _model(nodes, [*inits, _weights("fc_w", (10, 64), 9)])


def open_abandoned_tabs(browser, base: str, args: argparse.Namespace) -> list:
    tabs = []
    if args.uploads:
        heavy = heaviest_import()
        for _ in range(args.uploads):
            page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
            page.goto(base)
            page.wait_for_selector(IDLE, timeout=120_000)
            page.get_by_role("tab", name="Upload a checkpoint").click()
            page.locator("[data-testid='stFileUploaderDropzoneInput']").set_input_files(
                {"name": "heavy.onnx", "mimeType": "application/octet-stream", "buffer": heavy}
            )
            tabs.append(page)
        return tabs
    for index, (weight_bits, act_bits) in enumerate(CONFIGS[: args.sessions]):
        page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
        page.goto(f"{base}/{abandoned_link(index, weight_bits, act_bits)}", wait_until="commit")
        tabs.append(page)
    return tabs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--hold", type=float, default=4.0, help="seconds each tab stays open")
    parser.add_argument("--uploads", type=int, default=0, help="sessions that upload a heavy ONNX model instead")
    parser.add_argument("--json-out")
    args = parser.parse_args()
    if not 1 <= args.sessions <= len(CONFIGS):
        parser.error(f"--sessions must be between 1 and {len(CONFIGS)}")
    with streamlit_process("bench_abandoned.log", {"MALLOC_ARENA_MAX": "2"}) as (base, process), chromium() as browser:
        pid = process.pid
        time_new_whatif(browser, base, "weight_bits=7&act_bits=7")  # warms the server (imports, data, float)
        seconds_until_idle(pid, 60)
        alone = time_new_whatif(browser, base, "weight_bits=6&act_bits=7")
        seconds_until_idle(pid, 60)
        warm_gb = rss_gb(pid)
        tabs = open_abandoned_tabs(browser, base, args)
        time.sleep(args.hold - 0.5)
        before = cpu_seconds(pid)
        time.sleep(0.5)
        busy_at_close = (cpu_seconds(pid) - before) / 0.5  # cores in use as the tabs close
        for page in tabs:
            page.context.close()
        busy = seconds_until_idle(pid, 600)
        after_gb = rss_gb(pid)
        later = time_new_whatif(browser, base, "weight_bits=6&act_bits=6")
    rows = [
        ("cores the server used as the tabs closed", busy_at_close),
        ("server busy after the last tab closed (s)", busy),
        ("server memory, warm (GB)", warm_gb),
        ("server memory once idle after the burst (GB)", after_gb),
        ("memory above warm (GB)", after_gb - warm_gb),
        ("a new what-if alone, before the burst (s)", alone),
        ("a new what-if right after the burst (s)", later),
    ]
    width = max(len(name) for name, _ in rows)
    what = (
        f"{args.uploads} sessions uploaded the heaviest import the bounds allow"
        if args.uploads
        else f"{args.sessions} sessions opened Diagnose or AdaRound on new configs"
    )
    print(f"{what}, closed their tabs after {args.hold:g} s")
    for name, value in rows:
        print(f"{name:<{width}}  {value:8.2f}")
    emit(
        {
            "sessions": args.uploads or args.sessions,
            "uploads": bool(args.uploads),
            "hold_seconds": args.hold,
            "busy_after_close_seconds": busy,
            "cores_in_use_at_close": busy_at_close,
            "warm_rss_gb": warm_gb,
            "idle_rss_gb_after_burst": after_gb,
            "whatif_alone_seconds": alone,
            "whatif_after_burst_seconds": later,
            "whatif_delay_ratio": later / alone,
        },
        args.json_out,
    )


if __name__ == "__main__":
    main()
