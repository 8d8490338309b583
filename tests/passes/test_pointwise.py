"""Pointwise fusion (kiln/passes/pointwise.py): elementwise chains / DAGs -> one Pointwise node."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from tests.passes.models import compare, model, ops, optimized


def test_chain_with_broadcasting() -> None:
    nodes = [helper.make_node("Mul", ["x", "s"], ["a"], name="mul1"),
             helper.make_node("Add", ["a", "b"], ["c"], name="add1"),
             helper.make_node("Clip", ["c", "lo", "hi"], ["d"], name="clip1"),
             helper.make_node("Tanh", ["d"], ["y"], name="tanh1")]
    inits = {"s": np.array([[2.0], [0.5], [-1.0]], np.float32), "lo": np.array(-1, np.float32),
             "hi": np.array(0.5, np.float32)}
    m = model(nodes, {"x": (2, 3, 4), "b": (4,)}, ["y"], inits)
    g, log = optimized(m)
    assert ops(g) == ["Pointwise"]
    pw = g.nodes[0]
    assert [i["op"] for i in pw.attrs["program"]] == ["Mul", "Add", "Clip", "Tanh"]
    assert pw.attrs["consts"] == [-1.0, 0.5]
    assert "[kiln] [V] Fusing add1 with clip1" in log
    compare(m)


def test_dag_swish_and_gating() -> None:
    """x*sigmoid(x) (x read twice) and a two-input DAG."""
    nodes = [helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Mul", ["x", "s"], ["a"]),
             helper.make_node("Exp", ["z"], ["e"]), helper.make_node("Div", ["a", "e"], ["y"])]
    m = model(nodes, {"x": (3, 5), "z": (1, 5)}, ["y"])
    g, _ = optimized(m)
    assert ops(g) == ["Pointwise"] and len(g.nodes[0].inputs) == 2
    compare(m)


def test_shared_intermediate_splits_groups() -> None:
    """An intermediate read outside the group (here a graph output) ends the group there."""
    nodes = [helper.make_node("Neg", ["x"], ["a"]), helper.make_node("Abs", ["a"], ["b"]),
             helper.make_node("Sqrt", ["b"], ["y"]), helper.make_node("Exp", ["a"], ["y2"])]
    m = model(nodes, {"x": (4,)}, ["y", "y2", "a"])
    g, _ = optimized(m)
    assert sorted(ops(g)) == ["Exp", "Neg", "Pointwise"]
    compare(m)


def test_legacy_clip_attributes() -> None:
    nodes = [helper.make_node("Clip", ["x"], ["a"], min=-0.3, max=0.2), helper.make_node("Neg", ["a"], ["y"])]
    m = model(nodes, {"x": (3, 4)}, ["y"], opset=7)
    g, _ = optimized(m)
    assert ops(g) == ["Pointwise"] and g.nodes[0].attrs["consts"] == pytest.approx([-0.3, 0.2])
    compare(m)
