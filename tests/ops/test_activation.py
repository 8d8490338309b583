"""Activations and the softmax family (kiln/ops/activation.py) against onnxruntime / the ONNX reference."""
from __future__ import annotations

import numpy as np
import pytest

from kiln.testing import check_model, make_node_model

FLOATS = [np.float32, np.float16, np.float64]


def rand(dtype: type, shape: tuple[int, ...], scale: float = 3.0) -> np.ndarray:
    rng = np.random.default_rng()
    if np.dtype(dtype).kind == "f":
        return (rng.standard_normal(shape) * scale).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -100), min(info.max, 100), shape, dtype=dtype, endpoint=True)


def tol(dtype: type) -> dict[str, float]:
    return {"rtol": 1e-2, "atol": 2e-3} if np.dtype(dtype) == np.float16 else {"rtol": 1e-4, "atol": 1e-5}


def check(op: str, inputs: dict[str, np.ndarray], attrs: dict | None = None, opset: int = 22,
          dtype: type = np.float32, oracle: str = "auto") -> None:
    check_model(make_node_model(op, inputs, 1, attrs, opset=opset), inputs, oracle=oracle, **tol(dtype))


CASES = [
    ("Relu", {}, 14), ("LeakyRelu", {}, 16), ("LeakyRelu", {"alpha": 0.3}, 16), ("Elu", {}, 22),
    ("Elu", {"alpha": 0.5}, 22), ("Selu", {}, 22), ("Selu", {"alpha": 2.0, "gamma": 0.5}, 22),
    ("Celu", {}, 12), ("Celu", {"alpha": 2.0}, 12), ("Gelu", {}, 20), ("Gelu", {"approximate": "tanh"}, 20),
    ("HardSigmoid", {}, 22), ("HardSigmoid", {"alpha": 0.4, "beta": 0.3}, 22), ("HardSwish", {}, 22),
    ("Mish", {}, 22), ("Softplus", {}, 22), ("Softsign", {}, 22), ("ThresholdedRelu", {}, 22),
    ("ThresholdedRelu", {"alpha": 0.5}, 22), ("Sigmoid", {}, 13), ("Tanh", {}, 13),
    ("Shrink", {}, 9), ("Shrink", {"bias": 1.5, "lambd": 1.0}, 9), ("Shrink", {"bias": 2.0, "lambd": -1.0}, 9), ("Swish", {}, 24), ("Swish", {"alpha": 0.7}, 24),
]


@pytest.mark.parametrize("op,attrs,opset", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("dtype", FLOATS)
def test_activation(op: str, attrs: dict, opset: int, dtype: type) -> None:
    check(op, {"x": rand(dtype, (3, 4, 5))}, attrs, opset, dtype)


@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.int64])
def test_relu_int(dtype: type) -> None:
    check("Relu", {"x": rand(dtype, (4, 5))}, opset=14, dtype=dtype)


@pytest.mark.parametrize("attrs", [{"bias": 2.0, "lambd": 3.0}, {"bias": 1.5, "lambd": 2.5}])
@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.int64, np.uint8, np.uint32, np.uint64])
def test_shrink_int(dtype: type, attrs: dict) -> None:
    check("Shrink", {"x": rand(dtype, (4, 5))}, attrs, opset=9, dtype=dtype)


@pytest.mark.parametrize("slope_shape", [(5,), (4, 1), (1,), (3, 4, 5)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int32])
def test_prelu(slope_shape: tuple[int, ...], dtype: type) -> None:
    check("PRelu", {"x": rand(dtype, (3, 4, 5)), "slope": rand(dtype, slope_shape, 0.5)}, opset=16, dtype=dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("alpha", [1.0, 1.702])
def test_swiglu(dtype: type, alpha: float) -> None:
    check("SwiGLU", {"a": rand(dtype, (2, 3, 8)), "b": rand(dtype, (2, 3, 8))}, {"alpha": alpha}, opset=28,
          dtype=dtype, oracle="reference")


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax", "Hardmax"])
@pytest.mark.parametrize("axis", [None, 0, 1, 2, -1])
@pytest.mark.parametrize("opset", [11, 13])
def test_softmax_family(op: str, axis: int | None, opset: int) -> None:
    attrs = {} if axis is None else {"axis": axis}
    check(op, {"x": rand(np.float32, (3, 4, 5))}, attrs, opset=opset)


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_softmax_dtypes(op: str, dtype: type) -> None:
    check(op, {"x": rand(dtype, (2, 7), 10.0)}, opset=13, dtype=dtype)


def test_hardmax_ties_pick_first() -> None:
    x = np.round(rand(np.float32, (6, 5), 1.0))
    check("Hardmax", {"x": x}, {"axis": 1}, opset=13)


@pytest.mark.parametrize("opset", [6, 16])
def test_prelu_per_channel_slope(opset: int) -> None:
    x, slope = rand(np.float32, (2, 3, 4, 5)), rand(np.float32, (3,), 0.5)
    check("PRelu", {"x": x, "slope": slope}, opset=opset, oracle="reference")
