"""Kiln: a deep-learning inference optimizer and runtime (ONNX -> optimized plan -> fast runtime)."""
__version__ = "0.1.0"

from kiln.errors import KilnError  # noqa: E402

__all__ = ["KilnError", "__version__"]
