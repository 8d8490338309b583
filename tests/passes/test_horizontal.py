"""Horizontal fusion (kiln/passes/horizontal.py): sibling 1x1 convs on one input -> one conv (+ Split)."""
from __future__ import annotations

import numpy as np
from onnx import helper

from tests.passes.models import compare, model, ops, optimized

RNG = np.random.default_rng(6)


def conv1x1(i: int, cout: int, inits: dict, bias: bool = True) -> object:
    inits[f"w{i}"] = RNG.standard_normal((cout, 8, 1, 1)).astype(np.float32)
    ins = ["x", f"w{i}"]
    if bias:
        inits[f"b{i}"] = RNG.standard_normal(cout).astype(np.float32)
        ins.append(f"b{i}")
    return helper.make_node("Conv", ins, [f"c{i}"], name=f"conv{i}")


def test_three_siblings_become_conv_and_split() -> None:
    inits: dict = {}
    nodes = [conv1x1(0, 4, inits), conv1x1(1, 6, inits, bias=False), conv1x1(2, 2, inits)]
    nodes += [helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}") for i in range(3)]
    nodes.append(helper.make_node("Conv", ["r1", "w3"], ["y1"], pads=[1, 1, 1, 1], name="conv3"))
    inits["w3"] = RNG.standard_normal((3, 6, 3, 3)).astype(np.float32)
    m = model(nodes, {"x": (2, 8, 5, 5)}, ["r0", "y1", "r2"], inits)
    g, log = optimized(m)
    assert ops(g) == ["FusedConv", "Split", "FusedConv"]
    assert tuple(g.nodes[0].inputs[1].const.shape) == (12, 8, 1, 1)
    assert "[kiln] [V] Fusing conv0 with conv1 (horizontal)" in log
    compare(m)


def test_two_siblings_into_concat_need_no_split() -> None:
    inits: dict = {}
    nodes = [conv1x1(0, 4, inits), conv1x1(1, 6, inits),
             helper.make_node("Concat", ["c0", "c1"], ["y"], axis=1, name="cat")]
    m = model(nodes, {"x": (1, 8, 5, 5)}, ["y"], inits)
    g, _ = optimized(m)
    assert ops(g) == ["FusedConv"] and g.outputs[0].name == "y"
    compare(m)


def test_two_siblings_otherwise_left_alone() -> None:
    """Two convs -> conv + split would not reduce the kernel count."""
    inits: dict = {}
    nodes = [conv1x1(0, 4, inits), conv1x1(1, 6, inits)]
    m = model(nodes, {"x": (1, 8, 5, 5)}, ["c0", "c1"], inits)
    g, _ = optimized(m)
    assert ops(g) == ["FusedConv", "FusedConv"]
    compare(m)


def test_different_activations_not_merged() -> None:
    inits: dict = {}
    nodes = [conv1x1(i, 3, inits) for i in range(3)]
    nodes += [helper.make_node("Relu", ["c0"], ["r0"]), helper.make_node("Sigmoid", ["c1"], ["r1"]),
              helper.make_node("Relu", ["c2"], ["r2"])]
    m = model(nodes, {"x": (1, 8, 4, 4)}, ["r0", "r1", "r2"], inits)
    g, _ = optimized(m)
    assert ops(g).count("FusedConv") == 3
    compare(m)
