"""ONNX backend conformance: the Backend adapter and the suite runner."""
