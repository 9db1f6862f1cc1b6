"""Quantization Lab: the entry script builds the navigation; each page lives in pages/."""

from pathlib import Path

import streamlit as st

from ui import cache, session

# The icon is served by this server: a ":material/...:" icon made every browser fetch it from Google's
# font server, which fails in an offline classroom and tells a third party who is in class.
FAVICON = str(Path(__file__).parent / "ui" / "static" / "favicon.svg")
st.set_page_config(page_title="Quantization Lab", page_icon=FAVICON, layout="wide")
st.html(Path(__file__).parent / "ui" / "static" / "layout.css")  # every width: formulas scroll, columns stack

PAGES = {
    "Explore": [
        st.Page("pages/start.py", title="Start", icon=":material/home:", default=True),
        st.Page("pages/model.py", title="Model", icon=":material/neurology:"),
        st.Page("pages/activations.py", title="Activations", icon=":material/show_chart:"),
        st.Page("pages/weights.py", title="Weights", icon=":material/bar_chart:"),
        st.Page("pages/accuracy.py", title="Accuracy", icon=":material/target:"),
        st.Page("pages/methods.py", title="Methods", icon=":material/auto_fix_high:"),
        st.Page("pages/deploy.py", title="Deploy", icon=":material/memory:"),
        st.Page("pages/diagnose.py", title="Diagnose", icon=":material/troubleshoot:"),
        st.Page("pages/auto.py", title="Auto", icon=":material/auto_mode:"),
    ],
    "Lessons": [
        st.Page("pages/one_number.py", title="One number", icon=":material/looks_one:"),
        st.Page("pages/one_kernel.py", title="One kernel", icon=":material/grid_on:"),
        st.Page("pages/one_image.py", title="One image on integers", icon=":material/image:"),
        st.Page("pages/outliers.py", title="Outliers", icon=":material/scatter_plot:"),
        st.Page("pages/folding.py", title="BatchNorm folding", icon=":material/layers:"),
        st.Page("pages/residual.py", title="Residual adds", icon=":material/call_merge:"),
        st.Page("pages/tour.py", title="Guided tour", icon=":material/tour:"),
        st.Page("pages/glossary.py", title="Glossary", icon=":material/menu_book:"),
    ],
}

navigation = st.navigation(PAGES, expanded=True)  # all 17 pages: collapsed, it hides the last four behind "View more"
st.sidebar.title("Quantization Lab")
if cache.GATE_PROBLEM or cache.STORE_PROBLEM:  # the operator's setting, not a visitor's: refuse rather than guess
    st.error("This server is misconfigured; whoever runs it must fix the setting below and restart it.")
    session.plain_text(cache.GATE_PROBLEM or cache.STORE_PROBLEM)
    st.stop()
if cache.STORE is not None and cache.STORE.problem:  # a broken store costs sharing, never a result
    st.sidebar.caption(
        "Results are not being shared with this server's other processes right now (its result store is "
        "not working; the operator's log says why): yours are computed here."
    )
entry = session.current_model()
config = st.session_state[session.CONFIG_KEY] = session.config_controls()
# The summary's place in the sidebar is kept here, but it is filled after the page: a page that needs
# no quantized result (the Model page, a lesson, a training run's outcome) is drawn before it.
summary = st.sidebar.container()
st.session_state[session.SUMMARY_HOOK_KEY] = lambda: session.sidebar_summary(entry, config, summary)
navigation.run()  # a page that stops early draws the summary first (session.stop_page)
session.draw_sidebar_summary()
