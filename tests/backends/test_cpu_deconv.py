"""cpu.deconv_dnnl: ONNX ConvTranspose as oneDNN's deconvolution, against onnxruntime on fresh random inputs.

Geometries: strides, dilations, groups (depthwise too), explicit and asymmetric pads, output_padding (oneDNN sees a
negative end pad), auto_pad SAME and an output_shape attribute, with and without bias; static and dynamic H, W."""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.backends.cpu.dnnl import library
from kiln.backends.tactic import get_tactic
from kiln.builder import Builder, BuilderConfig, OptimizationProfile
from kiln.ir.dtype import DType
from kiln.ir.graph import Node, Value
from kiln.ir.types import TensorType
from kiln.logger import Logger
from kiln.runtime.engine import Engine
from kiln.testing import run_oracle

pytestmark = pytest.mark.skipif(library() is None, reason="oneDNN (onednn-cpu-gomp, the test extra) is not installed")

CASES: list[tuple[str, tuple[int, int], int, dict[str, Any]]] = [  # (id, kernel, group, attributes)
    ("s2k2", (2, 2), 1, {"strides": [2, 2]}),
    ("s2k3_pad_outpad", (3, 3), 1, {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]}),
    ("asym_pads", (4, 3), 1, {"strides": [2, 1], "pads": [1, 0, 2, 1]}),
    ("dilated", (3, 3), 1, {"strides": [1, 1], "dilations": [2, 2], "pads": [1, 1, 1, 1]}),
    ("grouped", (2, 2), 2, {"strides": [2, 2]}),
    ("depthwise", (4, 4), 6, {"strides": [2, 2], "pads": [1, 1, 1, 1]}),
    ("same_upper", (3, 3), 1, {"strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    ("output_shape", (3, 3), 1, {"strides": [2, 2], "output_shape": [12, 14]}),
    ("s3_outpad2", (3, 2), 1, {"strides": [3, 3], "output_padding": [2, 1]}),
]


def _model(kernel: tuple[int, int], group: int, attrs: dict[str, Any], bias: bool, h: Any, w: Any,
           rng: np.random.Generator) -> object:
    c, k = 6, (4 if group != 6 else 6)
    wt = (rng.standard_normal((c, k // group, *kernel)) * 0.4).astype(np.float32)
    inits = [numpy_helper.from_array(wt, "w")]
    ins = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(k).astype(np.float32), "b"))
        ins.append("b")
    node = helper.make_node("ConvTranspose", ins, ["y"], name="up", group=group, **attrs)
    g = helper.make_graph([node], "deconv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, h, w])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("bias", [True, False])
def test_deconv_matches_onnxruntime(case: tuple, bias: bool) -> None:
    _, kernel, group, attrs = case
    rng = np.random.default_rng()
    static = "output_shape" in attrs  # its output size is fixed: one input size
    m = _model(kernel, group, attrs, bias, 6 if static else "H", 7 if static else "W", rng)
    lo, opt, hi = ((1, 6, 6, 7), (1, 6, 6, 7), (2, 6, 6, 7)) if static else \
        ((1, 6, 3, 3), (1, 6, 8, 9), (2, 6, 17, 16))
    prof = OptimizationProfile().set_shape("x", lo, opt, hi)
    plan = Builder(Logger()).build(m, BuilderConfig(device="cpu", profiles=[prof], optimization_level=0))
    assert [s["tactic"] for s in plan.graph["steps"]] == ["cpu.deconv_dnnl"], plan.graph["steps"]
    ctx = Engine(plan).create_execution_context()
    shapes = [(2, 6, 6, 7)] if static else [(1, 6, 8, 9), (2, 6, 3, 16), (1, 6, *(int(v) for v in rng.integers(3, 17, 2)))]
    for shape in shapes:
        x = rng.standard_normal(shape).astype(np.float32)
        got, want = np.asarray(ctx.execute({"x": x})["y"]), run_oracle(m, {"x": x})[0]
        assert got.shape == want.shape, (shape, got.shape, want.shape)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(want).max())))


def test_deconv_declines() -> None:
    import torch
    t = get_tactic("cpu.deconv_dnnl")
    x = Value("x", TensorType(DType.FLOAT32, (1, 6, 8, 8)))
    ok = Node("ConvTranspose", [x, Value("w", const=torch.randn(6, 4, 2, 2))], [Value("y", TensorType(DType.FLOAT32,
              (1, 4, 16, 16)))], {"strides": [2, 2]}, name="d", opset=17)
    assert t.accepts(ok)
    runtime_w = Node("ConvTranspose", [x, Value("w", TensorType(DType.FLOAT32, (6, 4, 2, 2)))],
                     [Value("y", TensorType(DType.FLOAT32, (1, 4, 16, 16)))], {}, name="d", opset=17)
    wrong_c = Node("ConvTranspose", [x, Value("w", const=torch.randn(5, 4, 2, 2))],
                   [Value("y", TensorType(DType.FLOAT32, (1, 4, 16, 16)))], {}, name="d", opset=17)
    bad_bias = Node("ConvTranspose", [x, Value("w", const=torch.randn(6, 4, 2, 2)), Value("b", const=torch.randn(3))],
                    [Value("y", TensorType(DType.FLOAT32, (1, 4, 16, 16)))], {}, name="d", opset=17)
    x3 = Value("x", TensorType(DType.FLOAT32, (1, 6, 8)))
    one_d = Node("ConvTranspose", [x3, Value("w", const=torch.randn(6, 4, 2))],
                 [Value("y", TensorType(DType.FLOAT32, (1, 4, 16)))], {}, name="d", opset=17)
    for n in (runtime_w, wrong_c, bad_bias, one_d):
        assert not t.accepts(n), n


@pytest.mark.parametrize("tail", ["relu", "sigmoid", "residual_relu", "relu_residual", "hardswish", "gelu"])
def test_fused_deconv_epilogue_matches_onnxruntime(tail: str) -> None:
    """ConvTranspose + bias + activation (+ residual) becomes one FusedConvTranspose layer (the PP-OCR detector's
    upsampling + ReLU), run on oneDNN with the bias, residual and activation as post-ops."""
    rng = np.random.default_rng()
    wt = (rng.standard_normal((6, 4, 2, 2)) * 0.4).astype(np.float32)
    inits = [numpy_helper.from_array(wt, "w"), numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b")]
    nodes = [helper.make_node("ConvTranspose", ["x", "w", "b"], ["u"], name="up", strides=[2, 2])]
    residual = "residual" in tail  # fused only where its shape is provably the output's: static H, W then
    ins = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, 5, 7] if residual else ["N", 6, "H", "W"])]
    act = {"relu": "Relu", "sigmoid": "Sigmoid", "residual_relu": "Relu", "relu_residual": "Relu",
           "hardswish": "HardSwish", "gelu": "Gelu"}[tail]
    if tail == "residual_relu":
        ins.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, ["N", 4, 10, 14]))
        nodes += [helper.make_node("Add", ["u", "r"], ["s"]), helper.make_node(act, ["s"], ["y"])]
    elif tail == "relu_residual":
        ins.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, ["N", 4, 10, 14]))
        nodes += [helper.make_node(act, ["u"], ["a"]), helper.make_node("Add", ["a", "r"], ["y"])]
    else:
        nodes.append(helper.make_node(act, ["u"], ["y"]))
    g = helper.make_graph(nodes, "fused_up", ins, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20 if act == "Gelu" else 17)])
    plan = Builder(Logger()).build(m, BuilderConfig(device="cpu", optimization_level=0))
    steps = plan.graph["steps"]
    assert [s["op"] for s in steps] == ["FusedConvTranspose"], [(s["op"], s["tactic"]) for s in steps]
    assert steps[0]["tactic"] == "cpu.deconv_dnnl", steps  # every fusable activation is a oneDNN post-op
    ctx = Engine(plan).create_execution_context()
    for n, h, w in [(1, 5, 7), (2, 5, 7) if residual else (2, 8, 3)]:
        feeds = {"x": rng.standard_normal((n, 6, h, w)).astype(np.float32)}
        if residual:
            feeds["r"] = rng.standard_normal((n, 4, 2 * h, 2 * w)).astype(np.float32)
        got, want = np.asarray(ctx.execute(feeds)["y"]), run_oracle(m, feeds)[0]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
