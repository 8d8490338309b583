"""Nearest Resize on a channels-last input (GhostNet-V2's gate upsampled to the feature map's run-time size):
the reference gathers whole pixels and returns channels-last, with exactly the ONNX reference evaluator's
values for every nearest mode and coordinate transform, integer and fractional factors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from kiln.ir.dtype import DType
from kiln.ir.graph import Node, Value
from kiln.ir.types import TensorType
from kiln.ops.registry import lookup


def _node(ctm: str, nearest: str) -> Node:
    ins = [Value("x", TensorType(DType.FLOAT32, None)), None, None, Value("sizes", TensorType(DType.INT64, (4,)))]
    return Node("Resize", ins, [Value("y", TensorType(DType.FLOAT32, None))],
                {"mode": "nearest", "coordinate_transformation_mode": ctm, "nearest_mode": nearest}, name="up",
                opset=19)


def _oracle(x: np.ndarray, sizes: list[int], ctm: str, nearest: str) -> np.ndarray:
    node = helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode="nearest",
                            coordinate_transformation_mode=ctm, nearest_mode=nearest)
    g = helper.make_graph([node], "r", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None),
                                        helper.make_tensor_value_info("sizes", TensorProto.INT64, [4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
    return ReferenceEvaluator(model).run(None, {"x": x, "sizes": np.array(sizes, np.int64)})[0]


@pytest.mark.parametrize("ctm,nearest", [("asymmetric", "floor"), ("half_pixel", "round_prefer_floor"),
                                         ("pytorch_half_pixel", "round_prefer_ceil"), ("align_corners", "ceil")])
@pytest.mark.parametrize("hw,out", [((3, 3), (7, 7)), ((14, 14), (28, 28)), ((5, 8), (11, 5))])
def test_channels_last_nearest_matches_onnx(ctm: str, nearest: str, hw: tuple[int, int], out: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(hw) + sum(out))
    x = rng.standard_normal((2, 6, *hw)).astype(np.float32)
    sizes = [2, 6, *out]
    xt = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
    got = lookup("Resize", "").compute(_node(ctm, nearest), xt, None, None, torch.tensor(sizes))
    assert got.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_array_equal(got.numpy(), _oracle(x, sizes, ctm, nearest))
    plain = lookup("Resize", "").compute(_node(ctm, nearest), torch.from_numpy(x), None, None, torch.tensor(sizes))
    assert plain.is_contiguous() and torch.equal(plain, got)
