"""Shared fixtures. MNIST comes from ../shared/data unless QCORE_DATA_DIR says otherwise; tests that
need it fail (never skip) when it is missing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("QCORE_DATA_DIR", str((ROOT / ".." / "shared" / "data").resolve()))
# One result store for the session, as deploy/serve's replicas share one: what an AppTest computed,
# a browser test's server (which inherits this environment) reads instead of computing it again.
TEST_STORE = tempfile.mkdtemp(prefix="qlab-test-store-")
os.environ["QCORE_RESULT_STORE"] = TEST_STORE


def pytest_configure(config) -> None:
    """Each new AppTest scans every installed distribution's metadata for Streamlit components (parsing
    hundreds of METADATA files: about 0.25 s an AppTest, 4% of test_app's time, py-spy). Nothing is
    installed while the tests run, so the session scans once and hands every AppTest that answer."""
    from streamlit.components.v2 import manifest_scanner

    manifests = manifest_scanner.scan_component_manifests()
    manifest_scanner.scan_component_manifests = lambda max_workers=None: manifests


def pytest_sessionfinish(session, exitstatus) -> None:
    shutil.rmtree(TEST_STORE, ignore_errors=True)


def seed_app_result(kind: str, model, data, config, result, zoo: str = "mnist-net") -> None:
    """Put a result qcore computed in the test into the session's store under the key the app looks it
    up by (the bundled model, the data's content, the config): the page then shows it without computing
    it again (its display is what the test checks)."""
    from qcore.models.checkpoint import bundled_identity
    from qcore.store import ResultStore, result_key

    key = result_key(kind, bundled_identity(zoo, model), data.content_id, config.to_json())
    ResultStore(TEST_STORE, 2**31).put(key, result)


def run_cli(*args: str, timeout: int = 300, process: bool = False) -> subprocess.CompletedProcess[str]:
    """qcore's command line with ARGS: its exit code and what it printed. By default in this process
    (qcore.cli.main with stdout and stderr captured, as `python -m qcore` calls it), which spares each
    call starting Python and importing torch again; `process=True` runs `python -m qcore ARGS` from the
    repository root, as a user does (the tests of signals, memory and the entry point itself)."""
    if process:
        return subprocess.run(
            [sys.executable, "-m", "qcore", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
        )
    import contextlib
    import io

    from qcore.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exit:  # argparse's own usage errors
            code = exit.code if isinstance(exit.code, int) else 2
    return subprocess.CompletedProcess(["qcore", *args], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def mnist():
    from qcore.data import load_mnist

    return load_mnist(download=False)


@pytest.fixture(scope="session")
def pretrained():
    from qcore.models.checkpoint import load_model

    return load_model()


@pytest.fixture(scope="session")
def float_eval(pretrained, mnist):
    from qcore.inference.evaluate import evaluate

    return evaluate(pretrained, mnist.test)


@pytest.fixture(scope="session")
def w3a3_diagnosis(pretrained, mnist, float_eval):
    """qcore.analysis.diagnose at W3A3 (about 25 s), shared by the diagnosis, CLI, AppTest and browser
    checks (seeded into the app's store: the Diagnose page at W3A3 shows this very result)."""
    from qcore.analysis.diagnose import diagnose
    from qcore.quantize.config import QuantConfig

    config = QuantConfig(weight_bits=3, act_bits=3)
    result = diagnose(pretrained, mnist, config, float_eval.accuracy)
    seed_app_result("diagnosis", pretrained, mnist, config, result)  # the Diagnose page shows this one
    return result


@pytest.fixture(scope="session")
def resnet_page_diagnosis():
    """The Diagnose page of a residual BatchNorm net, for the AppTest and browser walks: qcore's diagnosis
    of fashion-resnet at the default config on its first 300 test images, trying two of its fixes (the
    full one, 10,000 images and a calibration per layer kept in float, takes minutes on 2 cores), seeded
    into the app's store under the full test set's key. The page then shows these numbers; the walks
    check the page (its diagram's branches, its table's layers), not the numbers."""
    import qcore.analysis.diagnose
    from qcore.analysis.diagnose import diagnose
    from qcore.data import Dataset, load_dataset
    from qcore.inference.evaluate import evaluate
    from qcore.models.checkpoint import load_model
    from qcore.quantize.config import QuantConfig

    data, model = load_dataset("fashion-mnist", download=False), load_model(None, "fashion-resnet")
    small = Dataset(data.train, data.test.subset(300), data.spec)
    every_fix = qcore.analysis.diagnose._candidates
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(qcore.analysis.diagnose, "_candidates", lambda *args: every_fix(*args)[-2:])
        result = diagnose(model, small, QuantConfig(), evaluate(model, small.test).accuracy)
    seed_app_result("diagnosis", model, data, QuantConfig(), result, zoo="fashion-resnet")
    return result


@pytest.fixture(scope="session")
def w2a8_all_methods(pretrained, mnist, float_eval):
    """The bundled net at W2A8 with equalization, AdaRound and bias correction (about 20 s of AdaRound),
    shared by the methods goals, the regression and the Methods page's check (seeded into the app's
    store: the page shows this very result)."""
    from qcore.analysis.tables import build_report, quantize_for
    from qcore.quantize.config import QuantConfig

    config = QuantConfig(weight_bits=2, methods=("equalization", "adaround", "bias-correction"))
    qnet = quantize_for(pretrained, mnist, config)
    seed_app_result("report", pretrained, mnist, config, build_report(pretrained, mnist, config, float_eval, qnet))
    return qnet


@pytest.fixture(scope="session")
def zoo_tour_sensitivities() -> dict[str, list]:
    """The guided tour's one-layer-at-a-time measurement (which layer 2-bit weights hurt most) of
    the three Fashion-MNIST zoo models on their first 1,000 test images, seeded into the app's store
    under the full test set's key: the tour page then opens on these rows (the full measurement took 30 s
    and 21 s of each browser walk on 2 cores). The walks check the page, test_lessons the step it
    chooses from the rows; neither needs the full set's precision. Per model: its rows."""
    from qcore.analysis.tables import layer_sensitivity
    from qcore.data import Dataset, load_dataset
    from qcore.lessons.tour import sensitivity_config
    from qcore.models.checkpoint import load_model

    data = load_dataset("fashion-mnist", download=False)
    first = Dataset(data.train, data.test.subset(1000), data.spec)
    measured = {}
    for zoo in ("fashion-resnet", "fashion-mobilenet", "fashion-net"):
        model = load_model(None, zoo)
        rows = layer_sensitivity(model, first, sensitivity_config())
        seed_app_result("sensitivity", model, data, sensitivity_config(), rows, zoo=zoo)
        measured[zoo] = rows
    return measured
