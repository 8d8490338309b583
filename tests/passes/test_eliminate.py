"""No-op elimination (kiln/passes/eliminate.py): Identity, inference Dropout, no-op Cast/Reshape/Transpose."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from tests.passes.models import compare, model, ops, optimized


def test_identity_dropout_cast_reshape_eliminated() -> None:
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="relu0"),
        helper.make_node("Identity", ["a"], ["b"], name="identity1"),
        helper.make_node("Dropout", ["b"], ["c"], name="dropout1"),
        helper.make_node("Cast", ["c"], ["d"], to=TensorProto.FLOAT, name="cast1"),
        helper.make_node("Reshape", ["d", "shape"], ["e"], name="reshape1"),
        helper.make_node("Transpose", ["e"], ["f"], perm=[0, 1, 2], name="transpose1"),
        helper.make_node("Sigmoid", ["f"], ["y"], name="sigmoid1"),
    ]
    m = model(nodes, {"x": (2, 3, 4)}, ["y"], {"shape": np.array([2, 3, 4], np.int64)})
    g, log = optimized(m)
    assert len(g.nodes) == 1  # relu + sigmoid are then fused into one Pointwise
    assert any("Eliminating identity dropout1" in line for line in log)
    assert any("Eliminating identity identity1" in line for line in log)
    compare(m)


def test_graph_output_name_survives() -> None:
    """An Identity producing a graph output: the producer of its input takes the output's name."""
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="relu0"),
             helper.make_node("Identity", ["a"], ["y"], name="identity1")]
    m = model(nodes, {"x": (4, 5)}, ["y"])
    g, _ = optimized(m)
    assert ops(g) == ["Relu"] and g.outputs[0].name == "y"
    compare(m)


def test_identity_between_input_and_output_is_kept() -> None:
    m = model([helper.make_node("Identity", ["x"], ["y"])], {"x": (3,)}, ["y"])
    g, _ = optimized(m)
    assert ops(g) == ["Identity"]
    compare(m)


def test_dropout_mask_in_use_is_kept() -> None:
    nodes = [helper.make_node("Dropout", ["x"], ["y", "mask"], name="d")]
    m = model(nodes, {"x": (3, 4)}, ["y", "mask"])
    g, _ = optimized(m)
    assert ops(g) == ["Dropout"]


def test_cast_to_other_type_is_kept() -> None:
    nodes = [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.DOUBLE)]
    m = model(nodes, {"x": (3, 4)}, ["y"])
    g, _ = optimized(m)
    assert ops(g) == ["Cast"]
    compare(m)


def _seed() -> int:
    return int(np.random.default_rng().integers(1 << 30))


def test_expand_absorbed_by_a_broadcasting_reader() -> None:
    """F.normalize as exported: x / Expand(Clip(ReduceL2(x)), Shape(x)). The Div broadcasts the norm itself; the
    Expand (a full copy) goes, and the Clip and Div fuse into one program. The Expand's output is also a graph
    output here, so it stays for that reader only."""
    nodes = [helper.make_node("ReduceL2", ["x"], ["n"], axes=[-1], keepdims=1, name="norm"),
             helper.make_node("Clip", ["n", "eps"], ["c"], name="clamp"),
             helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Expand", ["c", "s"], ["e"], name="expand"),
             helper.make_node("Div", ["x", "e"], ["y"], name="div")]
    m = model(nodes, {"x": (2, 6, 5)}, ["y"], {"eps": np.array(1e-12, np.float32)})
    g, log = optimized(m)
    assert "Expand" not in ops(g) and any("Expand expand: its broadcasting readers read its input" in x for x in log)
    compare(m, seed=_seed())
    m2 = model(nodes, {"x": (2, 6, 5)}, ["y", "e"], {"eps": np.array(1e-12, np.float32)})
    g2, _ = optimized(m2)
    assert ops(g2).count("Expand") == 1 and not any(n.op_type in ("Div", "Pointwise") and
                                                     any(v.name == "e" for v in n.inputs) for n in g2.nodes)
    compare(m2, seed=_seed())


def test_expand_that_grows_the_result_is_kept() -> None:
    """Add(Expand(a [1, 5] -> [4, 5]), b [1, 5]): without the Expand the sum would be [1, 5]."""
    nodes = [helper.make_node("Expand", ["a", "shape"], ["e"], name="expand"),
             helper.make_node("Add", ["e", "b"], ["y"], name="add")]
    m = model(nodes, {"a": (1, 5), "b": (1, 5)}, ["y"], {"shape": np.array([4, 5], np.int64)})
    g, _ = optimized(m)
    assert "Expand" in ops(g)
    got = compare(m, seed=_seed())
    assert got[0].shape == (4, 5)
