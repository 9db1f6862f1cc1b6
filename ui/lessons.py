"""The lessons' order, and the previous/next links every lesson shows under its title."""

from __future__ import annotations

import streamlit as st

# (page, title) in the order a student takes them; the glossary is linked from each
LESSONS: tuple[tuple[str, str], ...] = (
    ("pages/one_number.py", "One number"),
    ("pages/one_kernel.py", "One kernel"),
    ("pages/one_image.py", "One image on integers"),
    ("pages/outliers.py", "Outliers"),
    ("pages/folding.py", "BatchNorm folding"),
    ("pages/residual.py", "Residual adds"),
    ("pages/tour.py", "Guided tour"),
)
GLOSSARY = "pages/glossary.py"


def lesson_links(page: str) -> None:
    """Previous and next lesson (and the glossary) for the lesson at `page`."""
    index = [path for path, _ in LESSONS].index(page)
    before, glossary, after = st.columns(3)
    if index > 0:
        path, title = LESSONS[index - 1]
        before.page_link(path, label=f"Previous: {title}", icon=":material/arrow_back:")
    glossary.page_link(GLOSSARY, label="Glossary: scale, zero point, SQNR...", icon=":material/menu_book:")
    if index + 1 < len(LESSONS):
        path, title = LESSONS[index + 1]
        after.page_link(path, label=f"Next: {title}", icon=":material/arrow_forward:")
