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


def _linear(i: int, src: str, n: int, inits: dict, act: str | None = None) -> list:
    inits[f"lw{i}"] = RNG.standard_normal((16, n)).astype(np.float32)
    inits[f"lb{i}"] = RNG.standard_normal(n).astype(np.float32)
    out = [helper.make_node("MatMul", [src, f"lw{i}"], [f"m{i}"], name=f"mm{i}"),
           helper.make_node("Add", [f"m{i}", f"lb{i}"], [f"g{i}" if act else f"l{i}"], name=f"add{i}")]
    if act:
        out.append(helper.make_node(act, [f"g{i}"], [f"l{i}"], name=f"act{i}"))
    return out


def test_sibling_gemms_become_one_gemm_with_column_views() -> None:
    """A transformer's Q, K, V projections: one GEMM three times as wide, each output a Slice of it."""
    inits: dict = {}
    nodes = _linear(0, "x", 8, inits) + _linear(1, "x", 12, inits) + _linear(2, "x", 8, inits)
    nodes += [helper.make_node("Mul", ["l0", "l2"], ["y0"], name="mul"), helper.make_node("Relu", ["l1"], ["y1"])]
    m = model(nodes, {"x": (2, 5, 16)}, ["y0", "y1", "l1"], inits)
    g, log = optimized(m)
    assert ops(g).count("FusedGemm") == 1 and ops(g).count("Slice") == 3
    assert tuple(next(n for n in g.nodes if n.op_type == "FusedGemm").inputs[1].const.shape) == (28, 16)
    assert any("horizontal gemm" in line for line in log)
    compare(m)


def test_gemms_with_different_epilogues_stay_apart() -> None:
    inits: dict = {}
    nodes = _linear(0, "x", 8, inits, act="Relu") + _linear(1, "x", 8, inits)
    m = model(nodes, {"x": (3, 16)}, ["l0", "l1"], inits)
    g, _ = optimized(m)
    assert ops(g).count("FusedGemm") == 2 and "Slice" not in ops(g)
    compare(m)


def test_a_split_of_the_last_axis_becomes_column_views() -> None:
    inits = {"sizes": np.array([4, 8, 4], np.int64)}
    nodes = [helper.make_node("Split", ["x", "sizes"], ["a", "b", "c"], axis=-1, name="split"),
             helper.make_node("Mul", ["a", "c"], ["y0"]), helper.make_node("Sigmoid", ["b"], ["y1"])]
    m = model(nodes, {"x": (2, 3, 16)}, ["y0", "y1"], inits)
    g, log = optimized(m)
    assert "Split" not in ops(g) and any("column views" in line for line in log)
    compare(m)
