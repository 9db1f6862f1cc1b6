"""Start: what the lab is, and three ways in (a class, a student, an engineer)."""

import streamlit as st

from ui import session
from ui.lessons import GLOSSARY, LESSONS

session.require_navigation()  # first: a deep link on a fresh server may run this page alone
st.title("Quantization Lab")
entry = session.current_model()
st.markdown(
    "A trained network computes in 32-bit floats; deployed, it often runs on 8-bit or smaller integers. "
    "This lab quantizes a small image classifier in front of you and shows what that costs and why: every "
    "number on every page is measured on the current model, never written in advance. The sidebar's "
    "settings (bits, calibration, layers kept in float) drive every page, and the page's link carries them."
)
session.plain_text(f"Current model: {entry.name}, on {entry.dataset.title}")  # an upload's name is untrusted
st.page_link("pages/model.py", label="Choose another model, or bring your own", icon=":material/swap_horiz:")

teacher, student, engineer = st.columns(3)
with teacher.container(border=True):
    st.subheader("A class")
    st.markdown(
        "Seven steps for a class to follow together, each one button that sets everyone's sidebar: "
        "8, 4 and 2 bits, range rules, one layer kept in float, AdaRound."
    )
    st.page_link("pages/tour.py", label="Start the guided tour", icon=":material/tour:")
    st.caption("Whoever runs the server can compute the whole tour before the class:")
    st.code("python -m qcore prepare --model NAME --store FOLDER", language="bash")
with student.container(border=True):
    st.subheader("A student")
    st.markdown(
        f"{len(LESSONS)} lessons in order, from one number rounded onto a grid to a whole image on integers, "
        "each with a link to the next; the glossary defines every term they use."
    )
    path, title = LESSONS[0]
    st.page_link(path, label=f"Lesson 1: {title}", icon=":material/school:")
    st.page_link(GLOSSARY, label="Glossary", icon=":material/menu_book:")
with engineer.container(border=True):
    st.subheader("An engineer")
    st.markdown(
        "Your own classifier as an ONNX file (28x28 images, 10 classes): its accuracy at each setting, why "
        "it drops and what fixes it, then an integer-only check and the exported model."
    )
    st.page_link("pages/model.py", label="Upload your model", icon=":material/upload_file:")
    st.page_link("pages/diagnose.py", label="Diagnose a setting", icon=":material/troubleshoot:")
    st.page_link("pages/deploy.py", label="Run it on integers and export", icon=":material/memory:")
