"""QuantizeLinear, DequantizeLinear, DynamicQuantizeLinear, ConvInteger, QLinearConv and QLinearMatMul
against onnxruntime (and the ONNX reference where onnxruntime lacks a case)."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from onnx.reference import ReferenceEvaluator

from kiln.testing import check_model, make_node_model, run_kiln, run_oracle

INT_TYPES = ["uint8", "int8", "uint16", "int16"]
F8_TYPES = [ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e4m3fnuz, ml_dtypes.float8_e5m2, ml_dtypes.float8_e5m2fnuz]


def _zp(rng: np.random.Generator, dtype: str, shape: tuple[int, ...] = ()) -> np.ndarray:
    info = np.iinfo(dtype)
    lo, hi = max(info.min, -100), min(info.max, 100 if info.min < 0 else 200)
    return np.asarray(rng.integers(lo, hi + 1, shape)).astype(dtype)


def _scale(rng: np.random.Generator, shape: tuple[int, ...] = ()) -> np.ndarray:
    return np.asarray(rng.uniform(0.01, 0.1, shape)).astype(np.float32)


@pytest.mark.parametrize("dtype", INT_TYPES)
@pytest.mark.parametrize("mode", ["tensor", "axis0", "axis1", "axis-1"])
def test_quantize_int(dtype: str, mode: str) -> None:
    rng = np.random.default_rng()
    x = rng.uniform(-20, 20, (3, 4, 5)).astype(np.float32)
    x.flat[:3] = [0.5 * 0.05, 1e6, -1e6]  # saturation
    shape: tuple[int, ...] = () if mode == "tensor" else (x.shape[int(mode[4:])],)
    attrs = {} if mode == "tensor" else {"axis": int(mode[4:])}
    consts = {"scale": _scale(rng, shape), "zp": _zp(rng, dtype, shape)}
    model = make_node_model("QuantizeLinear", {"x": x}, 1, attrs, opset=21, const_inputs=consts)
    check_model(model, {"x": x})


def test_quantize_round_half_even() -> None:
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 254.5, 255.5], dtype=np.float32)
    for dtype in ("int8", "uint8"):
        model = make_node_model("QuantizeLinear", {"x": x}, 1, opset=13,
                                const_inputs={"scale": np.array(1.0, np.float32), "zp": np.array(0, dtype)})
        check_model(model, {"x": x})


def test_quantize_default_uint8_and_output_dtype() -> None:
    rng = np.random.default_rng()
    x = rng.uniform(-5, 30, (4, 6)).astype(np.float32)
    check_model(make_node_model("QuantizeLinear", {"x": x}, 1, opset=10, const_inputs={"scale": _scale(rng)}),
                {"x": x})
    model = make_node_model("QuantizeLinear", {"x": x}, 1, {"output_dtype": 3}, opset=21,
                            const_inputs={"scale": _scale(rng)})
    check_model(model, {"x": x})


@pytest.mark.parametrize("xdtype", ["float16", "bfloat16"])
def test_quantize_low_precision_input(xdtype: str) -> None:
    rng = np.random.default_rng()
    dt = np.float16 if xdtype == "float16" else ml_dtypes.bfloat16
    x = rng.uniform(-5, 5, (4, 6)).astype(dt)
    model = make_node_model("QuantizeLinear", {"x": x}, 1, opset=21,
                            const_inputs={"scale": np.array(0.05, dt), "zp": np.array(3, np.int8)})
    check_model(model, {"x": x}, oracle="reference")


@pytest.mark.parametrize("dtype", INT_TYPES)
@pytest.mark.parametrize("axis,block", [(0, 2), (1, 3), (-1, 4)])
def test_quantize_blocked(dtype: str, axis: int, block: int) -> None:
    rng = np.random.default_rng()
    x = rng.uniform(-20, 20, (4, 6, 8)).astype(np.float32)
    shape = list(x.shape)
    shape[axis] = -(-shape[axis] // block)
    consts = {"scale": _scale(rng, tuple(shape)), "zp": _zp(rng, dtype, tuple(shape))}
    model = make_node_model("QuantizeLinear", {"x": x}, 1, {"axis": axis, "block_size": block}, opset=21,
                            const_inputs=consts)
    check_model(model, {"x": x}, oracle="reference")
    dq = make_node_model("DequantizeLinear", {"q": run_kiln(model, {"x": x})[0]}, 1,
                         {"axis": axis, "block_size": block}, opset=21, const_inputs=consts)
    check_model(dq, {"q": run_kiln(model, {"x": x})[0]}, oracle="reference")


def _same_f8(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got.astype(np.float32), want.astype(np.float32))


@pytest.mark.parametrize("f8", F8_TYPES)
@pytest.mark.parametrize("saturate", [0, 1])
def test_quantize_float8(f8: type, saturate: int) -> None:
    rng = np.random.default_rng()
    x = (rng.standard_normal((3, 4, 5)) * 200).astype(np.float32)
    x.flat[:4] = [np.inf, -np.inf, 1e9, 470.0]
    model = make_node_model("QuantizeLinear", {"x": x}, 1, {"saturate": saturate}, opset=19,
                            const_inputs={"scale": np.array(1.0, np.float32), "zp": np.zeros((), f8)})
    (got,) = run_kiln(model, {"x": x})
    (want,) = ReferenceEvaluator(model).run(None, {"x": x})  # onnxruntime mis-rounds some overflows
    _same_f8(got, np.asarray(want))


@pytest.mark.parametrize("dtype", INT_TYPES + ["int32"])
@pytest.mark.parametrize("mode", ["tensor", "axis1", "nozp"])
def test_dequantize_int(dtype: str, mode: str) -> None:
    rng = np.random.default_rng()
    info = np.iinfo(dtype)
    x = rng.integers(max(info.min, -30000), min(info.max, 30000), (3, 4, 5), endpoint=True).astype(dtype)
    shape: tuple[int, ...] = (4,) if mode == "axis1" else ()
    consts = {"scale": _scale(rng, shape)}
    if mode != "nozp" and dtype != "int32":
        consts["zp"] = _zp(rng, dtype, shape)
    model = make_node_model("DequantizeLinear", {"x": x}, 1, {"axis": 1}, opset=21, const_inputs=consts)
    check_model(model, {"x": x})


@pytest.mark.parametrize("f8", F8_TYPES)
def test_dequantize_float8(f8: type) -> None:
    rng = np.random.default_rng()
    x = (rng.standard_normal((4, 5)) * 20).astype(f8)
    model = make_node_model("DequantizeLinear", {"x": x}, 1, opset=19,
                            const_inputs={"scale": np.array(0.5, np.float32)})
    check_model(model, {"x": x}, oracle="reference")


def test_dequantize_float16_scale_and_output_dtype() -> None:
    rng = np.random.default_rng()
    x = rng.integers(-128, 128, (4, 5)).astype(np.int8)
    consts = {"scale": np.array(0.03, np.float16), "zp": np.array(-3, np.int8)}
    check_model(make_node_model("DequantizeLinear", {"x": x}, 1, opset=21, const_inputs=consts), {"x": x},
                rtol=1e-3, atol=1e-3)
    consts = {"scale": np.array(0.03, np.float32), "zp": np.array(-3, np.int8)}
    model = make_node_model("DequantizeLinear", {"x": x}, 1, {"output_dtype": 10}, opset=23, const_inputs=consts)
    check_model(model, {"x": x}, rtol=1e-3, atol=1e-3, oracle="reference")


@pytest.mark.parametrize("case", ["mixed", "positive", "negative", "zeros"])
def test_dynamic_quantize(case: str) -> None:
    rng = np.random.default_rng()
    x = rng.uniform(-3, 5, (3, 7)).astype(np.float32)
    x = {"mixed": x, "positive": np.abs(x) + 0.5, "negative": -np.abs(x) - 0.5, "zeros": x * 0}[case]
    check_model(make_node_model("DynamicQuantizeLinear", {"x": x}, 3, opset=11), {"x": x})


def _conv_attrs(variant: str) -> dict:
    return {"plain": {}, "pads": {"pads": [1, 0, 2, 1]}, "strides": {"strides": [2, 1], "dilations": [1, 2]},
            "same": {"auto_pad": "SAME_UPPER"}, "group": {"group": 2}}[variant]


@pytest.mark.parametrize("variant", ["plain", "pads", "strides", "same", "group"])
@pytest.mark.parametrize("xt,wt", [("uint8", "uint8"), ("uint8", "int8"), ("int8", "int8")])
def test_conv_integer(variant: str, xt: str, wt: str) -> None:
    rng = np.random.default_rng()
    attrs = _conv_attrs(variant)
    group = attrs.get("group", 1)
    x = _zp(rng, xt, (2, 4, 7, 6))
    w = _zp(rng, wt, (6, 4 // group, 3, 3))
    consts = {"x_zp": _zp(rng, xt), "w_zp": _zp(rng, wt)}
    model = make_node_model("ConvInteger", {"x": x, "w": w}, 1, attrs, opset=10, const_inputs=consts)
    check_model(model, {"x": x, "w": w})


@pytest.mark.parametrize("variant", ["plain", "pads", "strides", "group"])
@pytest.mark.parametrize("xt,wt", [("uint8", "uint8"), ("uint8", "int8"), ("int8", "int8")])
@pytest.mark.parametrize("per_channel", [False, True])
def test_qlinear_conv(variant: str, xt: str, wt: str, per_channel: bool) -> None:
    rng = np.random.default_rng()
    attrs = _conv_attrs(variant)
    group = attrs.get("group", 1)
    x = _zp(rng, xt, (2, 4, 7, 6))
    w = _zp(rng, wt, (6, 4 // group, 3, 3))
    ch: tuple[int, ...] = (6,) if per_channel else ()
    w_zp = np.zeros(ch, wt) if wt == "int8" else _zp(rng, wt, ch)  # onnxruntime: int8 weights are symmetric
    consts = {"x_scale": _scale(rng), "x_zp": _zp(rng, xt), "w_scale": _scale(rng, ch), "w_zp": w_zp,
              "y_scale": np.array(rng.uniform(0.5, 2), np.float32), "y_zp": _zp(rng, xt),
              "B": rng.integers(-5000, 5000, 6).astype(np.int32)}
    feeds = {"x": x, "w": w}
    model = make_node_model("QLinearConv", feeds, 1, attrs, opset=10, const_inputs=consts)
    model.graph.node[0].input[:] = ["x", "x_scale", "x_zp", "w", "w_scale", "w_zp", "y_scale", "y_zp", "B"]
    # the ONNX reference evaluator (exact integer numpy) where onnxruntime multiplies u8 x s8: its kernel saturates
    # 16-bit pair sums on x86 CPUs without VNNI (vpmaddubsw)
    want = ReferenceEvaluator(model).run(None, feeds)[0] if (xt, wt) == ("uint8", "int8") else \
        run_oracle(model, feeds)[0]
    (got,) = run_kiln(model, feeds)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("at,bt", [("uint8", "uint8"), ("int8", "int8"), ("uint8", "int8")])
@pytest.mark.parametrize("shapes", [((3, 4), (4, 5)), ((2, 3, 4), (4, 5)), ((2, 3, 4), (2, 4, 5))])
def test_qlinear_matmul(at: str, bt: str, shapes: tuple[tuple[int, ...], tuple[int, ...]]) -> None:
    rng = np.random.default_rng()
    a, b = _zp(rng, at, shapes[0]), _zp(rng, bt, shapes[1])
    consts = {"a_scale": _scale(rng), "a_zp": _zp(rng, at), "b_scale": _scale(rng), "b_zp": _zp(rng, bt),
              "y_scale": np.array(rng.uniform(0.05, 0.2), np.float32), "y_zp": _zp(rng, at)}
    feeds = {"a": a, "b": b}
    model = make_node_model("QLinearMatMul", feeds, 1, opset=10, const_inputs=consts)
    names = ["a", "a_scale", "a_zp", "b", "b_scale", "b_zp", "y_scale", "y_zp"]
    model.graph.node[0].input[:] = names
    (got,), (want,) = run_kiln(model, feeds), run_oracle(model, feeds)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


def test_qlinear_matmul_float16_scales() -> None:
    rng = np.random.default_rng()
    a, b = _zp(rng, "uint8", (3, 4)), _zp(rng, "uint8", (4, 5))
    h = lambda v: np.array(v, np.float16)  # noqa: E731
    consts = {"a_scale": h(0.05), "a_zp": _zp(rng, "uint8"), "b_scale": h(0.04), "b_zp": _zp(rng, "uint8"),
              "y_scale": h(0.3), "y_zp": _zp(rng, "uint8")}
    feeds = {"a": a, "b": b}
    model = make_node_model("QLinearMatMul", feeds, 1, opset=21, const_inputs=consts)
    model.graph.node[0].input[:] = ["a", "a_scale", "a_zp", "b", "b_scale", "b_zp", "y_scale", "y_zp"]
    (got,), (want,) = run_kiln(model, feeds), run_oracle(model, feeds)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)
