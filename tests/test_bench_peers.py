"""bench/bench_peers.py's own code path, on the lab's rows only (the peers are the bench's dependencies,
never the tests'), and the shipped results the Methods page and `python -m qcore peers` read."""

from __future__ import annotations

import json

import pytest

from bench import bench_peers
from qcore.cli import main as cli_main
from qcore.models import peers
from qcore.models.peers import BITS, PEERS, TOOLS, PeersFileError, comparison_rows, peer_comparison
from qcore.models.zoo import ZOO


def cell(validation: float, test: float) -> dict[str, object]:
    return {"validation_accuracy": validation, "accuracy": test, "seconds": 1.0}


def test_the_best_setting_is_chosen_on_validation_never_on_the_test_set():
    rows = [
        {"tool": "lab", "setting": "a", "cells": {"W4A4": cell(90.0, 95.0), "W2A4": {"why": "cannot"}}},
        {"tool": "lab", "setting": "b", "cells": {"W4A4": cell(91.0, 80.0), "W2A4": {"why": "cannot"}}},
        {"tool": "NNCF", "setting": "int8", "cells": {"W4A4": {"why": "INT8 only"}, "W2A4": {"why": "INT8 only"}}},
    ]
    best = {row["tool"]: row["cells"] for row in bench_peers.best_rows(rows, ["W4A4", "W2A4"])}
    assert best["lab"]["W4A4"]["setting"] == "b" and best["lab"]["W4A4"]["accuracy"] == 80.0
    assert best["lab"]["W2A4"] == {"why": "cannot"}  # nothing measured: the reason, not a blank
    assert best["NNCF"]["W4A4"] == {"why": "INT8 only"}
    assert set(best) == {"lab", "NNCF"}  # a tool not run has no row


def test_re_measuring_one_tool_replaces_its_rows_only_and_chooses_again():
    def row(tool: str, setting: str, validation: float, test: float, **extra: object) -> dict[str, object]:
        return {"tool": tool, "setting": setting, **extra, "cells": {"W4A4": cell(validation, test)}}

    counts = {"model": "mnist-net", "test_images": 10000, "calibration_images": 1024, "validation_images": 5000}
    old_rows = [
        row("lab", "a", 90.0, 91.0),
        row("AIMET", "x", 95.0, 94.0),
        row("lab (peers' conventions)", "old", 99.0, 99.0),
    ]
    shipped = {**counts, "commit": "old1", "rows": old_rows, "best": []}
    measured = {**counts, "rows": [row("lab (peers' conventions)", "new", 92.0, 93.0, commit="new2")]}
    result = bench_peers.merged(shipped, measured, ["lab (peers' conventions)"])
    assert [(r["tool"], r["setting"], r["commit"]) for r in result["rows"]] == [
        ("lab", "a", "old1"),
        ("lab (peers' conventions)", "new", "new2"),  # the old row is gone, in TOOLS' order
        ("AIMET", "x", "old1"),
    ]
    assert result["commit"] == "new2, old1"
    best = {r["tool"]: r["cells"]["W4A4"]["accuracy"] for r in result["best"]}
    assert best == {"lab": 91.0, "lab (peers' conventions)": 93.0, "AIMET": 94.0}
    with pytest.raises(SystemExit, match="test_images"):
        bench_peers.merged(shipped, {**measured, "test_images": 1000}, ["lab"])


def test_the_lab_rows_run_through_the_bench_and_read_back_as_the_page_reads_them(tmp_path, monkeypatch):
    settings = tuple(s for s in bench_peers.SETTINGS if s.tool in ("lab", "NNCF", "torchao") and "block" not in s.name)
    settings = tuple(s for s in settings if "AdaRound" not in s.name)
    result = bench_peers.measure_model("mnist-net", ["W8A8", "W2A4"], ["lab"], test_images=1000, settings=settings)
    lab_rows = [row for row in result["rows"] if row["tool"] == "lab"]
    assert [row["setting"] for row in lab_rows] == [
        "default (nearest rounding)",
        "min/max ranges (the peers' calibration)",
        "asymmetric weights (4 levels at 2 bits, as Brevitas's)",
    ]
    for row in lab_rows:
        assert abs(row["cells"]["W8A8"]["accuracy"] - result["float_accuracy"]) < 1.0  # 8 bits: close to float
        assert row["cells"]["W2A4"]["accuracy"] < row["cells"]["W8A8"]["accuracy"]  # 2-bit weights lose some
    assert result["test_images"] == 1000 and result["calibration_images"] == 1024
    # a peer setting the tool does not offer gets its reason, measured without importing it
    for setting in settings:
        if setting.tool != "lab":
            assert "only" in bench_peers.measure_cell(setting, None, 2, 4)["why"]  # type: ignore[arg-type]

    monkeypatch.setattr(peers, "PRETRAINED_DIR", tmp_path)
    peers.peers_path("mnist-net").write_text(json.dumps(result))
    comparison = peer_comparison("mnist-net")
    assert comparison is not None and comparison.bits == ("W8A8", "W2A4")
    lab_best = max(lab_rows, key=lambda row: row["cells"]["W2A4"]["validation_accuracy"])
    shown = comparison_rows(comparison)
    assert shown[0]["W2A4"] == f"{lab_best['cells']['W2A4']['accuracy']:.2f}% ({lab_best['setting']})"
    assert shown[-1] == {"Tool": "lab minus best peer", "W8A8": "n/a", "W2A4": "n/a"}  # no peer measured


def test_a_shipped_result_that_is_not_the_bench_s_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(peers, "PRETRAINED_DIR", tmp_path)
    path = peers.peers_path("mnist-net")
    for text in ('{"model": "fashion-net", "best": []}', "[1, 2", '{"model": "mnist-net", "best": [{"tool": "x"}]}'):
        path.write_text(text)
        with pytest.raises(PeersFileError) as raised:
            peer_comparison("mnist-net")
        assert "\n" not in str(raised.value)
    row = {"tool": "AIMET", "cells": {"W4A4": {"accuracy": 250.0, "seconds": 1}}}
    path.write_text(json.dumps({"model": "mnist-net", "best": [row]}))
    with pytest.raises(PeersFileError, match="percentage"):
        peer_comparison("mnist-net")


@pytest.mark.parametrize("model", list(ZOO))
def test_every_zoo_model_ships_a_comparison_with_every_tool_and_column(model, capsys):
    comparison = peer_comparison(model)
    assert comparison is not None, f"run: .peers/bin/python bench/bench_peers.py --models {model} --ship"
    assert set(comparison.best) == set(TOOLS) and comparison.bits == tuple(BITS)
    for tool, cells in comparison.best.items():
        for label, shown in cells.items():
            assert shown.accuracy is not None or shown.why, f"{tool} {label}: a blank cell"
    # the lab runs every column; the peers' best is a real maximum over them
    for label in BITS:
        lab = comparison.best["lab"][label].accuracy
        others = [c[label].accuracy for t, c in comparison.best.items() if t in PEERS and c[label].accuracy is not None]
        assert comparison.lab_lead(label) == (None if not others else round(lab - max(others), 2))
    assert cli_main(["peers", "--model", model]) == 0
    printed = capsys.readouterr().out
    assert "lab minus best peer" in printed and "AIMET" in printed
