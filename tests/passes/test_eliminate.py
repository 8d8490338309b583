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
