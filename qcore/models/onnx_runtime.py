"""ONNX Runtime, the reference an imported file and an exported one are both checked against: one place
that opens a CPU session, with ONNX Runtime's own logging silenced (its coloured warnings would print above
the CLI's one-line error and in a server's log for every upload), shared by the import and the exports."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnxruntime

# ONNX Runtime's severities: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal. An error it logs also raises,
# and the caller says why in its own one line, so only a fatal one (the process is going down) is printed.
FATAL_ONLY = 4


def onnxruntime_session(model_bytes: bytes, threads: int | None = None) -> onnxruntime.InferenceSession:
    """A CPU session over `model_bytes` that logs fatal errors only, with `threads` intra-op threads when given."""
    import onnxruntime as ort

    ort.set_default_logger_severity(FATAL_ONLY)  # the process-wide logger, which session creation uses too
    options = ort.SessionOptions()
    options.log_severity_level = FATAL_ONLY
    if threads is not None:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
