"""Concat elision marking (kiln/passes/concat.py)."""
from __future__ import annotations

from onnx import helper

from kiln.ir.graph import Graph, Node, Value
from kiln.ir.types import TensorType
from kiln.ir.dtype import DType
from kiln.logger import Logger
from kiln.passes.base import PassContext
from kiln.passes.concat import MarkConcatElision
from tests.passes.models import compare, model, optimized


def test_single_reader_inputs_marked() -> None:
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["x"], ["b"]),
             helper.make_node("Concat", ["a", "b"], ["c"], axis=1, name="cat1"),
             helper.make_node("Abs", ["x"], ["d"]),
             helper.make_node("Concat", ["d", "x"], ["e"], axis=1, name="cat2")]
    m = model(nodes, {"x": (1, 2, 3)}, ["c", "e"])
    g, log = optimized(m)
    cats = {n.name: n.attrs.get("kiln_elide") for n in g.nodes if n.op_type == "Concat"}
    assert cats == {"cat1": 1, "cat2": None}  # cat2 reads a graph input
    assert "[kiln] [V] Marking cat1 for concat elision" in log
    compare(m)


def _graph_with_shared_input() -> Graph:
    g = Graph("t")
    t = TensorType(DType.FLOAT32, (1, 2))
    x = Value("x", t)
    g.inputs = [x]
    a, b, c, d, e = (Value(n, t) for n in "abcde")
    g.nodes = [Node("Relu", [x], [a]), Node("Neg", [x], [b]), Node("Concat", [a, b], [c], {"axis": 1}, name="cat1"),
               Node("Concat", [a, b], [d], {"axis": 1}, name="cat2"), Node("Exp", [a], [e])]
    g.outputs = [c, d, e]
    return g


def test_shared_inputs_only_when_allowed() -> None:
    g = _graph_with_shared_input()
    MarkConcatElision().run(g, PassContext(Logger()))
    assert [n.attrs.get("kiln_elide") for n in g.nodes if n.op_type == "Concat"] == [None, None]
    MarkConcatElision(allow_shared_inputs=True).run(g, PassContext(Logger()))
    assert [n.attrs.get("kiln_elide") for n in g.nodes if n.op_type == "Concat"] == [1, None]  # a, b claimed once
