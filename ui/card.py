"""The Model page's model card, for any model: its fingerprint, its graph as a diagram, its layers, what stays
float."""

from __future__ import annotations

import streamlit as st

from qcore.figures import network_diagram_figure
from qcore.graph import graph_diagram
from qcore.graph.diagram import layer_rows, stays_float
from ui import session
from ui.tables import table_with_csv


def model_card(entry: session.ModelEntry) -> None:
    graph = entry.graph
    st.caption(
        f"Fingerprint {entry.fingerprint}: a hash of this model's operations and weights. Every result is "
        "stored under it, so two sessions with the same model share their results and two models never do."
    )
    with st.expander("Model card: the graph, its layers and what stays float", expanded=entry.imported is not None):
        st.plotly_chart(
            network_diagram_figure(graph_diagram(graph), None, "The model graph (hover a box for its shape and size)"),
            key="model_card_graph",
        )
        rows = layer_rows(graph, None if entry.imported is None else dict(entry.imported.labels))
        st.caption(
            f"{len(rows)} quantizable layers, {sum(int(row['parameters']) for row in rows):,} parameters; "
            f"operations: {', '.join(graph.op_kinds())}."
        )
        table_with_csv(rows, "layers", "model_card_layers")
        config = st.session_state.get(session.CONFIG_KEY)
        reasons = stays_float(graph, *(() if config is None else (config.float_layers, config.quantize_input)))
        st.markdown("**Not quantized, and why:**")
        for reason in reasons:  # layer names come from an uploaded file: plain text
            session.plain_text(f"- {reason}")
