"""Sequence and optional ops (kiln/ops/sequence.py) in small graphs, against onnxruntime."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.testing import check_model, run_kiln

F = TensorProto.FLOAT


def rand(*shape: int) -> np.ndarray:
    return np.random.default_rng().standard_normal(shape).astype(np.float32)


def graph_model(nodes: list[onnx.NodeProto], inputs: dict[str, np.ndarray], outputs: list[str],
                consts: dict[str, np.ndarray] | None = None, opset: int = 18) -> onnx.ModelProto:
    g_in = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
            for n, a in inputs.items()]
    inits = [numpy_helper.from_array(a, n) for n, a in (consts or {}).items()]
    g_out = [helper.make_empty_tensor_value_info(n) for n in outputs]
    model = helper.make_model(helper.make_graph(nodes, "seq_test", g_in, g_out, inits),
                              opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def scalar(v: int) -> np.ndarray:
    return np.array(v, dtype=np.int64)


@pytest.mark.parametrize("insert_pos,erase_pos,at_pos", [(None, None, 0), (1, 0, -1), (-2, -1, 2), (3, 2, 1)])
@pytest.mark.parametrize("new_axis,axis", [(0, 0), (0, -1), (1, 0), (1, -1)])
def test_sequence_ops(insert_pos, erase_pos, at_pos, new_axis, axis) -> None:
    xs = {f"x{k}": rand(2, 3) for k in range(4)}
    consts = {"at": scalar(at_pos)}
    nodes = [helper.make_node("SequenceConstruct", ["x0", "x1", "x2"], ["s0"])]
    if insert_pos is None:
        nodes.append(helper.make_node("SequenceInsert", ["s0", "x3"], ["s1"]))
    else:
        consts["ip"] = scalar(insert_pos)
        nodes.append(helper.make_node("SequenceInsert", ["s0", "x3", "ip"], ["s1"]))
    if erase_pos is None:
        nodes.append(helper.make_node("SequenceErase", ["s1"], ["s2"]))
    else:
        consts["ep"] = scalar(erase_pos)
        nodes.append(helper.make_node("SequenceErase", ["s1", "ep"], ["s2"]))
    nodes += [helper.make_node("SequenceAt", ["s2", "at"], ["y_at"]),
              helper.make_node("SequenceLength", ["s2"], ["y_len"]),
              helper.make_node("ConcatFromSequence", ["s2"], ["y_cat"], axis=axis, new_axis=new_axis)]
    model = graph_model(nodes, xs, ["y_at", "y_len", "y_cat"], consts)
    check_model(model, xs)


@pytest.mark.parametrize("split,attrs", [(None, {"axis": 1}), (None, {"axis": 1, "keepdims": 0}),
                                         (scalar(2), {"axis": 1}), (np.array([1, 3, 1], np.int64), {"axis": -1}),
                                         (np.array([2, 1], np.int64), {})])
def test_split_to_sequence(split, attrs) -> None:
    x = {"x": rand(3, 5) if attrs.get("axis") is not None else rand(3, 4)}
    ins = ["x"] if split is None else ["x", "sp"]
    consts = {} if split is None else {"sp": split}
    new_axis = 1 if attrs.get("keepdims", 1) == 0 else 0
    nodes = [helper.make_node("SplitToSequence", ins, ["s"], **attrs),
             helper.make_node("SequenceLength", ["s"], ["n"]),
             helper.make_node("ConcatFromSequence", ["s"], ["y"], axis=attrs.get("axis", 0), new_axis=new_axis)]
    check_model(graph_model(nodes, x, ["n", "y"], consts), x)


def test_sequence_empty_and_output() -> None:
    x = {"x": rand(2, 2), "z": rand(3)}
    nodes = [helper.make_node("SequenceEmpty", [], ["e"], dtype=F),
             helper.make_node("SequenceInsert", ["e", "x"], ["s1"]),
             helper.make_node("SequenceInsert", ["s1", "z"], ["s2"]),
             helper.make_node("SequenceLength", ["e"], ["n0"]),
             helper.make_node("SequenceLength", ["s2"], ["n2"])]
    model = graph_model(nodes, x, ["n0", "n2", "s2"])
    n0, n2, seq = run_kiln(model, x)
    assert int(n0) == 0 and int(n2) == 2
    assert len(seq) == 2
    np.testing.assert_array_equal(seq[0], x["x"])
    np.testing.assert_array_equal(seq[1], x["z"])


@pytest.mark.parametrize("present", [True, False])
def test_optional(present) -> None:
    x = {"x": rand(2, 3)}
    tp = helper.make_tensor_type_proto(F, [2, 3])
    if present:
        nodes = [helper.make_node("Optional", ["x"], ["o"]),
                 helper.make_node("OptionalHasElement", ["o"], ["has"]),
                 helper.make_node("OptionalGetElement", ["o"], ["y"])]
        check_model(graph_model(nodes, x, ["has", "y"]), x)
    else:
        nodes = [helper.make_node("Optional", [], ["o"], type=tp),
                 helper.make_node("OptionalHasElement", ["o"], ["has"]),
                 helper.make_node("OptionalHasElement", [""], ["has2"]),
                 helper.make_node("Identity", ["x"], ["y"])]
        check_model(graph_model(nodes, x, ["has", "has2", "y"]), x)


def test_optional_sequence() -> None:
    x = {"x": rand(2, 3)}
    nodes = [helper.make_node("SequenceConstruct", ["x", "x"], ["s"]),
             helper.make_node("Optional", ["s"], ["o"]),
             helper.make_node("OptionalHasElement", ["o"], ["has"]),
             helper.make_node("OptionalGetElement", ["o"], ["s2"]),
             helper.make_node("SequenceLength", ["s2"], ["n"])]
    check_model(graph_model(nodes, x, ["has", "n"]), x)
