"""Type inference with dims that are unknown at build time (dynamic H, W through pools, Reshape to
Shape(y)): element types and ranks must still reach every layer, or the CPU/CUDA tactics (which
require a known float32 rank-4 input) decline and layers fall to the reference tactic."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from kiln.builder import Builder, BuilderConfig, OptimizationProfile
from kiln.ir.dtype import DType
from kiln.ir.types import TensorType
from kiln.logger import Logger
from kiln.ops.registry import lookup
from kiln.ir.graph import Node, Value
from kiln.runtime.engine import Engine
from kiln.testing import run_oracle


def _unet(rng: np.random.Generator) -> object:
    w = {n: (rng.standard_normal(s) * 0.3).astype(np.float32) for n, s in
         {"w1": (8, 3, 3, 3), "w2": (16, 8, 3, 3), "wt": (16, 8, 2, 2), "w3": (8, 16, 3, 3)}.items()}
    w["gs"], w["g1"] = np.array([0, 2, -1], np.int64), np.array([1, 1], np.float32)
    w["g0"], w["gamma"] = np.array([0, 0], np.float32), rng.uniform(0.5, 1.5, (8, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["a"], ["a1"]),
             helper.make_node("MaxPool", ["a1"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p", "w2"], ["b"], pads=[1, 1, 1, 1]),
             helper.make_node("ConvTranspose", ["b", "wt"], ["u"], strides=[2, 2]),
             helper.make_node("Concat", ["a1", "u"], ["c"], axis=1),
             helper.make_node("Conv", ["c", "w3"], ["d"], pads=[1, 1, 1, 1]),
             # GroupNorm as exported by torch: Reshape to groups, InstanceNorm, Reshape back to Shape(d)
             helper.make_node("Reshape", ["d", "gs"], ["r"]),
             helper.make_node("InstanceNormalization", ["r", "g1", "g0"], ["n"]),
             helper.make_node("Shape", ["d"], ["ds"]), helper.make_node("Reshape", ["n", "ds"], ["r2"]),
             helper.make_node("Mul", ["r2", "gamma"], ["m"]), helper.make_node("Relu", ["m"], ["y"])]
    g = helper.make_graph(nodes, "unet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(v, k) for k, v in w.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_dynamic_spatial_dims_keep_types_and_tactics() -> None:
    rng = np.random.default_rng()
    m = _unet(rng)
    prof = OptimizationProfile().set_shape("x", (1, 3, 8, 8), (1, 3, 16, 16), (2, 3, 32, 32))
    # level 0: the heuristic choice, which is a native tactic wherever one takes the layer (with autotuning a
    # loaded machine can time the reference faster on the 3-channel 16x16 conv, and the check would be noise)
    plan = Builder(Logger()).build(m, BuilderConfig(device="cpu", profiles=[prof], optimization_level=0))
    steps, vals = plan.graph["steps"], plan.graph["values"]
    kinds = {s["op"]: s for s in steps}
    concat_out = vals[kinds["Concat"]["outputs"][0]]["type"]
    assert concat_out["dtype"] == "float32" and concat_out["shape"][:2] == ["N", 16], concat_out
    convs = [s for s in steps if s["op"] in ("Conv", "FusedConv")]
    assert len(convs) == 3 and all(s["tactic"] != "ref" for s in convs), [(s["name"], s["tactic"]) for s in convs]
    # the dims known through the ConvTranspose (and the Concat's guard, even H and W): the exported GroupNorm is
    # recognised as one layer with the Mul by gamma folded in
    assert kinds["GroupNormalization"]["tactic"] != "ref" and "Mul" not in kinds, [(s["name"], s["op"]) for s in steps]
    ctx = Engine(plan).create_execution_context()
    for shape in ((1, 3, 8, 8), (2, 3, 20, 12), (2, 3, 32, 32)):
        x = rng.standard_normal(shape).astype(np.float32)
        got, want = ctx.execute({"x": x})["y"], run_oracle(m, {"x": x})[0]
        assert np.abs(np.asarray(got) - want).max() <= 1e-4 * np.abs(want).max()


def _node(op: str, *types: TensorType) -> Node:
    ins = [Value(f"i{k}", t) for k, t in enumerate(types)]
    return Node(op, ins, [Value("o", TensorType(None, None))], {}, name=op, domain="", opset=17)


def test_unknown_dims_meet_symbols_and_broadcasts() -> None:
    f32 = DType.FLOAT32
    a, b = TensorType(f32, ("N", 16, "H", "W")), TensorType(f32, ("N", 8, None, None))
    n = _node("Concat", a, b)
    n.attrs["axis"] = 1
    out = lookup("Concat", "").infer(n, [a, b], [None, None])[0]
    assert out == TensorType(f32, ("N", 24, None, None))
    c = TensorType(f32, (None, 16, None, None))
    out = lookup("Mul", "").infer(_node("Mul", c, TensorType(f32, (16, 1, 1))),
                                  [c, TensorType(f32, (16, 1, 1))], [None, None])[0]
    assert out == TensorType(f32, (None, 16, None, None))
    out = lookup("Add", "").infer(_node("Add", c, TensorType(f32, (1, 1, 1))), [c, TensorType(f32, (1, 1, 1))],
                                  [None, None])[0]
    assert out.dtype == f32 and out.shape is not None and len(out.shape) == 4 and out.shape[1] == 16
