"""Tables with a CSV download under each."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import streamlit as st


def table_with_csv(rows: Sequence[dict[str, object]], name: str, key: str) -> pd.DataFrame:
    frame = pd.DataFrame(list(rows))
    st.dataframe(frame, hide_index=True, width="stretch", key=f"table_{key}")
    st.download_button(
        f"Download {name} (CSV)",
        frame.to_csv(index=False).encode(),
        file_name=f"{key}.csv",
        mime="text/csv",
        key=f"csv_{key}",
    )
    return frame
