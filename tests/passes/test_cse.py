"""Common subexpression elimination (kiln/passes/cse.py)."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from kiln.frontend.onnx import load_onnx
from kiln.logger import Logger
from kiln.passes.base import PassContext
from kiln.passes.cse import EliminateCommonSubexpressions
from tests.passes.models import compare, model, ops, optimized


def test_repeated_mask_indexing_computed_once() -> None:
    """torch's export of `boxes[mask]` and `scores[mask]`: NonZero and Transpose twice on one mask."""
    nodes = [helper.make_node("Greater", ["s", "t"], ["mask"]),
             helper.make_node("NonZero", ["mask"], ["nz1"]),
             helper.make_node("Transpose", ["nz1"], ["i1"], perm=[1, 0]),
             helper.make_node("GatherND", ["s", "i1"], ["sel_s"]),
             helper.make_node("NonZero", ["mask"], ["nz2"]),
             helper.make_node("Transpose", ["nz2"], ["i2"], perm=[1, 0]),
             helper.make_node("GatherND", ["b", "i2"], ["sel_b"])]
    m = model(nodes, {"s": (50,), "b": (50, 4)}, ["sel_s", "sel_b"], {"t": np.array(0.3, np.float32)})
    g, log = optimized(m)
    assert ops(g).count("NonZero") == 1 and ops(g).count("Transpose") == 1, ops(g)
    assert any("repeated layers" in line for line in log)
    compare(m)


def test_equal_constants_count_as_the_same_input() -> None:
    nodes = [helper.make_node("Add", ["x", "c1"], ["a"]), helper.make_node("Add", ["x", "c2"], ["b"]),
             helper.make_node("Add", ["x", "c3"], ["c"]),  # another constant value: kept
             helper.make_node("Mul", ["a", "b"], ["ab"]), helper.make_node("Mul", ["ab", "c"], ["y"])]
    one = np.ones((3,), np.float32)
    m = model(nodes, {"x": (2, 3)}, ["y"], {"c1": one, "c2": one.copy(), "c3": one * 2})
    g = load_onnx(m, Logger())
    assert EliminateCommonSubexpressions().run(g, PassContext(Logger()))
    assert ops(g) == ["Add", "Add", "Mul", "Mul"] and g.nodes[2].inputs[0] is g.nodes[2].inputs[1]
    assert not EliminateCommonSubexpressions().run(g, PassContext(Logger()))
    compare(m)


def test_different_attributes_random_ops_and_graph_outputs_are_kept() -> None:
    nodes = [helper.make_node("Transpose", ["x"], ["t1"], perm=[1, 0, 2]),
             helper.make_node("Transpose", ["x"], ["t2"], perm=[0, 2, 1]),   # other attributes
             helper.make_node("RandomNormalLike", ["x"], ["r1"], seed=1.0),
             helper.make_node("RandomNormalLike", ["x"], ["r2"], seed=1.0),  # random: never merged
             helper.make_node("Relu", ["x"], ["y1"]),
             helper.make_node("Relu", ["x"], ["y2"]),                        # both graph outputs
             helper.make_node("Add", ["r1", "r2"], ["rr"]),
             helper.make_node("Mul", ["rr", "x"], ["y3"])]
    m = model(nodes, {"x": (2, 2, 2)}, ["t1", "t2", "y1", "y2", "y3"])
    g, _ = optimized(m)
    names = ops(g)
    assert names.count("Transpose") == 2 and names.count("RandomNormalLike") == 2 and names.count("Relu") == 2, names


def test_nodes_with_subgraphs_are_kept() -> None:
    def branch(name: str) -> object:
        return helper.make_graph([helper.make_node("Neg", ["x"], [name + "o"])], name, [],
                                 [helper.make_tensor_value_info(name + "o", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "z"], ["c"]),
             helper.make_node("If", ["c"], ["i1"], then_branch=branch("a"), else_branch=branch("b")),
             helper.make_node("If", ["c"], ["i2"], then_branch=branch("c"), else_branch=branch("d")),
             helper.make_node("Add", ["i1", "i2"], ["y"])]
    m = model(nodes, {"x": (2, 3)}, ["y"], {"z": np.array(0.0, np.float32)})
    g, _ = optimized(m)
    assert ops(g).count("If") == 2, ops(g)
    compare(m)
