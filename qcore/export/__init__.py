"""Writing a quantized model out: integer tensors (qtensors) and ONNX in QDQ form."""
