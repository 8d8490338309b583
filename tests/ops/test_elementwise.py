"""Elementwise ops (kiln/ops/elementwise.py) against onnxruntime / the ONNX reference evaluator."""
from __future__ import annotations

import numpy as np
import pytest

from kiln.testing import make_node_model, check_model, run_kiln

FLOATS = [np.float32, np.float16, np.float64]
SINTS = [np.int8, np.int16, np.int32, np.int64]
UINTS = [np.uint8, np.uint16, np.uint32, np.uint64]
NUMERIC = FLOATS + SINTS + UINTS


def rand(dtype: type, shape: tuple[int, ...], lo: float | None = None, hi: float | None = None,
         nonzero: bool = False) -> np.ndarray:
    """Random data of a dtype: floats around [-4, 4], integers over the whole range by default."""
    rng = np.random.default_rng()
    dt = np.dtype(dtype)
    if dt == np.bool_:
        return rng.random(shape) < 0.5
    if dt.kind == "f":
        lo = -4.0 if lo is None else lo
        hi = 4.0 if hi is None else hi
        x = rng.uniform(lo, hi, shape).astype(dt)
    else:
        info = np.iinfo(dt)
        lo = info.min + (1 if dt.kind == "i" else 0) if lo is None else lo
        hi = info.max if hi is None else hi
        x = rng.integers(lo, hi, shape, dtype=dt, endpoint=True)
    if nonzero:
        x[x == 0] = 1
    return x


def tol(dtype: type) -> dict[str, float]:
    return {"rtol": 1e-2, "atol": 1e-3} if np.dtype(dtype) == np.float16 else {}


def check(op: str, inputs: dict[str, np.ndarray], attrs: dict | None = None, opset: int = 17,
          outputs: int = 1, **kw: float) -> list:
    model = make_node_model(op, inputs, outputs, attrs, opset=opset)
    return check_model(model, {k: v for k, v in inputs.items() if not k.startswith("_")}, **kw)


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div"])
@pytest.mark.parametrize("dtype", NUMERIC)
def test_arithmetic(op: str, dtype: type) -> None:
    a = rand(dtype, (3, 1, 4))
    b = rand(dtype, (2, 4), nonzero=op == "Div")
    if op == "Div" and np.dtype(dtype).kind == "i":
        b = rand(dtype, (2, 4), lo=-100, hi=100, nonzero=True)
    check(op, {"a": a, "b": b}, opset=14, **tol(dtype))


@pytest.mark.parametrize("dtype", [np.uint64, np.int64, np.int32])
def test_div_full_range_divisor(dtype: type) -> None:
    check("Div", {"a": rand(dtype, (64,)), "b": rand(dtype, (64,), nonzero=True)}, opset=14)


@pytest.mark.parametrize("fmod", [0, 1])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int8, np.int32, np.int64, np.uint8, np.uint32,
                                   np.uint64])
def test_mod(fmod: int, dtype: type) -> None:
    small = np.dtype(dtype).kind in "iu" and dtype != np.uint64
    b = rand(dtype, (4, 5), lo=-9 if np.dtype(dtype).kind == "i" else None, hi=9 if small else None, nonzero=True)
    check("Mod", {"a": rand(dtype, (3, 4, 5)), "b": b}, {"fmod": fmod}, opset=13)


@pytest.mark.parametrize("base,exp", [(np.float32, np.float32), (np.float32, np.int32), (np.float32, np.int64),
                                      (np.float32, np.uint32), (np.float16, np.float16), (np.float64, np.float32),
                                      (np.int32, np.float32), (np.int64, np.float32), (np.int32, np.int32),
                                      (np.int64, np.int64)])
def test_pow(base: type, exp: type) -> None:
    a = rand(base, (3, 4), lo=0.5 if np.dtype(base).kind == "f" else -5, hi=3 if np.dtype(base).kind == "f" else 5)
    b = rand(exp, (4,), lo=0 if np.dtype(exp).kind in "iu" else -2, hi=4)
    check("Pow", {"a": a, "b": b}, opset=15, **tol(base))


def test_pow_negative_integer_exponent() -> None:
    a = np.array([1, -1, -1, 2, -3, 0, 5], dtype=np.int64)
    b = np.array([-3, -2, -3, -1, -2, 2, 0], dtype=np.int64)
    (y,) = run_kiln(make_node_model("Pow", {"a": a, "b": b}, opset=15), {"a": a, "b": b})
    assert y.tolist() == [1, 1, -1, 0, 0, 0, 1]


@pytest.mark.parametrize("op", ["Neg", "Abs", "Sign"])
@pytest.mark.parametrize("dtype", NUMERIC)
def test_signed_unary(op: str, dtype: type) -> None:
    if op == "Neg" and dtype in UINTS:
        pytest.skip("Neg is not defined for unsigned types")
    x = rand(dtype, (3, 5))
    x.flat[0] = 0
    check(op, {"x": x}, opset=13)


UNARY_DOMAINS = {
    "Sqrt": (0.0, 9.0), "Exp": (-5.0, 5.0), "Log": (0.05, 9.0), "Reciprocal": (0.5, 4.0),
    "Floor": (-6.0, 6.0), "Ceil": (-6.0, 6.0), "Round": (-6.0, 6.0), "Erf": (-3.0, 3.0),
    "Sin": (-4.0, 4.0), "Cos": (-4.0, 4.0), "Tan": (-1.4, 1.4), "Asin": (-0.99, 0.99),
    "Acos": (-0.99, 0.99), "Atan": (-5.0, 5.0), "Sinh": (-3.0, 3.0), "Cosh": (-3.0, 3.0),
    "Asinh": (-5.0, 5.0), "Acosh": (1.01, 6.0), "Atanh": (-0.95, 0.95),
}


@pytest.mark.parametrize("op", sorted(UNARY_DOMAINS))
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_unary_math(op: str, dtype: type) -> None:
    lo, hi = UNARY_DOMAINS[op]
    x = rand(dtype, (4, 6), lo, hi)
    if op == "Round":
        x.flat[:4] = np.array([0.5, 1.5, 2.5, -2.5], dtype=dtype)
    check(op, {"x": x}, opset=13 if op != "Round" else 22, **tol(dtype))


@pytest.mark.parametrize("op", ["Max", "Min", "Sum", "Mean"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int8, np.int32, np.int64, np.uint16, np.uint32,
                                   np.uint64])
@pytest.mark.parametrize("n", [1, 3])
def test_variadic(op: str, dtype: type, n: int) -> None:
    if op == "Mean" and np.dtype(dtype).kind != "f":
        pytest.skip("Mean is float-only")
    shapes = [(2, 3, 4), (3, 1), (4,)][:n]
    check(op, {f"x{i}": rand(dtype, s) for i, s in enumerate(shapes)}, opset=13, **tol(dtype))


def test_max_nan_propagates() -> None:
    a = rand(np.float32, (6,))
    b = a.copy()
    b[2] = np.nan
    check("Max", {"a": a, "b": b}, opset=13)


@pytest.mark.parametrize("op", ["Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual"])
@pytest.mark.parametrize("dtype", NUMERIC)
def test_compare(op: str, dtype: type) -> None:
    a = rand(dtype, (3, 4), -3, 3) if np.dtype(dtype).kind in "fi" else rand(dtype, (3, 4))
    b = rand(dtype, (4,), -3, 3) if np.dtype(dtype).kind in "fi" else rand(dtype, (4,))
    b[0] = a[0, 0]
    check(op, {"a": a, "b": b}, opset=19 if op == "Equal" else 16)


def test_equal_bool() -> None:
    check("Equal", {"a": rand(np.bool_, (3, 4)), "b": rand(np.bool_, (4,))}, opset=19)


@pytest.mark.parametrize("op", ["And", "Or", "Xor"])
def test_logic(op: str) -> None:
    check(op, {"a": rand(np.bool_, (2, 3, 4)), "b": rand(np.bool_, (3, 1))})


def test_not() -> None:
    check("Not", {"x": rand(np.bool_, (3, 4))})


@pytest.mark.parametrize("op", ["BitwiseAnd", "BitwiseOr", "BitwiseXor"])
@pytest.mark.parametrize("dtype", SINTS + UINTS)
def test_bitwise(op: str, dtype: type) -> None:
    check(op, {"a": rand(dtype, (3, 4)), "b": rand(dtype, (4,))}, opset=18)


@pytest.mark.parametrize("dtype", SINTS + UINTS)
def test_bitwise_not(dtype: type) -> None:
    check("BitwiseNot", {"x": rand(dtype, (3, 4))}, opset=18)


@pytest.mark.parametrize("direction", ["LEFT", "RIGHT"])
@pytest.mark.parametrize("dtype", UINTS)
def test_bitshift_unsigned(direction: str, dtype: type) -> None:
    bits = np.dtype(dtype).itemsize * 8
    check("BitShift", {"x": rand(dtype, (3, 4)), "y": rand(dtype, (4,), 0, bits - 1)},
          {"direction": direction}, opset=18)


@pytest.mark.parametrize("direction", ["LEFT", "RIGHT"])
@pytest.mark.parametrize("dtype", SINTS + UINTS)
def test_bitshift_out_of_range(direction: str, dtype: type) -> None:
    bits = np.dtype(dtype).itemsize * 8
    lo = -3 if np.dtype(dtype).kind == "i" else 0
    y = rand(dtype, (5, 6), lo, min(bits + 4, np.iinfo(dtype).max))
    check("BitShift", {"x": rand(dtype, (5, 6)), "y": y}, {"direction": direction}, opset=28)


def test_isnan_isinf() -> None:
    x = rand(np.float32, (4, 5))
    x.flat[[0, 3, 7]] = [np.nan, np.inf, -np.inf]
    check("IsNaN", {"x": x}, opset=20)
    for pos in (0, 1):
        for neg in (0, 1):
            check("IsInf", {"x": x}, {"detect_positive": pos, "detect_negative": neg}, opset=20)


@pytest.mark.parametrize("dtype", [np.float32, np.int64, np.uint32, np.uint64, np.bool_, np.float16])
def test_where(dtype: type) -> None:
    check("Where", {"c": rand(np.bool_, (3, 1)), "x": rand(dtype, (3, 4)), "y": rand(dtype, (4,))}, opset=16)


@pytest.mark.parametrize("bounds", ["both", "min", "max", "none", "inverted"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int8, np.int64, np.uint32, np.uint64])
def test_clip(bounds: str, dtype: type) -> None:
    x = rand(dtype, (3, 4))
    lo, hi = np.sort(rand(dtype, (2,)))
    if bounds == "inverted":
        lo, hi = hi, lo
    inputs = {"x": x, "lo": np.array(lo, dtype=dtype), "hi": np.array(hi, dtype=dtype)}
    if bounds in ("max", "none"):
        inputs["_lo"] = inputs.pop("lo")
    if bounds in ("min", "none"):
        inputs["_hi"] = inputs.pop("hi")
        if bounds == "none":
            del inputs["_hi"]
    inputs = {k: inputs[k] for k in ("x", "lo", "_lo", "hi", "_hi") if k in inputs}
    check("Clip", inputs, opset=13)


@pytest.mark.parametrize("attrs", [{"min": -0.5, "max": 0.7}, {"min": 0.1}, {"max": -0.2}, {}])
def test_clip_attributes(attrs: dict) -> None:
    check("Clip", {"x": rand(np.float32, (3, 4))}, attrs, opset=6 + 4)


@pytest.mark.parametrize("dtype", [np.float32, np.int64, np.bool_])
def test_identity(dtype: type) -> None:
    check("Identity", {"x": rand(dtype, (2, 3))}, opset=21)


@pytest.mark.parametrize("opset", [10, 13])
def test_dropout_inference(opset: int) -> None:
    x = rand(np.float32, (3, 4))
    check_model(make_node_model("Dropout", {"x": x}, 2, opset=opset), {"x": x}, oracle="reference")
    check("Dropout", {"x": x}, opset=opset)


def test_dropout_training() -> None:
    x = rand(np.float32, (64, 64), 0.5, 2.0)
    ratio, train = np.array(0.25, np.float32), np.array(True)
    model = make_node_model("Dropout", {"x": x, "r": ratio, "t": train}, 2, opset=13)
    y, mask = run_kiln(model, {"x": x, "r": ratio, "t": train})
    assert mask.dtype == np.bool_ and y.dtype == np.float32
    np.testing.assert_allclose(y[mask], x[mask] / 0.75, rtol=1e-6)
    assert np.all(y[~mask] == 0)
    assert 0.15 < 1.0 - mask.mean() < 0.35
    y0, mask0 = run_kiln(model, {"x": x, "r": np.array(0.0, np.float32), "t": train})
    np.testing.assert_array_equal(y0, x)
    assert mask0.all()


LEGACY = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}


@pytest.mark.parametrize("op", sorted(LEGACY))
@pytest.mark.parametrize("b_shape,axis", [((3, 4), 1), ((2,), 0), ((4, 5), None), ((), None)])
def test_legacy_broadcast(op: str, b_shape: tuple[int, ...], axis: int | None) -> None:
    """Opset 6 `broadcast`/`axis` (no oracle implements it: numpy on b aligned at `axis`)."""
    a, b = rand(np.float32, (2, 3, 4, 5)), rand(np.float32, b_shape, 1.0, 2.0)
    attrs = {"broadcast": 1} if axis is None else {"broadcast": 1, "axis": axis}
    (y,) = run_kiln(make_node_model(op, {"a": a, "b": b}, 1, attrs, opset=6), {"a": a, "b": b})
    b_aligned = b if axis is None else b.reshape(b_shape + (1,) * (4 - axis - len(b_shape)))
    np.testing.assert_allclose(y, LEGACY[op](a, b_aligned), rtol=1e-6)
