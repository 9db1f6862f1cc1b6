"""Hostile uploads through the command line (issue 34): every file of tests/hostile_files.py, each in a fresh
`python -m qcore evaluate --checkpoint FILE --json` process as a user runs it, with its exit code, wall time
and the process's own peak RSS (VmHWM: torch's import included). The refused files must exit 2
within 10 s under 1.5 GB; the files with hostile names must import and evaluate.

    QCORE_DATA_DIR=../shared/data python bench/bench_hostile.py [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import emit  # noqa: E402

from tests.hostile_files import LEGITIMATE, REFUSED  # noqa: E402


def run_once(folder: Path) -> dict[str, object]:
    """The one file in `folder` through `qcore evaluate --json` in a fresh process, which reports its own peak
    RSS (tests.hostile_files.own_peak_rss_bytes: os.wait4's figure would start from this process's)."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "tests.hostile_files", str(folder)], cwd=ROOT, capture_output=True, text=True
    )
    seconds = round(time.perf_counter() - started, 2)
    if done.returncode != 0:
        raise SystemExit(f"the runner failed on {folder}: {done.stderr.strip()[-300:]}")
    report = json.loads(done.stdout)
    (result,) = report["files"].values()
    message = str(result["stderr"])
    return {
        "exit": result["exit"],
        "seconds": seconds,
        "evaluate_seconds": result["seconds"],
        "peak_rss_mb": round(report["peak_rss_bytes"] / 2**20),
        "stderr_lines": len(message.splitlines()),
        "message": message[:400],
    }


def plan_largest_graph() -> dict[str, float]:
    """Issue 35: quantization planning grew as the cube of the adds (800 adds, 25.5 s). The largest graph
    the import's bounds allow, all adds: its conversion, trace and plan, timed in this process."""
    from qcore.graph import model_graph
    from qcore.models.onnx_import import MAX_OPERATIONS, onnx_module, read_onnx
    from qcore.quantize.config import QuantConfig
    from qcore.quantize.qmodel import config_plan
    from tests.hostile_files import _chain

    adds = MAX_OPERATIONS - 3  # then the pool, the flatten and the Gemm
    started = time.perf_counter()
    module, _ = onnx_module(read_onnx(_chain("Add", adds)))
    converted = time.perf_counter()
    graph = model_graph(module)
    traced = time.perf_counter()
    config_plan(graph, QuantConfig())
    planned = time.perf_counter()
    return {
        "operations": len(graph.ops) - 1,
        "adds": adds,
        "convert_s": round(converted - started, 4),
        "trace_s": round(traced - converted, 4),
        "plan_s": round(planned - traced, 5),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json-out")
    args = parser.parse_args()
    # name -> (builder, suffix, expected, the phrase its refusal must contain)
    files = {name: (build, suffix, "refused", phrase) for name, (build, suffix, phrase) in REFUSED.items()}
    files |= {name: (build, ".onnx", "imports", "") for name, build in LEGITIMATE.items()}
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for index, (name, (build, suffix, expected, phrase)) in enumerate(files.items()):
            one_file = Path(folder) / f"{index:02d}"
            one_file.mkdir()
            data = build()
            (one_file / f"{index:02d}{suffix}").write_bytes(data)
            row = {"file": name, "bytes": len(data), "expected": expected, **run_once(one_file)}
            row["ok"] = (
                row["exit"] == 2
                and row["stderr_lines"] == 1
                and phrase in str(row["message"])
                and row["seconds"] < 10
                and row["peak_rss_mb"] < 1536
                if expected == "refused"
                else row["exit"] == 0
            )
            rows.append(row)
            print(
                f"{name:48} {expected:8} exit {row['exit']}  {row['seconds']:6.2f} s  {row['peak_rss_mb']:5} MB  "
                f"{'ok' if row['ok'] else 'FAIL'}",
                flush=True,
            )
    planning = plan_largest_graph()
    print(
        f"the largest graph the bounds allow ({planning['operations']} operations, {planning['adds']} adds): "
        f"converted {planning['convert_s']:.3f} s, traced {planning['trace_s']:.3f} s, "
        f"planned {planning['plan_s']:.4f} s"
    )
    refused = [row for row in rows if row["expected"] == "refused"]
    emit(
        {
            "bench": "hostile",
            "rows": rows,
            "refused_max_seconds": max(row["seconds"] for row in refused),
            "refused_max_peak_rss_mb": max(row["peak_rss_mb"] for row in refused),
            "all_ok": all(row["ok"] for row in rows),
            "largest_graph": planning,
        },
        args.json_out,
    )


if __name__ == "__main__":
    main()
