"""What a zoo model gets from the tools engineers use instead (AIMET, Brevitas, NNCF, ONNX Runtime,
torchao), beside the lab: read from the result `bench/bench_peers.py --ship` wrote next to the model's
checkpoint. Never computed here: the peers are the bench's dependencies, not the lab's."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qcore.files import JsonFileError, read_json
from qcore.models.zoo import PRETRAINED_DIR, ZOO

# Column label -> (weight bits, activation bits)
BITS: dict[str, tuple[int, int]] = {"W8A8": (8, 8), "W4A8": (4, 8), "W4A4": (4, 4), "W3A3": (3, 3), "W2A4": (2, 4)}
# The lab is run twice: under its own convention (every add's inputs quantized, the comparison's
# row) and under the peers' looser ones (adds kept float, Brevitas's percentile ranges), so that the
# comparison is fair both ways; only the first is compared with the peers.
LAB, LAB_UNDER_PEERS = "lab", "lab (peers' conventions)"
PEERS = ("AIMET", "Brevitas", "NNCF", "ONNX Runtime", "torchao")
TOOLS = (LAB, LAB_UNDER_PEERS, *PEERS)
MAX_PEERS_CHARS = 400_000  # a result is about 20,000 characters


class PeersFileError(ValueError):
    """A shipped peers result that is not what the bench writes."""


@dataclass(frozen=True)
class PeerCell:
    """One tool's best setting at one bit-width (chosen on validation images), or why it has none."""

    accuracy: float | None  # test accuracy, percent
    setting: str = ""
    seconds: float | None = None
    why: str = ""


@dataclass(frozen=True)
class PeerComparison:
    model: str
    float_accuracy: float
    commit: str
    bits: tuple[str, ...]
    best: dict[str, dict[str, PeerCell]]  # tool -> column -> its best cell

    def lab_lead(self, label: str) -> float | None:
        """The lab's best (under its own convention) minus the best peer's, in points (negative: a peer
        is ahead)."""
        lab = self.best.get(LAB, {}).get(label)
        peers = [row[label].accuracy for tool, row in self.best.items() if tool in PEERS and label in row]
        measured = [value for value in peers if value is not None]
        if lab is None or lab.accuracy is None or not measured:
            return None
        return round(lab.accuracy - max(measured), 2)


def peers_path(model: str) -> Path:
    return PRETRAINED_DIR / f"{ZOO[model].checkpoint_file.rsplit('.', 1)[0]}.peers.json"


def _cell(raw: object, where: str) -> PeerCell:
    if not isinstance(raw, dict):
        raise PeersFileError(f"{where} is not an object")
    if "accuracy" in raw:
        accuracy, seconds = raw.get("accuracy"), raw.get("seconds")
        if not isinstance(accuracy, int | float) or not 0 <= accuracy <= 100:
            raise PeersFileError(f"{where}: accuracy must be a percentage")
        if not isinstance(seconds, int | float):
            raise PeersFileError(f"{where}: seconds must be a number")
        return PeerCell(float(accuracy), str(raw.get("setting", "")), float(seconds))
    return PeerCell(None, why=str(raw.get("why", "not measured")))


def peer_comparison(model: str) -> PeerComparison | None:
    """The shipped comparison for a zoo model; None for a model the bench has not measured (an upload,
    or a zoo model without a result)."""
    if model not in ZOO or not peers_path(model).is_file():
        return None
    where = peers_path(model).name
    try:
        raw = read_json(peers_path(model).read_text(), where, MAX_PEERS_CHARS)
    except JsonFileError as error:
        raise PeersFileError(str(error)) from error
    if not isinstance(raw, dict) or raw.get("model") != model or not isinstance(raw.get("best"), list):
        raise PeersFileError(f"{where} is not bench_peers.py's result for {model}")
    best: dict[str, dict[str, PeerCell]] = {}
    for row in raw["best"]:
        if not isinstance(row, dict) or row.get("tool") not in TOOLS or not isinstance(row.get("cells"), dict):
            raise PeersFileError(f"{where}: a row names no known tool")
        tool, cells = row["tool"], row["cells"]
        best[tool] = {label: _cell(cells[label], f"{where} {tool} {label}") for label in cells if label in BITS}
    bits = tuple(label for label in BITS if any(label in row for row in best.values()))
    return PeerComparison(model, float(raw.get("float_accuracy", 0.0)), str(raw.get("commit", "")), bits, best)


def comparison_rows(comparison: PeerComparison) -> list[dict[str, str]]:
    """Each tool's best test accuracy per column as text (a cell it cannot run says why), then the lab's
    lead over the best peer: what the Methods page and `python -m qcore peers` show."""
    rows = []
    for tool in TOOLS:
        if tool not in comparison.best:
            continue
        row = {"Tool": tool}
        for label in comparison.bits:
            cell = comparison.best[tool].get(label)
            if cell is None:
                row[label] = "not run"
            elif cell.accuracy is None:
                row[label] = f"cannot: {cell.why}"
            else:
                row[label] = f"{cell.accuracy:.2f}% ({cell.setting})"
        rows.append(row)
    lead = {"Tool": "lab minus best peer"}
    for label in comparison.bits:
        value = comparison.lab_lead(label)
        lead[label] = "n/a" if value is None else f"{value:+.2f} points"
    rows.append(lead)
    return rows
