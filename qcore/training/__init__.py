"""Training: the float recipe and quantization-aware training."""
