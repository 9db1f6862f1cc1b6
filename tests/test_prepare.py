"""`python -m qcore prepare` (issue 29): what a class will ask of a model, computed ahead into a result store;
the app then reads every tour step and lesson from that store and computes nothing."""

from __future__ import annotations

import functools
import json

import pytest
import streamlit.testing.v1.app_test as app_test_module
from streamlit.testing.v1 import AppTest

from qcore.analysis.tables import quantize_for
from qcore.inference.evaluate import evaluate
from qcore.quantize.config import QuantConfig
from tests.conftest import ROOT, run_cli
from ui.apptest import NavigationPagesManager

TOUR_STEPS = 7
# the default report, the Outliers lesson's two targets, the walk (the notebook's net has no BatchNorm to
# fold and no residual add: those lessons say so and compute nothing)
LESSON_RESULTS = 4
# what ui.cache computes a result with: none of them may run once a class is prepared
COMPUTATIONS = (
    "evaluate",
    "build_report",
    "quantize_for",
    "layer_sensitivity",
    "outlier_lesson",
    "folding_walkthrough",
    "residual_adds",
    "explain",
    "diagnose",
    "bit_sweep",
)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The default model's tour and lessons prepared into a store of their own, as a teacher would, but
    with AdaRound (tour step 7) learning for 20 steps instead of 1,000: its 1,000 steps were 40 of this
    fixture's 54 s, and these tests are about what is computed and stored, not how well AdaRound rounds
    (test_methods and the bundled regression check that, at 1,000). A fresh AdaRound memo for the time, so
    no other test is handed a 20-step result under the real key; the store is this module's alone."""
    from qcore.quantize import methods, qmodel

    store = tmp_path_factory.mktemp("prepared-store")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(qmodel, "ADAROUNDS", qmodel.Memo(entries=8))
        patch.setattr(qmodel, "adaround", functools.partial(methods.adaround, iterations=20))
        done = run_cli("prepare", "--model", "mnist-net", "--tour", "--lessons", "--store", str(store), "--json")
    assert done.returncode == 0, done.stderr
    return store, json.loads(done.stdout)


@pytest.mark.slow
def test_prepare_computes_each_result_once(prepared):
    store, summary = prepared
    results = summary["results"]
    assert len(results) == 1 + 1 + TOUR_STEPS + LESSON_RESULTS
    # the lessons' default report is the tour's first step, stored by then; everything else was computed
    assert [r["what"] for r in results if r["stored_before"]] == ["the default settings' report"]
    assert [r["what"] for r in results[2 : 2 + TOUR_STEPS]][-1] == "tour step 7: 2-bit weights with AdaRound"
    # that a second preparation finds them all stored and computes none is the operator button's test below
    # (the same prepare_class, in the app's process): a second CLI process here cost ~10 s and proved no more
    assert store.is_dir() and any(store.iterdir())


@pytest.mark.slow
def test_a_prepared_class_reads_every_tour_step_and_lesson_from_the_store(prepared, monkeypatch, pretrained, mnist):
    """A fresh process's app (no result in memory) on the prepared store: every tour step applied and each
    lesson opened shows its numbers, and nothing is computed (each computation ui.cache calls fails)."""
    from qcore.store import ResultStore
    from ui import cache

    store, _summary = prepared
    monkeypatch.setattr(cache, "STORE", ResultStore(store, 2**31))
    for name, results in list(vars(cache).items()):
        if isinstance(results, cache._Results):  # nothing this process computed before is in memory
            monkeypatch.setattr(cache, name, cache._Results(results.kind, results.limit, results.spinner))
    computed: list[str] = []
    for name in COMPUTATIONS:
        monkeypatch.setattr(cache, name, lambda *args, name=name, **kwargs: computed.append(name))
    monkeypatch.setattr(app_test_module, "PagesManager", NavigationPagesManager)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    at.switch_page("pages/tour.py").run()
    for index in range(TOUR_STEPS):
        if index:  # the first step is the default the page opens on
            next(b for b in at.button if b.key == f"tour_{index}").click()
            at.run()
        assert not at.exception and not at.error, [e.value for e in at.exception]
        assert f"**{index + 1}." in next(m.value for m in at.markdown if "(the sidebar is here now)" in m.value)
    measured = [m.value for m in at.markdown if m.value.startswith("Measured for this model")]
    assert len(measured) == TOUR_STEPS
    # the first step's number, read from the store, against the simulation evaluated here
    accuracy = evaluate(quantize_for(pretrained, mnist, QuantConfig()), mnist.test).accuracy
    assert f"quantized **{100 * accuracy:.2f}%**" in measured[0]
    next(b for b in at.button if b.key == "tour_0").click()  # back to the defaults, which the lessons were prepared at
    at.run()
    for page in ("pages/outliers.py", "pages/one_image.py", "pages/residual.py", "pages/folding.py"):
        at.switch_page(page).run()  # folding and residual adds: this net has neither, and the pages say so
        assert not at.exception and not at.error, (page, [e.value for e in at.exception])
    assert computed == []


@pytest.mark.slow
def test_the_operator_s_button_prepares_into_the_server_s_store_and_says_what_it_did(prepared, monkeypatch):
    """The tour page's button, shown only with QCORE_OPERATOR=1, runs the same preparation into the server's
    store: on the class the CLI prepared, it finds every result under the app's own keys and computes none;
    on a server without a store it says so in one line."""
    from qcore.store import ResultStore
    from ui import cache

    store, summary = prepared
    monkeypatch.setattr(cache, "STORE", ResultStore(store, 2**31))
    monkeypatch.setattr(app_test_module, "PagesManager", NavigationPagesManager)
    monkeypatch.delenv("QCORE_OPERATOR", raising=False)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    at.switch_page("pages/tour.py").run()
    assert not [b for b in at.button if b.key == "prepare_class"]  # a class's server offers no such button
    monkeypatch.setenv("QCORE_OPERATOR", "1")
    at.run()
    next(b for b in at.button if b.key == "prepare_class").click()
    at.run()
    results = 1 + 1 + TOUR_STEPS + LESSON_RESULTS  # float, the tour's measurement and steps, the lessons
    assert len(summary["results"]) == results
    assert [m.value for m in at.success] == [f"Prepared: {results} results in the store (0 computed now) in 0 s."]
    monkeypatch.setattr(cache, "STORE", None)
    next(b for b in at.button if b.key == "prepare_class").click()
    at.run()
    assert [e.value for e in at.error] == [
        "Not prepared: this server has no result store to prepare into (set $QCORE_RESULT_STORE)"
    ]


def test_prepare_refuses_what_it_cannot_do_in_one_line(monkeypatch, tmp_path):
    monkeypatch.delenv("QCORE_RESULT_STORE", raising=False)
    no_store = run_cli("prepare", "--model", "mnist-net")
    assert no_store.returncode == 2
    assert no_store.stderr.strip() == (
        "qcore: error: prepare: name the server's result store with --store or $QCORE_RESULT_STORE"
    )
    not_a_folder = run_cli("prepare", "--store", "/dev/null")
    assert not_a_folder.returncode == 2 and "--store='/dev/null' is not a folder" in not_a_folder.stderr
    bad_bits = run_cli("prepare", "--store", str(tmp_path), "--diagnose", "W4A4,W9A4")
    assert bad_bits.returncode == 2 and "'W9A4' is not W<2-8>A<2-8>" in bad_bits.stderr
    assert len(no_store.stderr.strip().splitlines()) == 1 and not list(tmp_path.iterdir())
