"""Kiln: a deep-learning inference optimizer and runtime (ONNX -> optimized plan -> fast runtime)."""
__version__ = "0.1.0"

from typing import Any  # noqa: E402

from kiln.errors import KilnError  # noqa: E402

__all__ = ["KilnError", "__version__", "from_torch"]


def __getattr__(name: str) -> Any:
    if name == "from_torch":  # imported on first use: `import kiln` stays light (no torch)
        from kiln.torch_export import from_torch
        return from_torch
    raise AttributeError(f"module 'kiln' has no attribute {name!r}")
