"""Shared by the benchmark scripts: print the result as one JSON line and optionally save it."""

from __future__ import annotations

import json
from pathlib import Path


def emit(result: dict[str, object], json_out: str | None) -> None:
    print(json.dumps(result))
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(result, indent=2))
