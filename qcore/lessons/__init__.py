"""Lessons: the quantization mechanism shown on the current model's real numbers.

Each lesson is computed by the same qcore functions that compute results (the quantizer, the
integer engine), so a test can check a lesson against the engine.
"""
