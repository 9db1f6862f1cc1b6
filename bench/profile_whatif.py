"""Where the time of a cold start and of one what-if goes, phase by phase, in a fresh process.

    QCORE_DATA_DIR=../shared/data python bench/profile_whatif.py [--model fashion-resnet] [--json-out FILE]

Cold start: importing streamlit and torch, loading the dataset and the model, the float eval and
the default config's report. What-if (a new config on the Accuracy page): calibration and
quantization, the quantized evaluation, the rest of the report (analysis), the page's figures, and
their serialization to JSON (what the server sends). The browser's share is measured by
bench/bench_browser.py (CPU split).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

PHASES: dict[str, float] = {}


def timed(name: str):
    class Phase:
        def __enter__(self) -> None:
            self.started = time.perf_counter()

        def __exit__(self, *exc: object) -> None:
            PHASES[name] = time.perf_counter() - self.started

    return Phase()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json-out")
    parser.add_argument("--model", default="mnist-net", help="a zoo model (default: the bundled net)")
    args = parser.parse_args()
    with timed("cold: import streamlit"):
        import streamlit  # noqa: F401
    with timed("cold: import torch and qcore"):
        from qcore.analysis.tables import build_report, quantize_for
        from qcore.data import load_dataset
        from qcore.figures import digits_figure, per_class_figure
        from qcore.inference.evaluate import evaluate, flipped_indices
        from qcore.models.checkpoint import load_model
        from qcore.models.zoo import zoo_model
        from qcore.quantize.config import QuantConfig
    with timed("cold: load the dataset (validate + normalize)"):
        data = load_dataset(zoo_model(args.model).dataset, download=False)
    with timed("cold: load the model (validated)"):
        model = load_model(None, args.model)
    with timed("cold: float eval, 10k"):
        float_result = evaluate(model, data.test)
    with timed("cold: default config report"):
        build_report(model, data, QuantConfig(), float_result)
    # A config not computed yet, on calibration images not seen yet (another seed): the default
    # report's weight ranges are remembered (qcore.quantize.calibrate.WEIGHT_RANGES), as a server's are.
    config = QuantConfig(seed=7)
    cpu_started = time.process_time()
    with timed("what-if: calibrate + quantize"):
        qnet = quantize_for(model, data, config)
    with timed("what-if: whole report (its quantized eval + analysis)"):
        report = build_report(model, data, config, float_result, qnet=qnet)
    PHASES["what-if: CPU seconds (calibrate, quantize, report)"] = time.process_time() - cpu_started
    with timed("what-if: quantized eval, 10k"):
        quant_result = evaluate(qnet, data.test)
    PHASES["what-if: analysis (report minus its quantized eval)"] = (
        PHASES["what-if: whole report (its quantized eval + analysis)"] - PHASES["what-if: quantized eval, 10k"]
    )
    with timed("what-if: Accuracy page figures"):
        flips = flipped_indices(float_result, quant_result, data.test.labels)
        shown = (flips.get("broke", []) + flips.get("fixed", []) + flips.get("other", []))[:24]
        figures = [
            per_class_figure(report.float_result.per_class_accuracy, report.quant_result.per_class_accuracy),
            digits_figure(
                [(data.test.images[i, 0] * data.spec.std + data.spec.mean).tolist() for i in shown], [""] * len(shown)
            ),
        ]
    with timed("what-if: figures to JSON"):
        size = sum(len(figure.to_json()) for figure in figures)
    PHASES["what-if: figure JSON bytes"] = float(size)
    width = max(len(name) for name in PHASES)
    print(f"{'phase':<{width}}  seconds")
    for name, value in PHASES.items():
        print(f"{name:<{width}}  {value:8.3f}" if "bytes" not in name else f"{name:<{width}}  {int(value):8d}")
    from _common import emit

    emit({"phases": PHASES}, args.json_out)


if __name__ == "__main__":
    main()
