"""Frontends: ONNX importer and the layer-by-layer network API."""
from kiln.frontend.network import NetworkDefinition
from kiln.frontend.onnx import load_onnx

__all__ = ["NetworkDefinition", "load_onnx"]
