"""Pad folding (kiln/passes/pad.py)."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from tests.passes.models import compare, model, ops, optimized

RNG = np.random.default_rng(2)


def pad_node(x: str, y: str, pads: list[int], value: float | None = None, name: str = "pad1") -> tuple:
    inits = {"pads": np.array(pads, np.int64)}
    ins = [x, "pads"]
    if value is not None:
        inits["pv"] = np.array(value, np.float32)
        ins.append("pv")
    return helper.make_node("Pad", ins, [y], name=name), inits


def test_pad_into_conv() -> None:
    p, inits = pad_node("x", "p", [0, 0, 1, 2, 0, 0, 2, 1])
    inits["w"] = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
    m = model([p, helper.make_node("Conv", ["p", "w"], ["y"], pads=[1, 0, 0, 1], name="conv1")],
              {"x": (1, 3, 7, 6)}, ["y"], inits)
    g, log = optimized(m)
    assert ops(g) == ["FusedConv"] and g.nodes[0].attrs["pads"] == [2, 2, 2, 2]
    assert "[kiln] [V] Fusing pad1 with conv1" in log
    compare(m)


@pytest.mark.parametrize("include", [0, 1])
def test_pad_into_average_pool(include: int) -> None:
    p, inits = pad_node("x", "p", [0, 0, 1, 1, 0, 0, 1, 1])
    pool = helper.make_node("AveragePool", ["p"], ["y"], kernel_shape=[3, 3], count_include_pad=include, name="pool1")
    m = model([p, pool], {"x": (1, 2, 6, 6)}, ["y"], inits)
    g, _ = optimized(m)
    assert ops(g) == ["AveragePool"]
    compare(m)


def test_neg_inf_pad_into_max_pool() -> None:
    p, inits = pad_node("x", "p", [0, 0, 1, 1, 0, 0, 1, 1], value=-np.inf)
    m = model([p, helper.make_node("MaxPool", ["p"], ["y"], kernel_shape=[3, 3], strides=[2, 2])],
              {"x": (1, 2, 7, 7)}, ["y"], inits)
    g, _ = optimized(m)
    assert ops(g) == ["MaxPool"]
    compare(m)


def test_zero_pad_into_max_pool_only_after_relu() -> None:
    """Zero padding equals MaxPool's -inf padding only for non-negative inputs."""
    p, inits = pad_node("r", "p", [0, 0, 1, 1, 0, 0, 1, 1])
    nodes = [helper.make_node("Relu", ["x"], ["r"]), p,
             helper.make_node("MaxPool", ["p"], ["y"], kernel_shape=[3, 3])]
    m = model(nodes, {"x": (1, 2, 6, 6)}, ["y"], inits)
    g, _ = optimized(m)
    assert ops(g) == ["Relu", "MaxPool"]
    compare(m)
    p, inits = pad_node("x", "p", [0, 0, 1, 1, 0, 0, 1, 1])
    m = model([p, helper.make_node("MaxPool", ["p"], ["y"], kernel_shape=[3, 3])], {"x": (1, 2, 6, 6)}, ["y"], inits)
    g, _ = optimized(m)
    assert ops(g) == ["Pad", "MaxPool"]
    compare(m)


@pytest.mark.parametrize("pads,value", [([0, 1, 1, 1, 0, 0, 1, 1], 0.0), ([0, 0, 1, 1, 0, 0, 1, 1], 1.5)])
def test_pad_not_folded(pads: list[int], value: float) -> None:
    """Channel padding or a non-zero value cannot become conv padding."""
    p, inits = pad_node("x", "p", pads, value=value)
    inits["w"] = RNG.standard_normal((4, 4 if pads[1] else 3, 3, 3)).astype(np.float32)
    m = model([p, helper.make_node("Conv", ["p", "w"], ["y"])], {"x": (1, 3, 6, 6)}, ["y"], inits)
    g, _ = optimized(m)
    assert ops(g) == ["Pad", "FusedConv"]
    compare(m)


def test_pad_read_by_a_conv_and_a_ceil_mode_pool() -> None:
    """HGNetV2's stem: Relu -> Pad(0, 1, 0, 1) read by a 2x2 conv and a 2x2 stride-1 ceil_mode max pool. Both take
    the pads (with stride 1, ceil_mode changes nothing) and the Pad goes."""
    p, inits = pad_node("r", "p", [0, 0, 0, 0, 0, 0, 1, 1])
    inits["w"] = RNG.standard_normal((5, 3, 2, 2)).astype(np.float32)
    nodes = [helper.make_node("Relu", ["x"], ["r"]), p,
             helper.make_node("Conv", ["p", "w"], ["c"], name="conv1"),
             helper.make_node("MaxPool", ["p"], ["m"], kernel_shape=[2, 2], ceil_mode=1, name="pool1"),
             helper.make_node("Concat", ["m", "c"], ["y"], axis=1)]
    m = model(nodes, {"x": (1, 3, 9, 8)}, ["y"], inits)
    g, log = optimized(m)
    assert "Pad" not in ops(g)
    assert "[kiln] [V] Fusing pad1 with conv1" in log and "[kiln] [V] Fusing pad1 with pool1" in log
    compare(m)


@pytest.mark.parametrize("second", ["strided_ceil_pool", "add"])
def test_pad_kept_when_one_reader_cannot_take_it(second: str) -> None:
    """Every reader must take the pads: a stride-2 ceil_mode pool (its last window depends on where the input
    ends) or an Add keeps the Pad, and then the conv reads it too."""
    p, inits = pad_node("r", "p", [0, 0, 0, 0, 0, 0, 1, 1])
    inits["w"] = RNG.standard_normal((3, 3, 2, 2)).astype(np.float32)
    other = helper.make_node("MaxPool", ["p"], ["m"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1) \
        if second == "strided_ceil_pool" else helper.make_node("Add", ["p", "p"], ["m"])
    nodes = [helper.make_node("Relu", ["x"], ["r"]), p, helper.make_node("Conv", ["p", "w"], ["c"]), other]
    m = model(nodes, {"x": (1, 3, 8, 9)}, ["c", "m"], inits)
    g, _ = optimized(m)
    assert "Pad" in ops(g)
    compare(m)
