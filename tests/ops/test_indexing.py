"""Indexing ops (kiln/ops/indexing.py) against onnxruntime / the ONNX reference evaluator."""
from __future__ import annotations

import numpy as np
import pytest

from kiln.testing import check_model, make_node_model, run_kiln

DTYPES = [np.float32, np.float16, np.int64, np.int32, np.uint8, np.int8, np.bool_]


def rand(*shape: int, dtype: type = np.float32) -> np.ndarray:
    rng = np.random.default_rng()
    if np.dtype(dtype) == np.bool_:
        return rng.integers(0, 2, shape).astype(np.bool_)
    if np.dtype(dtype).kind in "iu":
        return rng.integers(0, 100, shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def idx(high: int, *shape: int, negative: bool = True) -> np.ndarray:
    return np.random.default_rng().integers(-high if negative else 0, high, shape).astype(np.int64)


def i64(*v: int) -> np.ndarray:
    return np.array(v, dtype=np.int64)


def check(op: str, inputs: dict, attrs: dict | None = None, opset: int = 17, outputs: int = 1,
          const: dict | None = None, oracle: str = "auto") -> None:
    check_model(make_node_model(op, inputs, outputs, attrs, opset=opset, const_inputs=const), inputs, oracle=oracle)


@pytest.mark.parametrize("starts,ends,axes,steps", [
    ((1, 0), (3, 10), None, None), ((-3,), (-1,), (1,), None), ((10, -100), (-100, 100), (0, 2), (-1, 3)),
    ((3, 5), (0, -9), (-1, 1), (-2, -1)), ((0,), (2 ** 62,), (2,), (2,)), ((4,), (1,), (0,), (1,))])
@pytest.mark.parametrize("dtype", [np.float32, np.int64, np.bool_])
def test_slice(starts, ends, axes, steps, dtype) -> None:
    const = {"s": i64(*starts), "e": i64(*ends)}
    if axes:
        const["a"] = i64(*axes)
    if steps:
        const["a"] = const.get("a", i64(*range(len(starts))))
        const["p"] = i64(*steps)
    check("Slice", {"x": rand(5, 6, 7, dtype=dtype)}, opset=13, const=const)


def test_slice_opset9_and_runtime_inputs() -> None:
    x = rand(5, 6, 7)
    check("Slice", {"x": x}, {"starts": [1, -4], "ends": [100, -1], "axes": [2, 0]}, opset=9)
    check("Slice", {"x": x, "s": i64(0, 1), "e": i64(5, 4), "a": i64(1, 2), "p": i64(2, 1)}, opset=13)


@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("ishape", [(), (4,), (2, 3)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gather(axis, ishape, dtype) -> None:
    x = rand(3, 4, 5, dtype=dtype)
    check("Gather", {"x": x, "i": idx(x.shape[axis], *ishape)}, {"axis": axis})


@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("dtype", [np.float32, np.int32, np.uint8])
def test_gather_elements(axis, dtype) -> None:
    x = rand(3, 4, 5, dtype=dtype)
    shape = [3, 4, 5]
    shape[axis] = 2
    check("GatherElements", {"x": x, "i": idx(x.shape[axis], *shape)}, {"axis": axis})


@pytest.mark.parametrize("xshape,ishape,batch_dims", [
    ((4, 5, 6), (3, 2), 0), ((4, 5, 6), (2, 3, 3), 0), ((4, 5, 6), (4, 1), 1), ((2, 3, 4, 5), (2, 3, 2, 1), 2),
    ((2, 3, 4), (2, 2), 1)])
def test_gather_nd(xshape, ishape, batch_dims) -> None:
    k = ishape[-1]
    dims = xshape[batch_dims:batch_dims + k]
    i = np.stack([idx(d, *ishape[:-1]) for d in dims], axis=-1)
    check("GatherND", {"x": rand(*xshape), "i": i}, {"batch_dims": batch_dims}, opset=13)


def _unique_positions(n: int, count: int) -> np.ndarray:
    return np.random.default_rng().permutation(n)[:count]


@pytest.mark.parametrize("reduction", ["none", "add", "mul", "max", "min"])
@pytest.mark.parametrize("dtype", [np.float32, np.int64])
def test_scatter_nd(reduction, dtype) -> None:
    x = rand(4, 5, 3, dtype=dtype)
    flat = _unique_positions(20, 6) if reduction == "none" else np.random.default_rng().integers(0, 20, 6)
    i = np.stack([flat // 5, flat % 5], axis=-1).reshape(2, 3, 2).astype(np.int64)
    i[0, 0] -= i64(4, 5)
    check("ScatterND", {"x": x, "i": i, "u": rand(2, 3, 3, dtype=dtype)}, {"reduction": reduction}, opset=18)


@pytest.mark.parametrize("reduction", ["none", "add", "mul", "max", "min"])
@pytest.mark.parametrize("axis", [0, -1])
@pytest.mark.parametrize("dtype", [np.float32, np.int32])
def test_scatter_elements(reduction, axis, dtype) -> None:
    x = rand(4, 5, dtype=dtype)
    if reduction == "none":
        i = np.stack([_unique_positions(x.shape[axis], 3) for _ in range(2)], axis=1 if axis == 0 else 0)
        i = i.astype(np.int64) - (x.shape[axis] if axis else 0)
    else:
        shape = (3, 2) if axis == 0 else (2, 3)
        i = idx(x.shape[axis], *shape, negative=False)
    u = rand(*i.shape, dtype=dtype)
    check("ScatterElements", {"x": x, "i": i, "u": u}, {"axis": axis, "reduction": reduction}, opset=18)
    if reduction == "none":
        check("Scatter", {"x": x, "i": i, "u": u}, {"axis": axis}, opset=10)


@pytest.mark.parametrize("mode,axis", [("linear", -2), ("circular", -2), ("circular", 1)])
def test_tensor_scatter(mode, axis) -> None:
    past = rand(2, 6, 3, 4) if axis == 1 else rand(2, 3, 6, 4)
    ushape = list(past.shape)
    ushape[axis] = 2
    w = i64(1, 4) if mode == "linear" else i64(5, 3)
    check("TensorScatter", {"p": past, "u": rand(*ushape), "w": w}, {"mode": mode, "axis": axis}, opset=24,
          oracle="reference")


@pytest.mark.parametrize("dtype", [np.float32, np.int32, np.bool_, np.uint8])
def test_nonzero(dtype) -> None:
    x = rand(3, 4, 5, dtype=dtype)
    if dtype != np.bool_:
        x[x > np.median(x)] = 0
    check("NonZero", {"x": x})
    check("NonZero", {"x": rand(7, dtype=dtype)})


@pytest.mark.parametrize("axis", [-1, 0, 1])
@pytest.mark.parametrize("vdtype", [np.float32, np.int64])
def test_onehot(axis, vdtype) -> None:
    i = idx(7, 3, 4)
    i[0, 0] = 9
    vals = np.array([2, 5], dtype=vdtype)
    check("OneHot", {"i": i}, {"axis": axis}, opset=11, const={"d": np.array(6, np.int64), "v": vals})
    f = i.astype(np.float32)
    check("OneHot", {"i": f}, {"axis": axis}, opset=11, const={"d": np.array(6.0, np.float32), "v": vals})


@pytest.mark.parametrize("axis", [None, 0, 1, -1])
def test_compress(axis) -> None:
    x = rand(3, 4, 5)
    n = x.size if axis is None else x.shape[axis]
    cond = rand(n - 1, dtype=np.bool_)
    check("Compress", {"x": x, "c": cond}, {"axis": axis} if axis is not None else None)


@pytest.mark.parametrize("batch_axis,time_axis", [(1, 0), (0, 1)])
@pytest.mark.parametrize("dtype", [np.float32, np.int64])
def test_reverse_sequence(batch_axis, time_axis, dtype) -> None:
    shape = [5, 4, 3] if time_axis == 0 else [4, 5, 3]
    lens = np.random.default_rng().integers(1, 6, 4).astype(np.int64)
    check("ReverseSequence", {"x": rand(*shape, dtype=dtype), "l": lens},
          {"batch_axis": batch_axis, "time_axis": time_axis})


@pytest.mark.parametrize("sorted_", [0, 1])
@pytest.mark.parametrize("axis", [None, 0, 1, -1])
@pytest.mark.parametrize("outputs", [1, 4])
def test_unique(sorted_, axis, outputs) -> None:
    x = np.random.default_rng().integers(0, 3, (4, 5, 2)).astype(np.float32)
    if axis is not None:
        x = np.concatenate([x, x], axis=axis)
    attrs = {"sorted": sorted_}
    if axis is not None:
        attrs["axis"] = axis
    check("Unique", {"x": x}, attrs, outputs=outputs)


def test_unique_int() -> None:
    x = np.random.default_rng().integers(-5, 5, 30).astype(np.int64)
    check("Unique", {"x": x}, {"sorted": 0}, outputs=4)


def test_uint_and_float8_movement() -> None:
    """Gather/scatter on element types torch lacks kernels for (bit views)."""
    x = np.random.default_rng().integers(0, 2 ** 31, (4, 5)).astype(np.uint32)
    i = idx(4, 2, 5, negative=False)
    model = make_node_model("GatherElements", {"x": x, "i": i}, 1, {"axis": 0}, opset=13)
    np.testing.assert_array_equal(run_kiln(model, {"x": x, "i": i})[0], np.take_along_axis(x, i, 0))
    model = make_node_model("ReverseSequence", {"x": x, "l": i64(1, 2, 3, 4, 4)}, 1, {"batch_axis": 1,
                                                                                      "time_axis": 0})
    got = run_kiln(model, {"x": x, "l": i64(1, 2, 3, 4, 4)})[0]
    want = np.stack([np.concatenate([x[:n, b][::-1], x[n:, b]]) for b, n in enumerate([1, 2, 3, 4, 4])], axis=1)
    np.testing.assert_array_equal(got, want)


# ---- the host fast paths: non-negative indices skip the wrap, GatherND without batch dims gathers rows ----

@pytest.mark.parametrize("negative", [False, True])
@pytest.mark.parametrize("xshape", [(40,), (40, 4), (6, 5, 3)])
def test_gather_nd_rows_of_a_mask(xshape, negative) -> None:
    """torch's export of x[mask]: GatherND(x, Transpose(NonZero(mask))), batch_dims 0, one index dim."""
    rng = np.random.default_rng()
    i = np.nonzero(rng.uniform(size=xshape[0]) < 0.6)[0][:, None].astype(np.int64)
    if negative:
        i[::2] -= xshape[0]
    for oracle in ("auto", "reference"):
        check("GatherND", {"x": rand(*xshape), "i": i}, opset=13, oracle=oracle)


@pytest.mark.parametrize("ishape", [(0, 1), (0, 2), (2, 0, 2)])
def test_gather_nd_empty_indices(ishape) -> None:
    check("GatherND", {"x": rand(4, 5, 6), "i": np.zeros(ishape, np.int64)}, opset=13)


@pytest.mark.parametrize("negative", [False, True])
@pytest.mark.parametrize("axis,ishape", [(1, ()), (0, (7,)), (1, (0,)), (0, (2, 3))])
def test_gather_fast_path(axis, ishape, negative) -> None:
    x = rand(30, 7)
    i = idx(x.shape[axis], *ishape, negative=negative)
    for oracle in ("auto", "reference"):
        check("Gather", {"x": x, "i": i}, {"axis": axis}, oracle=oracle)


@pytest.mark.parametrize("op,bad", [("Gather", 40), ("Gather", -41), ("GatherND", 40), ("GatherND", -41)])
def test_out_of_range_indices_raise(op, bad) -> None:
    from kiln.errors import KilnError
    i = i64(3, bad, 0).reshape(3, 1) if op == "GatherND" else i64(3, bad, 0)
    feeds = {"x": rand(40, 2), "i": i}
    with pytest.raises(KilnError):
        run_kiln(make_node_model(op, feeds, 1, opset=13), feeds)


def test_gather_types_with_dynamic_dims() -> None:
    """Type inference runs the same computes on fake tensors: the host fast path must not read their values."""
    from kiln.ir.dtype import DType
    from kiln.ir.graph import Node, Value
    from kiln.ir.types import TensorType
    from kiln.ops.infer import infer_node
    x = Value("x", TensorType(DType.FLOAT32, ("n", 4)))
    i = Value("i", TensorType(DType.INT64, ("q", 1)))
    (t,) = infer_node(Node("GatherND", [x, i], [Value("y")], {}, name="g", opset=13))
    assert t == TensorType(DType.FLOAT32, ("q", 4)), t
    j = Value("j", TensorType(DType.INT64, ("q",)))
    (t,) = infer_node(Node("Gather", [x, j], [Value("z")], {"axis": 0}, name="h", opset=13))
    assert t == TensorType(DType.FLOAT32, ("q", 4)), t
