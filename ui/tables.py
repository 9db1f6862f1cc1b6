"""Tables with a CSV download under each."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import streamlit as st


def _clean(value: object) -> object:
    """Floats to 6 significant digits: float32 results carry noise like 0.00010001659393310547."""
    return float(f"{value:.6g}") if isinstance(value, float) else value


def table_with_csv(rows: Sequence[dict[str, object]], name: str, key: str) -> pd.DataFrame:
    frame = pd.DataFrame([{k: _clean(v) for k, v in row.items()} for row in rows])
    st.dataframe(frame, hide_index=True, width="stretch", key=f"table_{key}")
    st.download_button(
        f"Download {name} (CSV)",
        frame.to_csv(index=False).encode(),
        file_name=f"{key}.csv",
        mime="text/csv",
        key=f"csv_{key}",
    )
    return frame
