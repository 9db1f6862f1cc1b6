"""Quantization Lab: the entry script builds the navigation; each page lives in pages/."""

import streamlit as st

from ui import session

st.set_page_config(page_title="Quantization Lab", page_icon=":material/tune:", layout="wide")

PAGES = {
    "Explore": [
        st.Page("pages/model.py", title="Model", icon=":material/neurology:", default=True),
        st.Page("pages/activations.py", title="Activations", icon=":material/show_chart:"),
        st.Page("pages/weights.py", title="Weights", icon=":material/bar_chart:"),
        st.Page("pages/accuracy.py", title="Accuracy", icon=":material/target:"),
        st.Page("pages/methods.py", title="Methods", icon=":material/auto_fix_high:"),
        st.Page("pages/deploy.py", title="Deploy", icon=":material/memory:"),
        st.Page("pages/diagnose.py", title="Diagnose", icon=":material/troubleshoot:"),
    ],
    "Lessons": [
        st.Page("pages/lessons/one_number.py", title="One number", icon=":material/looks_one:"),
        st.Page("pages/lessons/one_kernel.py", title="One kernel", icon=":material/grid_on:"),
        st.Page("pages/lessons/one_image.py", title="One image on integers", icon=":material/image:"),
        st.Page("pages/lessons/outliers.py", title="Outliers", icon=":material/scatter_plot:"),
        st.Page("pages/lessons/tour.py", title="Guided tour", icon=":material/tour:"),
    ],
}

navigation = st.navigation(PAGES)
st.sidebar.title("Quantization Lab")
entry = session.current_model()
st.session_state[session.CONFIG_KEY] = session.config_controls()
session.sidebar_summary(entry, st.session_state[session.CONFIG_KEY])
navigation.run()
