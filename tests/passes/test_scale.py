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


@pytest.mark.parametrize("scale,shift", [(1.7, -0.3), (0.4, 0.9), (None, 0.5), (2.5, None)])
def test_affine_after_relu_folds_into_conv(scale, shift) -> None:
    """HGNetV2's learnable affine block: conv, ReLU, then a scalar scale and bias. The affine moves in front of
    the ReLU (Relu(y) * s = Relu(y * s) for s > 0; Relu(y) + t = Clip(y + t, min=t)) and folds into the conv,
    whose epilogue is then the ReLU or the Clip: one layer, same values as onnxruntime on the original."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c"], ["r"], name="relu1")]
    consts = {"w": W}
    last = "r"
    if scale is not None:
        nodes.append(helper.make_node("Mul", ["k", last], ["m"], name="lab_mul"))
        consts["k"], last = np.array(scale, np.float32), "m"
    if shift is not None:
        nodes.append(helper.make_node("Add", [last, "t"], ["a"], name="lab_add"))
        consts["t"], last = np.array([shift], np.float32), "a"
    m = model(nodes, {"x": (2, 3, 6, 6)}, [last], consts)
    g, _ = optimized(m)
    assert ops(g) == ["FusedConv"], ops(g)
    assert g.nodes[0].attr("activation") == ("Clip" if shift is not None else "Relu")
    compare(m)


def test_affine_after_relu_kept_where_it_does_not_commute() -> None:
    """A negative scale does not commute with ReLU, and a ReLU read elsewhere too must stay as it is."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv1"), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Mul", ["r", "k"], ["y"])]
    m = model(nodes, {"x": (1, 3, 5, 5)}, ["y"], {"w": W, "k": np.array(-0.5, np.float32)})
    g, _ = optimized(m)
    assert ops(g) == ["FusedConv", "Mul"], ops(g)
    compare(m)
    nodes[-1] = helper.make_node("Add", ["r", "k"], ["y"])
    m = model(nodes, {"x": (1, 3, 5, 5)}, ["y", "r"], {"w": W, "k": np.array(0.5, np.float32)})
    g, _ = optimized(m)
    assert "Clip" not in ops(g) and "Add" in ops(g), ops(g)
    compare(m)
