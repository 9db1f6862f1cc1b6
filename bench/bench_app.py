"""Dashboard responsiveness, measured in one run: the time from a widget change to the rerun
finishing, for a new W8A8 config (not yet computed) and for one already computed, next to the
float eval time of the 10k test set. Runs the real app script through Streamlit's AppTest, on the
Accuracy page (the heaviest: it also draws the flipped digits).

    QCORE_DATA_DIR=../shared/data python bench/bench_app.py [--json-out bench/results/app.json]

Goals (issue 3): new W8A8 config <= 2x float eval; cached config < 0.3 s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import streamlit.testing.v1.app_test as app_test_module  # noqa: E402
from _common import emit, float_eval_seconds  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402

from ui.apptest import NavigationPagesManager  # noqa: E402


def rerun_seconds(at: AppTest, seed: int) -> float:
    at.number_input(key="seed").set_value(seed)
    started = time.perf_counter()
    at.run()
    elapsed = time.perf_counter() - started
    if at.exception:
        raise RuntimeError(at.exception[0].message)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json-out")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    float_times = float_eval_seconds(args.repeats)

    app_test_module.PagesManager = NavigationPagesManager
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300).run()
    at.switch_page("pages/accuracy.py").run()
    rerun_seconds(at, 100)  # warm the page's code paths once with a throwaway config
    new_times = [rerun_seconds(at, seed) for seed in range(1, args.repeats + 1)]  # each seed: a new config
    cached_times = [rerun_seconds(at, seed) for seed in range(1, args.repeats + 1)]  # the same configs again

    float_eval = statistics.median(float_times)
    new_config = statistics.median(new_times)
    cached = statistics.median(cached_times)
    result = {
        "seconds": {"float_eval_10k": float_eval, "rerun_new_w8a8_config": new_config, "rerun_cached_config": cached},
        "ratios": {"new_config_over_float_eval": new_config / float_eval},
        "goals": {"new_config_over_float_eval": 2.0, "rerun_cached_config_seconds": 0.3},
        "samples": {"float": float_times, "new": new_times, "cached": cached_times},
    }
    print(f"{'measurement':<36}  seconds")
    print(f"{'float eval, 10k test images':<36}  {float_eval:8.3f}")
    print(f"{'rerun after change, new W8A8 config':<36}  {new_config:8.3f}   ({new_config / float_eval:.2f}x float)")
    print(f"{'rerun after change, cached config':<36}  {cached:8.3f}")
    emit(result, args.json_out)


if __name__ == "__main__":
    main()
