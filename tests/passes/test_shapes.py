"""Shape-op simplification (kiln/passes/shapes.py)."""
from __future__ import annotations

import numpy as np
from onnx import helper

from tests.passes.models import compare, model, ops, optimized


def test_reshape_chain_merged() -> None:
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Flatten", ["r"], ["a"], axis=2, name="flat1"),
             helper.make_node("Unsqueeze", ["a", "ax"], ["b"], name="unsq1"),
             helper.make_node("Reshape", ["b", "s"], ["y"], name="reshape1")]
    inits = {"ax": np.array([0], np.int64), "s": np.array([4, -1], np.int64)}
    m = model(nodes, {"x": (2, 3, 4, 5)}, ["y"], inits)
    g, log = optimized(m)
    assert ops(g) == ["Relu", "Reshape"]
    assert any("Merging" in line for line in log)
    compare(m)


def test_reshape_back_eliminated() -> None:
    nodes = [helper.make_node("Flatten", ["x"], ["a"], name="flat1"),
             helper.make_node("Reshape", ["a", "s"], ["b"], name="reshape1"),
             helper.make_node("Relu", ["b"], ["y"])]
    m = model(nodes, {"x": (2, 3, 4)}, ["y"], {"s": np.array([2, 3, 4], np.int64)})
    g, _ = optimized(m)
    assert ops(g) == ["Relu"]
    compare(m)


def test_transpose_pair_cancels_and_merges() -> None:
    nodes = [helper.make_node("Transpose", ["x"], ["a"], perm=[0, 2, 3, 1], name="t1"),
             helper.make_node("Transpose", ["a"], ["b"], perm=[0, 3, 1, 2], name="t2"),
             helper.make_node("Relu", ["b"], ["r"]),
             helper.make_node("Transpose", ["r"], ["c"], perm=[1, 0, 2, 3], name="t3"),
             helper.make_node("Transpose", ["c"], ["y"], perm=[0, 1, 3, 2], name="t4")]
    m = model(nodes, {"x": (2, 3, 4, 5)}, ["y"])
    g, log = optimized(m)
    assert ops(g) == ["Relu", "Transpose"] and g.nodes[1].attrs["perm"] == [1, 0, 3, 2]
    assert any("transposes cancel" in line for line in log)
    compare(m)


def test_global_pool_flatten_becomes_reduce() -> None:
    for pool in (helper.make_node("GlobalAveragePool", ["x"], ["p"], name="gap"),
                 helper.make_node("AveragePool", ["x"], ["p"], kernel_shape=[4, 5], name="pool"),
                 helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[4, 5], name="pool")):
        m = model([pool, helper.make_node("Flatten", ["p"], ["y"], name="flat")], {"x": (2, 3, 4, 5)}, ["y"])
        g, _ = optimized(m)
        assert ops(g) == ["ReduceMax" if pool.op_type == "MaxPool" else "ReduceMean"]
        compare(m)


def test_local_pool_flatten_kept() -> None:
    nodes = [helper.make_node("AveragePool", ["x"], ["p"], kernel_shape=[2, 2]),
             helper.make_node("Flatten", ["p"], ["y"])]
    m = model(nodes, {"x": (2, 3, 4, 4)}, ["y"])
    g, _ = optimized(m)
    assert ops(g) == ["AveragePool", "Flatten"]
    compare(m)
