"""Reductions, ArgMax/ArgMin, TopK, CumSum and CumProd against onnxruntime (and the ONNX reference)."""
from __future__ import annotations

import numpy as np
import pytest

from kiln.testing import check_model, make_node_model, run_kiln

REDUCE = ["ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
          "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"]
SHAPE = (2, 3, 4)


def _input(op: str, dtype: str = "float32", shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    rng = np.random.default_rng()
    if np.dtype(dtype).kind in "iu":
        lo = 0 if np.dtype(dtype).kind == "u" else -5
        return rng.integers(lo, 6, shape).astype(dtype)
    if op == "ReduceLogSum":
        return rng.uniform(0.1, 2, shape).astype(dtype)
    return rng.uniform(-2, 2, shape).astype(dtype)


def _model(op: str, x: np.ndarray, axes: list[int] | None, opset: int, **attrs: int):
    input_from = 13 if op == "ReduceSum" else 18
    consts: dict[str, np.ndarray] = {}
    if axes is not None:
        if opset >= input_from:
            consts["axes"] = np.array(axes, dtype=np.int64)
        else:
            attrs["axes"] = axes  # type: ignore[assignment]
    return make_node_model(op, {"x": x}, 1, attrs, opset=opset, const_inputs=consts)


@pytest.mark.parametrize("op", REDUCE)
@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize("axes", [None, [-1], [0, 2]])
@pytest.mark.parametrize("keepdims", [0, 1])
def test_reduce(op: str, opset: int, axes: list[int] | None, keepdims: int) -> None:
    x = _input(op)
    check_model(_model(op, x, axes, opset, keepdims=keepdims), {"x": x}, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("op", REDUCE)
def test_noop_with_empty_axes(op: str) -> None:
    x = _input(op)
    check_model(_model(op, x, [], 18, noop_with_empty_axes=1), {"x": x})


@pytest.mark.parametrize("op", REDUCE)
def test_empty_axes_reduce_all(op: str) -> None:
    x = _input(op)
    check_model(_model(op, x, [], 18, keepdims=0), {"x": x})


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("op", REDUCE)
@pytest.mark.parametrize("keepdims", [0, 1])
def test_empty_set(op: str, keepdims: int) -> None:
    x = np.zeros((2, 0, 4), dtype=np.float32)
    check_model(_model(op, x, [1], 18, keepdims=keepdims), {"x": x}, oracle="reference")


@pytest.mark.parametrize("op", ["ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceMean", "ReduceL1",
                                "ReduceSumSquare"])
@pytest.mark.parametrize("dtype", ["int32", "int64", "float16", "float64"])
def test_reduce_dtypes(op: str, dtype: str) -> None:
    x = _input(op, dtype)
    tol = 5e-3 if dtype == "float16" else 1e-5
    check_model(_model(op, x, [1], 18, keepdims=0), {"x": x}, rtol=tol, atol=tol)


@pytest.mark.parametrize("op", ["ReduceMax", "ReduceMin"])
@pytest.mark.parametrize("dtype", ["uint8", "int8", "uint32", "uint64", "bool"])
def test_extremes_more_dtypes(op: str, dtype: str) -> None:
    rng = np.random.default_rng()
    if dtype == "bool":
        x = rng.integers(0, 2, SHAPE).astype(bool)
    elif dtype == "uint64":
        x = rng.integers(0, 2**63, SHAPE, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, SHAPE, dtype=np.uint64)
    else:
        info = np.iinfo(dtype)
        x = rng.integers(info.min, info.max, SHAPE, endpoint=True).astype(dtype)
    check_model(_model(op, x, [2], 20, keepdims=1), {"x": x}, oracle="reference")


@pytest.mark.parametrize("op", ["ArgMax", "ArgMin"])
@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("keepdims", [0, 1])
@pytest.mark.parametrize("last", [0, 1])
def test_arg_extreme(op: str, axis: int, keepdims: int, last: int) -> None:
    x = np.random.default_rng().integers(-2, 3, SHAPE).astype(np.float32)  # many ties
    attrs = {"axis": axis, "keepdims": keepdims, "select_last_index": last}
    check_model(make_node_model(op, {"x": x}, 1, attrs, opset=13), {"x": x})


@pytest.mark.parametrize("op", ["ArgMax", "ArgMin"])
@pytest.mark.parametrize("dtype", ["int32", "uint8", "uint32", "float16", "float64"])
def test_arg_extreme_dtypes(op: str, dtype: str) -> None:
    x = _input(op, dtype)
    check_model(make_node_model(op, {"x": x}, 1, {"axis": 1}, opset=13), {"x": x}, oracle="reference")


@pytest.mark.parametrize("largest", [0, 1])
@pytest.mark.parametrize("axis", [-1, 0, 1])
@pytest.mark.parametrize("k", [2])
@pytest.mark.parametrize("dtype", ["float32", "int64", "float64"])
def test_topk(largest: int, axis: int, k: int, dtype: str) -> None:
    x = np.random.default_rng().integers(-2, 3, SHAPE).astype(dtype)  # ties: lower index first
    model = make_node_model("TopK", {"x": x}, ["values", "indices"], {"axis": axis, "largest": largest},
                            opset=11, const_inputs={"k": np.array([k], dtype=np.int64)})
    check_model(model, {"x": x})


def test_topk_opset1_attribute() -> None:
    x = np.random.default_rng().standard_normal((3, 5)).astype(np.float32)
    model = make_node_model("TopK", {"x": x}, ["values", "indices"], {"k": 3}, opset=1)
    check_model(model, {"x": x})


def test_topk_uint64_and_unsorted() -> None:
    rng = np.random.default_rng()
    x = rng.integers(0, 2**64 - 1, (4, 6), dtype=np.uint64, endpoint=True)
    model = make_node_model("TopK", {"x": x}, ["values", "indices"], {"sorted": 1}, opset=11,
                            const_inputs={"k": np.array([3], dtype=np.int64)})
    check_model(model, {"x": x}, oracle="reference")
    model = make_node_model("TopK", {"x": x}, ["values", "indices"], {"sorted": 0}, opset=11,
                            const_inputs={"k": np.array([3], dtype=np.int64)})
    vals, idx = run_kiln(model, {"x": x})
    want = np.sort(x, axis=-1)[:, ::-1][:, :3]
    np.testing.assert_array_equal(np.sort(vals, axis=-1)[:, ::-1], want)
    np.testing.assert_array_equal(np.take_along_axis(x, idx, -1), vals)


@pytest.mark.parametrize("op", ["CumSum", "CumProd"])
@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("exclusive", [0, 1])
@pytest.mark.parametrize("reverse", [0, 1])
def test_scan(op: str, axis: int, exclusive: int, reverse: int) -> None:
    rng = np.random.default_rng()
    x = rng.uniform(0.5, 1.5, SHAPE).astype(np.float32)
    attrs = {"exclusive": exclusive, "reverse": reverse}
    opset = 26 if op == "CumProd" else 14
    model = make_node_model(op, {"x": x}, 1, attrs, opset=opset, const_inputs={"axis": np.array(axis)})
    check_model(model, {"x": x}, oracle="auto" if op == "CumSum" else "reference")


@pytest.mark.parametrize("op", ["CumSum", "CumProd"])
@pytest.mark.parametrize("dtype", ["int32", "int64", "uint32", "float64"])
def test_scan_dtypes(op: str, dtype: str) -> None:
    x = np.random.default_rng().integers(1, 4, SHAPE).astype(dtype)
    opset = 26 if op == "CumProd" else 14
    model = make_node_model(op, {"x": x}, 1, {"exclusive": 1}, opset=opset,
                            const_inputs={"axis": np.array(1, dtype=np.int32)})
    check_model(model, {"x": x}, oracle="reference")
