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


def _graph_with_shared_input(n_cats: int = 2) -> Graph:
    g = Graph("t")
    t = TensorType(DType.FLOAT32, (1, 2))
    t2 = TensorType(DType.FLOAT32, (1, 4))
    x = Value("x", t)
    g.inputs = [x]
    a, b, e = (Value(n, t) for n in "abe")
    cats = [Value(f"c{k}", t2) for k in range(n_cats)]
    g.nodes = [Node("Relu", [x], [a]), Node("Neg", [x], [b])]
    g.nodes += [Node("Concat", [a, b], [c], {"axis": 1}, name=f"cat{k}") for k, c in enumerate(cats)]
    g.nodes.append(Node("Exp", [a], [e]))
    g.outputs = [*cats, e]
    return g


def test_shared_inputs_only_when_allowed() -> None:
    g = _graph_with_shared_input()
    MarkConcatElision(allow_shared_inputs=False).run(g, PassContext(Logger()))
    assert [n.attrs.get("kiln_elide") for n in g.nodes if n.op_type == "Concat"] == [None, None]
    MarkConcatElision().run(g, PassContext(Logger()))
    assert [n.attrs.get("kiln_elide") for n in g.nodes if n.op_type == "Concat"] == [1, 1]  # a, b: two homes each


def test_a_value_is_written_into_at_most_two_concats() -> None:
    g = _graph_with_shared_input(3)
    MarkConcatElision().run(g, PassContext(Logger()))
    assert [n.attrs.get("kiln_elide") for n in g.nodes if n.op_type == "Concat"] == [1, 1, None]


def test_unresolvable_output_shape_is_not_marked() -> None:
    g = _graph_with_shared_input(1)
    g.nodes[2].outputs[0].type = TensorType(DType.FLOAT32, (1, None))
    MarkConcatElision().run(g, PassContext(Logger()))
    assert g.nodes[2].attrs.get("kiln_elide") is None
