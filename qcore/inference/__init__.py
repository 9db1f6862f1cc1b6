"""Running a quantized model: evaluation, the integer engine, PyTorch's int8 kernels, the engines compared."""
