"""Deployment side of ccpurify: ONNX export with numerical verification, INT8 quantization and
onnxruntime latency benchmarks. Takes any ``nn.Module`` (or ONNX file); imports nothing from the
passes."""
