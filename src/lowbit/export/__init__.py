"""Getting a quantized model out: the safetensors + JSON artifact, and ONNX export."""
