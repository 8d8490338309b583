"""Scale folding (kiln/passes/scale.py): per-channel / uniform Mul, Div, Add, Sub after a conv."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from tests.passes.models import compare, model, ops, optimized

RNG = np.random.default_rng(5)
W = RNG.standard_normal((6, 3, 3, 3)).astype(np.float32)


@pytest.mark.parametrize("op,const,first", [
    ("Mul", RNG.uniform(0.5, 2, (6, 1, 1)).astype(np.float32), True),
    ("Mul", np.array(0.25, np.float32), False),
    ("Div", RNG.uniform(0.5, 2, (1, 6, 1, 1)).astype(np.float32), True),
    ("Add", RNG.standard_normal((6, 1, 1)).astype(np.float32), False),
    ("Sub", RNG.standard_normal((6, 1, 1)).astype(np.float32), True),
    ("Sub", np.array([1.5], np.float32), False),
])
def test_scale_folded_into_conv(op: str, const: np.ndarray, first: bool) -> None:
    ins = ["c", "k"] if first else ["k", "c"]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv1"),
             helper.make_node(op, ins, ["s"], name="scale1"), helper.make_node("Relu", ["s"], ["y"], name="relu1")]
    m = model(nodes, {"x": (2, 3, 6, 6)}, ["y"], {"w": W, "k": const})
    g, log = optimized(m)
    assert ops(g) == ["FusedConv"]
    assert "[kiln] [V] Fusing conv1 with scale1" in log
    compare(m)


@pytest.mark.parametrize("const", [np.ones((6,), np.float32) * 2,  # broadcasts along W, not channels
                                   RNG.standard_normal((6, 6, 6)).astype(np.float32)])
def test_non_channel_constant_not_folded(const: np.ndarray) -> None:
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Mul", ["c", "k"], ["y"], name="scale1")]
    m = model(nodes, {"x": (2, 3, 6, 6)}, ["y"], {"w": W, "k": const})
    g, _ = optimized(m)
    assert ops(g) == ["FusedConv", "Mul"]
    compare(m)


def test_div_by_conv_not_folded() -> None:
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv1"),
             helper.make_node("Div", ["k", "c"], ["y"], name="div1")]
    m = model(nodes, {"x": (1, 3, 5, 5)}, ["y"], {"w": W, "k": np.array(2.0, np.float32)})
    g, _ = optimized(m)
    assert ops(g) == ["FusedConv", "Div"]
