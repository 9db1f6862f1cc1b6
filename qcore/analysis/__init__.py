"""Explaining a quantized model: per-layer tables and sweeps, the diagnosis and its HTML report."""
