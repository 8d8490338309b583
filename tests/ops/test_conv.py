"""Conv, ConvTranspose, DeformConv (kiln/ops/conv.py) against onnxruntime / the ONNX reference evaluator.

float16/float64 cases run Kiln on the cast inputs and compare with the oracle run in float32 on the
same values (onnxruntime has no float64 Conv kernel).
"""
from __future__ import annotations

import numpy as np
import pytest

from kiln.testing import make_node_model, run_kiln, run_oracle

FLOATS = [np.float32, np.float16, np.float64]


def rand(*shape: int, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng().uniform(-1, 1, shape) * scale).astype(np.float32)


def check(op: str, inputs: dict[str, np.ndarray], attrs: dict | None = None, opset: int = 17,
          dtype: type = np.float32, outputs: int = 1, oracle: str = "auto") -> None:
    """Kiln on float inputs cast to `dtype` vs the oracle on the same values in float32."""
    cast = {k: v.astype(dtype) if v.dtype.kind == "f" else v for k, v in inputs.items()}
    ref_in = {k: v.astype(np.float32) if v.dtype.kind == "f" else v for k, v in cast.items()}
    model = make_node_model(op, cast, outputs, attrs, opset=opset)
    got = run_kiln(model, {k: v for k, v in cast.items() if not k.startswith("_")})
    ref_model = make_node_model(op, ref_in, outputs, attrs, opset=opset)
    feeds = {k: v for k, v in ref_in.items() if not k.startswith("_")}
    if oracle == "reference":
        from onnx.reference import ReferenceEvaluator
        want = ReferenceEvaluator(ref_model).run(None, feeds)
    else:
        want = run_oracle(ref_model, feeds)
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == np.float16 else {"rtol": 1e-4, "atol": 1e-4}
    for i, (g, w) in enumerate(zip(got, want)):
        g, w = np.asarray(g), np.asarray(w)
        assert g.shape == w.shape, f"output {i}: shape {g.shape} != {w.shape}"
        if w.dtype.kind == "f":
            assert g.dtype == np.dtype(dtype), f"output {i}: dtype {g.dtype}"
            np.testing.assert_allclose(g.astype(np.float64), w, err_msg=f"output {i}", **tol)
        else:
            assert g.dtype == w.dtype
            np.testing.assert_array_equal(g, w)


CONV_CASES = [
    # (x shape, w shape, attrs)
    ((1, 3, 9), (4, 3, 3), {}),
    ((2, 4, 8, 7), (6, 2, 3, 3), {"group": 2, "strides": [2, 1], "pads": [1, 0, 2, 1]}),
    ((1, 3, 8, 9), (5, 3, 3, 2), {"dilations": [2, 3], "pads": [0, 2, 1, 0]}),
    ((1, 2, 7, 8), (4, 2, 3, 3), {"auto_pad": "SAME_UPPER", "strides": [2, 3]}),
    ((1, 2, 7, 8), (4, 2, 4, 2), {"auto_pad": "SAME_LOWER", "strides": [2, 2]}),
    ((1, 2, 7, 8), (4, 2, 3, 3), {"auto_pad": "VALID", "strides": [2, 2], "dilations": [1, 2]}),
    ((1, 6, 5, 6, 4), (6, 1, 2, 3, 2), {"group": 6, "pads": [1, 0, 1, 0, 2, 0], "strides": [1, 2, 1]}),
    ((1, 4, 6, 5, 5), (2, 4, 3, 3, 3), {"auto_pad": "SAME_UPPER", "dilations": [1, 2, 1]}),
]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("xs,ws,attrs", CONV_CASES)
def test_conv(xs, ws, attrs, bias, dtype) -> None:
    inputs = {"x": rand(*xs), "w": rand(*ws)}
    if bias:
        inputs["b"] = rand(ws[0])
    check("Conv", inputs, attrs, dtype=dtype)


CONV_T_CASES = [
    ((1, 3, 5), (3, 2, 3), {"strides": [2]}),
    ((1, 2, 4, 5), (2, 3, 3, 3), {"strides": [2, 3], "output_padding": [1, 2]}),
    ((1, 2, 4, 5), (2, 3, 3, 2), {"pads": [1, 0, 2, 1], "strides": [2, 2]}),
    ((1, 2, 4, 4), (2, 2, 3, 3), {"strides": [3, 2], "output_shape": [12, 9]}),
    ((1, 2, 4, 4), (2, 2, 3, 3), {"strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    ((1, 2, 4, 4), (2, 2, 4, 3), {"strides": [2, 3], "auto_pad": "SAME_LOWER"}),
    ((1, 2, 4, 4), (2, 2, 3, 3), {"strides": [2, 2], "dilations": [2, 3]}),
    ((2, 4, 3, 4), (4, 3, 2, 3), {"group": 2, "strides": [2, 1], "pads": [0, 1, 1, 0]}),
    ((1, 2, 3, 4, 3), (2, 2, 2, 3, 2), {"strides": [2, 1, 2], "output_padding": [1, 0, 0]}),
    ((1, 2, 5, 5), (2, 2, 3, 3), {"pads": [3, 3, 3, 3]}),
]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("xs,ws,attrs", CONV_T_CASES)
def test_conv_transpose(xs, ws, attrs, bias, dtype) -> None:
    inputs = {"x": rand(*xs), "w": rand(*ws)}
    if bias:
        inputs["b"] = rand(ws[1] * attrs.get("group", 1))
    check("ConvTranspose", inputs, attrs, dtype=dtype)


DEFORM_CASES = [
    # x shape, w shape, out spatial, attrs
    ((1, 2, 5, 5), (3, 2, 3, 3), (3, 3), {}),
    ((2, 4, 6, 5), (4, 2, 2, 2), (3, 5), {"group": 2, "offset_group": 2, "pads": [1, 0, 0, 1], "strides": [2, 1]}),
    ((1, 2, 7, 6), (2, 2, 2, 2), (3, 5), {"dilations": [2, 1], "strides": [2, 1]}),
]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("extras", ["none", "bias_mask"])
@pytest.mark.parametrize("xs,ws,outs,attrs", DEFORM_CASES)
def test_deform_conv(xs, ws, outs, attrs, extras, dtype) -> None:
    og = attrs.get("offset_group", 1)
    k = ws[2] * ws[3]
    inputs = {"x": rand(*xs), "w": rand(*ws), "offset": rand(xs[0], og * k * 2, *outs, scale=2.0)}
    if extras == "bias_mask":
        inputs["b"] = rand(ws[0])
        inputs["mask"] = rand(xs[0], og * k, *outs)
    check("DeformConv", inputs, attrs, opset=19, dtype=dtype)


def test_conv_rejects_integer_input() -> None:
    from kiln.errors import KilnError
    x = np.ones((1, 1, 3, 3), np.int32)
    model = make_node_model("Conv", {"x": x, "w": np.ones((1, 1, 2, 2), np.int32)}, 1)
    with pytest.raises(KilnError):
        run_kiln(model, {"x": x, "w": np.ones((1, 1, 2, 2), np.int32)})
