"""Cast, CastLike, BitCast, Constant, ConstantOfShape, EyeLike, Range and the random generators."""
from __future__ import annotations

import itertools

import ml_dtypes
import numpy as np
import pytest
import torch
from onnx import TensorProto, helper

from kiln.errors import KilnError
from kiln.testing import check_model, make_node_model, run_kiln, run_oracle

NUMERIC = ["float32", "float16", "bfloat16", "float64", "int8", "int16", "int32", "int64",
           "uint8", "uint16", "uint32", "uint64", "bool"]
F8 = {"float8_e4m3fn": TensorProto.FLOAT8E4M3FN, "float8_e4m3fnuz": TensorProto.FLOAT8E4M3FNUZ,
      "float8_e5m2": TensorProto.FLOAT8E5M2, "float8_e5m2fnuz": TensorProto.FLOAT8E5M2FNUZ}


def _np_dtype(name: str) -> np.dtype:
    return np.dtype(getattr(ml_dtypes, name)) if name == "bfloat16" or name in F8 else np.dtype(name)


def _onnx(name: str) -> int:
    return F8[name] if name in F8 else helper.np_dtype_to_tensor_dtype(_np_dtype(name))


def _np(v: object) -> np.ndarray:
    """numpy view of an output (torch tensors included, bfloat16 and float 8 as ml_dtypes)."""
    if not isinstance(v, torch.Tensor):
        return np.asarray(v)
    v = v.cpu()
    if v.dtype == torch.bfloat16:
        return v.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    if v.dtype.is_floating_point and v.dtype.itemsize == 1:
        return v.view(torch.uint8).numpy().view(getattr(ml_dtypes, str(v.dtype).split(".")[-1]))
    return v.numpy()


def _reference(model: object, feeds: dict) -> np.ndarray:
    """The ONNX reference evaluator (onnxruntime mis-rounds some non-saturating float 8 casts)."""
    from onnx.reference import ReferenceEvaluator
    return np.asarray(ReferenceEvaluator(model).run(None, feeds)[0])


def _as_float(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32) if a.dtype.kind == "V" or a.dtype.itemsize == 1 and a.dtype.kind == "f" else a


@pytest.mark.parametrize("src,dst", list(itertools.product(NUMERIC, NUMERIC)))
def test_cast_pairs(src: str, dst: str) -> None:
    rng = np.random.default_rng()
    vals = rng.integers(0, 100, (3, 5)).astype(np.float64)
    if src in ("float32", "float16", "bfloat16", "float64"):
        vals += rng.uniform(0, 1, vals.shape)  # truncation toward zero into integers
        vals.flat[:2] = [0.0, -0.0]
    x = (vals != 0) if src == "bool" else vals.astype(_np_dtype(src))
    model = make_node_model("Cast", {"x": x}, 1, {"to": _onnx(dst)}, opset=13)
    got = _np(run_kiln(model, {"x": x})[0])
    want = _np(run_oracle(model, {"x": x})[0])
    assert got.dtype == _np_dtype(dst) and got.shape == x.shape
    np.testing.assert_array_equal(_as_float(got), _as_float(want.astype(got.dtype)))


@pytest.mark.parametrize("src", ["float32", "float16", "float64", "int32"])
@pytest.mark.parametrize("dst", list(F8))
@pytest.mark.parametrize("saturate", [0, 1])
def test_cast_to_float8(src: str, dst: str, saturate: int) -> None:
    rng = np.random.default_rng()
    x = (rng.standard_normal(40) * 300).astype(src)
    if src != "int32":
        x[:8] = [np.inf, -np.inf, np.nan, 1e4, -1e4, 464, 240, 61440]
    model = make_node_model("Cast", {"x": x}, 1, {"to": F8[dst], "saturate": saturate}, opset=19)
    got = _np(run_kiln(model, {"x": x})[0])
    want = _reference(model, {"x": x})
    assert got.dtype == _np_dtype(dst)
    np.testing.assert_array_equal(got.astype(np.float32), want.view(got.dtype).astype(np.float32))


@pytest.mark.parametrize("src", list(F8))
@pytest.mark.parametrize("dst", ["float32", "float16", "int32", "uint8", "bool", "float8_e5m2"])
def test_cast_from_float8(src: str, dst: str) -> None:
    rng = np.random.default_rng()
    x = np.abs(rng.standard_normal(30) * 8).astype(_np_dtype(src))
    model = make_node_model("Cast", {"x": x}, 1, {"to": _onnx(dst)}, opset=19)
    got = _np(run_kiln(model, {"x": x})[0])
    want = _reference(model, {"x": x})
    assert got.dtype == _np_dtype(dst)
    np.testing.assert_array_equal(_as_float(got), _as_float(want.view(got.dtype)))


def test_cast_int_wraparound_and_float_to_bool() -> None:
    x = np.array([200, -56, 70000, -1, 0], dtype=np.int64)
    for to in (TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16, TensorProto.UINT16, TensorProto.BOOL):
        check_model(make_node_model("Cast", {"x": x}, 1, {"to": to}, opset=13), {"x": x})
    f = np.array([0.0, -0.0, 0.1, -2.0, np.nan, np.inf], dtype=np.float32)
    check_model(make_node_model("Cast", {"x": f}, 1, {"to": TensorProto.BOOL}, opset=13), {"x": f})


@pytest.mark.parametrize("attrs", [{"to": TensorProto.STRING}, {"to": TensorProto.INT4}])
def test_cast_unsupported_types(attrs: dict) -> None:
    x = np.ones(3, np.float32)
    with pytest.raises(KilnError, match="Cast.*(STRING|INT4)"):
        run_kiln(make_node_model("Cast", {"x": x}, 1, attrs, opset=21), {"x": x})


@pytest.mark.parametrize("src,dst", [("float32", "float16"), ("float64", "int32"), ("int64", "float32"),
                                     ("float32", "bool"), ("bool", "float32"), ("uint8", "int64")])
def test_cast_like(src: str, dst: str) -> None:
    rng = np.random.default_rng()
    x = rng.uniform(0, 50, (2, 3)).astype(src)
    like = np.zeros(1, dtype=dst)
    model = make_node_model("CastLike", {"x": x}, 1, opset=15, const_inputs={"like": like})
    check_model(model, {"x": x})


def test_cast_like_float8_no_saturate() -> None:
    x = np.array([1.0, 500.0, -1e5, np.inf, 0.3], dtype=np.float32)
    like = np.zeros(1, dtype=ml_dtypes.float8_e4m3fn)
    model = make_node_model("CastLike", {"x": x}, 1, {"saturate": 0}, opset=19, const_inputs={"like": like})
    got = _np(run_kiln(model, {"x": x})[0])
    want = _reference(model, {"x": x})
    np.testing.assert_array_equal(got.astype(np.float32), want.view(got.dtype).astype(np.float32))


@pytest.mark.parametrize("src,dst", [("float32", "int32"), ("int64", "float64"), ("uint16", "int16"),
                                     ("bool", "uint8"), ("int8", "uint8"), ("float16", "bfloat16"),
                                     ("uint32", "float32")])
@pytest.mark.parametrize("shape", [(4,), (2, 3)])
def test_bitcast(src: str, dst: str, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng()
    n = int(np.prod(shape))
    if src == "bool":
        x = rng.integers(0, 2, shape).astype(bool)
    else:
        x = np.frombuffer(rng.bytes(n * _np_dtype(src).itemsize), dtype=_np_dtype(src)).reshape(shape).copy()
    model = make_node_model("BitCast", {"x": x}, 1, {"to": _onnx(dst)}, opset=26)
    got = _np(run_kiln(model, {"x": x})[0])
    assert got.dtype == _np_dtype(dst) and got.shape == shape
    np.testing.assert_array_equal(got.view(np.uint8), x.view(np.uint8))


def test_bitcast_width_mismatch() -> None:
    x = np.ones(3, np.float32)
    with pytest.raises(KilnError, match="bit width"):
        run_kiln(make_node_model("BitCast", {"x": x}, 1, {"to": TensorProto.INT64}, opset=26), {"x": x})


@pytest.mark.parametrize("attrs", [
    {"value": helper.make_tensor("v", TensorProto.FLOAT, [2, 2], [1.0, 2.0, 3.0, 4.0])},
    {"value": helper.make_tensor("v", TensorProto.INT8, [3], [1, -2, 3])},
    {"value_float": 2.5}, {"value_floats": [1.5, -2.0]}, {"value_int": 7}, {"value_ints": [3, 4, 5]},
])
def test_constant(attrs: dict) -> None:
    model = make_node_model("Constant", {}, 1, attrs, opset=13)
    got, want = _np(run_kiln(model, {})[0]), _np(run_oracle(model, {})[0])
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


def test_constant_sparse_value() -> None:
    vals = np.random.default_rng().standard_normal(2).astype(np.float32)
    sparse = helper.make_sparse_tensor(helper.make_tensor("v", TensorProto.FLOAT, [2], vals),
                                       helper.make_tensor("i", TensorProto.INT64, [2], [1, 4]), [2, 3])
    got = _np(run_kiln(make_node_model("Constant", {}, 1, {"sparse_value": sparse}, opset=13), {})[0])
    want = np.zeros((2, 3), np.float32)
    want.flat[[1, 4]] = vals
    np.testing.assert_array_equal(got, want)


def test_constant_string_is_unsupported() -> None:
    with pytest.raises(KilnError, match="string"):
        run_kiln(make_node_model("Constant", {}, 1, {"value_strings": ["a", "b"]}, opset=13), {})


@pytest.mark.parametrize("value", [None, helper.make_tensor("v", TensorProto.INT32, [1], [7]),
                                   helper.make_tensor("v", TensorProto.FLOAT16, [1], [1.5]),
                                   helper.make_tensor("v", TensorProto.BOOL, [1], [True])])
@pytest.mark.parametrize("shape", [[2, 3], [4], [0, 2], []])
def test_constant_of_shape(value: object, shape: list[int]) -> None:
    x = np.array(shape, dtype=np.int64)
    attrs = {} if value is None else {"value": value}
    check_model(make_node_model("ConstantOfShape", {"shape": x}, 1, attrs, opset=20), {"shape": x})


@pytest.mark.parametrize("k", [-2, 0, 1, 4])
@pytest.mark.parametrize("dtype", [None, TensorProto.FLOAT, TensorProto.INT32, TensorProto.DOUBLE])
@pytest.mark.parametrize("shape", [(3, 3), (3, 5), (5, 2)])
def test_eye_like(k: int, dtype: int | None, shape: tuple[int, int]) -> None:
    x = np.random.default_rng().integers(0, 9, shape).astype(np.int64)
    attrs = {"k": k} if dtype is None else {"k": k, "dtype": dtype}
    check_model(make_node_model("EyeLike", {"x": x}, 1, attrs, opset=9), {"x": x})


@pytest.mark.parametrize("dtype,start,limit,delta", [
    ("float32", 1.0, 5.5, 0.5), ("float32", 3.0, -2.0, -0.75), ("float64", 0.1, 1.0, 0.3),
    ("int32", 10, 4, -2), ("int64", -3, 20, 5), ("int16", 0, 7, 1), ("int32", 5, 5, 1), ("int64", 5, 0, 1),
])
def test_range(dtype: str, start: float, limit: float, delta: float) -> None:
    consts = {n: np.array(v, dtype=dtype) for n, v in (("start", start), ("limit", limit), ("delta", delta))}
    feeds = {k: v for k, v in consts.items()}
    check_model(make_node_model("Range", feeds, 1, opset=11), feeds)
    check_model(make_node_model("Range", {}, 1, opset=11, const_inputs=consts), {})


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_range_low_precision(dtype: str) -> None:
    dt = _np_dtype(dtype)
    consts = {"start": np.array(1.0, dt), "limit": np.array(40.0, dt), "delta": np.array(0.75, dt)}
    model = make_node_model("Range", {}, 1, opset=27, const_inputs=consts)
    got, want = _np(run_kiln(model, {})[0]), _np(run_oracle(model, {})[0])
    assert got.dtype == dt
    np.testing.assert_array_equal(got.astype(np.float32), want.astype(np.float32))


@pytest.mark.parametrize("op,attrs", [("RandomNormal", {"mean": 2.0, "scale": 3.0}),
                                      ("RandomUniform", {"low": -1.0, "high": 5.0})])
@pytest.mark.parametrize("dtype", [TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16])
def test_random(op: str, attrs: dict, dtype: int) -> None:
    model = make_node_model(op, {}, 1, {"shape": [200, 100], "dtype": dtype, **attrs}, opset=13)
    y = _np(run_kiln(model, {})[0])
    assert y.shape == (200, 100) and y.dtype == helper.tensor_dtype_to_np_dtype(dtype)
    y = y.astype(np.float64)
    if op == "RandomNormal":
        assert abs(y.mean() - 2.0) < 0.1 and abs(y.std() - 3.0) < 0.1
    else:
        assert y.min() >= -1.0 and y.max() <= 5.0 and abs(y.mean() - 2.0) < 0.1


@pytest.mark.parametrize("op", ["RandomNormalLike", "RandomUniformLike"])
@pytest.mark.parametrize("dtype", [None, TensorProto.DOUBLE])
def test_random_like(op: str, dtype: int | None) -> None:
    x = np.zeros((300, 50), np.float32)
    attrs = {} if dtype is None else {"dtype": dtype}
    y = _np(run_kiln(make_node_model(op, {"x": x}, 1, attrs, opset=13), {"x": x})[0])
    assert y.shape == x.shape and y.dtype == (np.float32 if dtype is None else np.float64)
    want_mean, want_std = (0.0, 1.0) if op == "RandomNormalLike" else (0.5, (1 / 12) ** 0.5)
    assert abs(y.mean() - want_mean) < 0.05 and abs(y.std() - want_std) < 0.05


def test_random_seed_is_reproducible() -> None:
    model = make_node_model("RandomUniform", {}, 1, {"shape": [50], "seed": 3.0}, opset=13)
    np.testing.assert_array_equal(_np(run_kiln(model, {})[0]), _np(run_kiln(model, {})[0]))


@pytest.mark.parametrize("dtype", [None, TensorProto.INT32, TensorProto.BOOL, TensorProto.DOUBLE])
def test_bernoulli(dtype: int | None) -> None:
    p = np.random.default_rng().uniform(0, 1, (100, 200)).astype(np.float32)
    attrs = {} if dtype is None else {"dtype": dtype}
    y = _np(run_kiln(make_node_model("Bernoulli", {"p": p}, 1, attrs, opset=15), {"p": p})[0])
    assert y.shape == p.shape
    assert y.dtype == (np.float32 if dtype is None else helper.tensor_dtype_to_np_dtype(dtype))
    assert set(np.unique(y.astype(np.float64))) <= {0.0, 1.0}
    assert abs(y.astype(np.float64).mean() - p.mean()) < 0.02


@pytest.mark.parametrize("dtype", [None, TensorProto.INT64])
def test_multinomial(dtype: int | None) -> None:
    probs = np.array([[0.1, 0.6, 0.3], [0.5, 0.0, 0.5]])
    logits = np.log(probs + 1e-30).astype(np.float32)
    attrs = {"sample_size": 4000} if dtype is None else {"sample_size": 4000, "dtype": dtype}
    y = _np(run_kiln(make_node_model("Multinomial", {"x": logits}, 1, attrs, opset=7), {"x": logits})[0])
    assert y.shape == (2, 4000) and y.dtype == (np.int32 if dtype is None else np.int64)
    for row, pr in zip(y, probs):
        freq = np.bincount(row, minlength=3) / row.size
        np.testing.assert_allclose(freq, pr, atol=0.04)
