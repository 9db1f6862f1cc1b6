"""Tables with a CSV download under each."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import streamlit as st


def csv_bytes(frame: pd.DataFrame) -> bytes:
    """The table as CSV, floats to 6 significant digits: float32 results otherwise carry noise like
    0.00010001659393310547 into the file."""
    return frame.to_csv(index=False, float_format="%.6g").encode()


LARGE = 10_000  # numbers from here on are shown with thousands separators (1,724,320, not 1724320)


def table_with_csv(rows: Sequence[dict[str, object]], name: str, key: str) -> pd.DataFrame:
    frame = pd.DataFrame(list(rows))
    large = [
        column
        for column in frame.columns
        if pd.api.types.is_numeric_dtype(frame[column])
        and not pd.api.types.is_bool_dtype(frame[column])
        and bool((frame[column].abs() >= LARGE).any())
    ]
    formats = {column: st.column_config.NumberColumn(format="localized") for column in large}
    st.dataframe(frame, hide_index=True, width="stretch", key=f"table_{key}", column_config=formats)
    st.download_button(
        f"Download {name} (CSV)",
        csv_bytes(frame),
        file_name=f"{key}.csv",
        mime="text/csv",
        key=f"csv_{key}",
    )
    return frame
