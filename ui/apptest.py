"""Support for driving the app with Streamlit's AppTest (tests and bench/bench_app.py)."""

from __future__ import annotations

from streamlit.runtime.pages_manager import PagesManager


class NavigationPagesManager(PagesManager):
    """AppTest resets PagesManager's class flag before every run, so with a folder named pages/ it
    runs each page the legacy way, without app.py (no sidebar). A real server clears the flag on the
    first st.navigation call and keeps it cleared; this restores that steady state."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        PagesManager.uses_pages_directory = False
