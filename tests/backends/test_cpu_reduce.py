"""cpu.reduce_short: reductions over one short static axis, slice by slice, against onnxruntime.

Every op it takes, over each axis position, keepdims on and off, on a contiguous input and on one a
channels-last convolution hands it (a spectrogram's real/imaginary pair); NaN propagation for max/min."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from kiln.backends.tactic import get_tactic
from kiln.builder import Builder, BuilderConfig, OptimizationProfile
from kiln.ir.dtype import DType
from kiln.ir.graph import Node, Value
from kiln.ir.types import TensorType
from kiln.logger import Logger
from kiln.runtime.engine import Engine
from kiln.testing import run_oracle

OPS = ["ReduceSum", "ReduceSumSquare", "ReduceMean", "ReduceMax", "ReduceMin"]


def _model(op: str, axis: int, keep: int, shape: list, opset: int = 18) -> object:
    axes = numpy_helper.from_array(np.array([axis], np.int64), "axes")
    node = helper.make_node(op, ["x", "axes"], ["y"], name="r", keepdims=keep)
    g = helper.make_graph([node], "r", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [axes])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("axis, keep", [(1, 0), (1, 1), (-1, 0), (0, 1), (2, 1)])
def test_short_reduction_matches_onnxruntime(op: str, axis: int, keep: int) -> None:
    rng = np.random.default_rng()
    shape = [3, 2, 5, 4]
    m = _model(op, axis, keep, ["N", 2, 5, 4] if axis != 0 else shape)
    prof = OptimizationProfile().set_shape("x", (3 if axis == 0 else 1, 2, 5, 4), tuple(shape), tuple(shape))
    plan = Builder(Logger()).build(m, BuilderConfig(device="cpu", profiles=[prof], optimization_level=0))
    assert [s["tactic"] for s in plan.graph["steps"]] == ["cpu.reduce_short"], plan.graph["steps"]
    ctx = Engine(plan).create_execution_context()
    x = rng.standard_normal(shape).astype(np.float32)
    for feed in (x, np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)):  # a channels-last view
        got, want = np.asarray(ctx.execute({"x": torch.from_numpy(feed)})["y"]), run_oracle(m, {"x": x})[0]
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # a NaN goes where Kiln's reference puts it (onnxruntime's max / min drop it: not the oracle for NaN)
    x[0, 1, 2, 3] = np.nan
    from kiln.ops.registry import lookup
    step = Engine(plan).function.steps[0].node
    want = lookup(op, "").compute(step, torch.from_numpy(x), step.inputs[1].const).numpy()
    got = np.asarray(ctx.execute({"x": x})["y"])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert np.isnan(got).sum() == np.isnan(want).sum() >= 1


def test_short_reduction_declines() -> None:
    t = get_tactic("cpu.reduce_short")

    def node(op: str, shape: tuple, axes: list | None, dtype: DType = DType.FLOAT32) -> Node:
        ins = [Value("x", TensorType(dtype, shape))]
        if axes is not None:
            ins.append(Value("a", const=torch.tensor(axes)))
        return Node(op, ins, [Value("y", TensorType(dtype, None))], {"keepdims": 1}, name="r", opset=18)
    assert t.accepts(node("ReduceSum", (4, 2, 8), [1]))
    assert not t.accepts(node("ReduceSum", (4, 17, 8), [1]))       # too long: a reduction kernel wins
    assert not t.accepts(node("ReduceSum", (4, "C", 8), [1]))      # not static
    assert not t.accepts(node("ReduceSum", (4, 2, 8), [0, 1]))     # two axes
    assert not t.accepts(node("ReduceSum", (4, 2, 8), None))       # every axis
    assert not t.accepts(node("ReduceL2", (4, 2, 8), [1]))
    assert not t.accepts(node("ReduceSum", (4, 2, 8), [1], DType.INT64))
    runtime_axes = Node("ReduceSum", [Value("x", TensorType(DType.FLOAT32, (4, 2, 8))),
                                      Value("a", TensorType(DType.INT64, (1,)))],
                        [Value("y", TensorType(DType.FLOAT32, None))], {}, name="r", opset=18)
    assert not t.accepts(runtime_axes)
