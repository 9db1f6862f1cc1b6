"""Quantizing a float model: the quantizer's formulas, observers and calibration, the PTQ methods,
the fake-quant simulation."""
