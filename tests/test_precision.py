"""Reduced precision pass: which layers go to float16/bfloat16, where Casts go, boundary dtypes, accuracy."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.builder import Builder, BuilderConfig
from kiln.runtime.engine import Engine
from kiln.testing import run_oracle
from tests.conftest import rel_error


def _model(rng):
    w1 = (rng.standard_normal((8, 3, 3, 3)) / 5).astype(np.float32)
    w2 = (rng.standard_normal((8, 8, 3, 3)) / 8).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["a"], ["b"], name="relu1"),
        helper.make_node("Softmax", ["b"], ["s"], axis=1, name="softmax"),  # stays float32
        helper.make_node("Conv", ["s", "w2"], ["c"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Add", ["c", "b"], ["d"], name="add"),
        helper.make_node("Shape", ["d"], ["shp"], name="shape"),  # reads any type: no Cast in front
    ]
    # a dynamic batch, so that the Shape is a run-time layer (of a static tensor it folds to a constant)
    g = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("d", TensorProto.FLOAT, ["N", 8, 8, 8]),
                           helper.make_tensor_value_info("shp", TensorProto.INT64, [4])],
                          [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _steps(plan):
    return {s["name"]: s for s in plan.graph["steps"]}


def _dtype(plan, name):
    return plan.graph["values"][name]["type"]["dtype"]


@pytest.mark.parametrize("flag, low", [("fp16", "float16"), ("bf16", "bfloat16")])
def test_casts_only_where_types_change(flag, low):
    rng = np.random.default_rng(0)
    model = _model(rng)
    plan = Builder().build(model, BuilderConfig(**{flag: True}))
    steps = _steps(plan)
    casts = [s for s in plan.graph["steps"] if s["op"] == "Cast"]
    # x -> low (conv1), b -> float32 (softmax), s -> low (conv2), d -> float32 (graph output)
    assert len(casts) == 4, [(c["inputs"], c["outputs"]) for c in casts]
    assert _dtype(plan, steps["conv1"]["outputs"][0]) == low
    assert _dtype(plan, steps["softmax"]["outputs"][0]) == "float32"
    assert _dtype(plan, steps["conv2"]["outputs"][0]) == low
    assert steps["shape"]["inputs"][0] != "d"  # reads the low-type value directly
    assert [o["dtype"] for o in plan.outputs] == ["float32", "int64"]
    assert [i["dtype"] for i in plan.inputs] == ["float32"]
    weights = {plan.graph["values"][steps["conv1"]["inputs"][1]]["type"]["dtype"]}
    assert weights == {low}
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    got = Engine(plan).create_execution_context().execute({"x": x})
    want = run_oracle(model, {"x": x})
    assert got["d"].dtype == np.float32
    assert rel_error(got["d"], want[0]) < (1e-2 if flag == "fp16" else 3e-2)
    np.testing.assert_array_equal(got["shp"], want[1])


def test_fp32_layers_fall_back():
    rng = np.random.default_rng(1)
    plan = Builder().build(_model(rng), BuilderConfig(fp16=True, fp32_layers=["conv2"]))
    steps = _steps(plan)
    assert _dtype(plan, steps["conv2"]["outputs"][0]) == "float32"
    assert _dtype(plan, steps["conv1"]["outputs"][0]) == "float16"


def test_no_flag_no_casts():
    plan = Builder().build(_model(np.random.default_rng(2)), BuilderConfig())
    assert not [s for s in plan.graph["steps"] if s["op"] == "Cast"]


def _attention_model(rng):
    """x [N, S, 24] -> qkv projection -> Split into q, k, v -> softmax(q k^T) v: three outputs of one Split."""
    w = (rng.standard_normal((24, 72)) / 5).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["qkv"], name="proj"),
        helper.make_node("Split", ["qkv"], ["q", "k", "v"], axis=2, num_outputs=3, name="split"),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1], name="kt"),
        helper.make_node("MatMul", ["q", "kt"], ["scores"], name="qk"),
        helper.make_node("Softmax", ["scores"], ["p"], axis=-1, name="softmax"),  # stays float32
        helper.make_node("MatMul", ["p", "v"], ["y"], name="pv"),
    ]
    g = helper.make_graph(nodes, "attn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "S", 24])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "S", 24])],
                          [numpy_helper.from_array(w, "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("blind", [False, True])
def test_low_precision_holds_where_inference_is_blind(monkeypatch, blind):
    """Element types the pass cannot see (an op whose inference fails on symbolic dims, as torch 2.11's fake
    matmul did on the GPU machine) must not leave a layer with a float16 and a float32 operand: every output
    of a lowered Split is float16, and a layer reading an unknown type gets what its producers really make."""
    from kiln.builder import OptimizationProfile
    from kiln.ir.types import TensorType
    from kiln.ops import linalg
    if blind:
        monkeypatch.setattr(linalg.MatMul, "infer", lambda self, node, types, consts: [TensorType(None, None)])
    rng = np.random.default_rng()
    model = _attention_model(rng)
    prof = OptimizationProfile().set_shape("x", (1, 4, 24), (2, 16, 24), (3, 32, 24))
    plan = Builder().build(model, BuilderConfig(fp16=True, optimization_level=0, profiles=[prof]))
    x = rng.standard_normal((3, 11, 24)).astype(np.float32)
    got = Engine(plan).create_execution_context().execute({"x": x})["y"]
    want = run_oracle(model, {"x": x})[0]
    assert got.dtype == np.float32
    assert rel_error(got, want) < 1e-2
