"""Quantization Lab's engine: train or load the MNIST Net, calibrate, quantize, evaluate, analyse.

Never imports streamlit; the dashboard and the CLI both call these modules.
"""

__version__ = "0.1.0"
