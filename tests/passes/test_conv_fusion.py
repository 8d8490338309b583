"""Conv fusion (kiln/passes/conv_fusion.py): Conv + bias + activation (+ residual) -> FusedConv."""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from onnx import helper

from tests.passes.models import compare, model, ops, optimized

RNG = np.random.default_rng(3)
W = RNG.standard_normal((8, 4, 3, 3)).astype(np.float32) * 0.3
B = RNG.standard_normal(8).astype(np.float32)


def conv(x: str = "x", y: str = "c", name: str = "conv1") -> Any:
    return helper.make_node("Conv", [x, "w", "b"], [y], pads=[1, 1, 1, 1], name=name)


ACTS = {  # name -> (nodes reading "c" and writing "y", extra initializers, opset, fused activation)
    "relu": ([helper.make_node("Relu", ["c"], ["y"], name="act")], {}, 17, "Relu"),
    "leaky": ([helper.make_node("LeakyRelu", ["c"], ["y"], alpha=0.2, name="act")], {}, 17, "LeakyRelu"),
    "relu6": ([helper.make_node("Clip", ["c", "lo", "hi"], ["y"], name="act")],
              {"lo": np.array(0, np.float32), "hi": np.array(6, np.float32)}, 17, "Clip"),
    "clip_v6": ([helper.make_node("Clip", ["c"], ["y"], min=-0.5, max=0.5, name="act")], {}, 6, "Clip"),
    "clip_min0": ([helper.make_node("Clip", ["c", "lo"], ["y"], name="act")], {"lo": np.array(0, np.float32)},
                  17, "Relu"),
    "sigmoid": ([helper.make_node("Sigmoid", ["c"], ["y"], name="act")], {}, 17, "Sigmoid"),
    "tanh": ([helper.make_node("Tanh", ["c"], ["y"], name="act")], {}, 17, "Tanh"),
    "hardswish": ([helper.make_node("HardSwish", ["c"], ["y"], name="act")], {}, 17, "HardSwish"),
    "hardsigmoid": ([helper.make_node("HardSigmoid", ["c"], ["y"], alpha=0.3, beta=0.4, name="act")], {}, 17,
                    "HardSigmoid"),
    "mish": ([helper.make_node("Mish", ["c"], ["y"], name="act")], {}, 18, "Mish"),
    "gelu": ([helper.make_node("Gelu", ["c"], ["y"], name="act")], {}, 20, "Gelu"),
    "gelu_tanh": ([helper.make_node("Gelu", ["c"], ["y"], approximate="tanh", name="act")], {}, 20, "GeluTanh"),
    "silu_pattern": ([helper.make_node("Sigmoid", ["c"], ["s"], name="sig"),
                      helper.make_node("Mul", ["c", "s"], ["y"], name="mul")], {}, 17, "SiLU"),
    "hardswish_pattern": ([helper.make_node("HardSigmoid", ["c"], ["s"], alpha=1 / 6, beta=0.5, name="hs"),
                           helper.make_node("Mul", ["s", "c"], ["y"], name="mul")], {}, 17, "HardSwish"),
    "mish_pattern": ([helper.make_node("Softplus", ["c"], ["sp"], name="sp"),
                      helper.make_node("Tanh", ["sp"], ["s"], name="th"),
                      helper.make_node("Mul", ["c", "s"], ["y"], name="mul")], {}, 17, "Mish"),
}


@pytest.mark.parametrize("act", sorted(ACTS))
def test_conv_activation(act: str) -> None:
    nodes, extra, opset, fused = ACTS[act]
    m = model([conv()] + nodes, {"x": (2, 4, 6, 6)}, ["y"], {"w": W, "b": B, **extra}, opset=opset)
    g, log = optimized(m)
    assert ops(g) == ["FusedConv"]
    assert g.nodes[0].attrs["activation"] == fused
    assert any(line.endswith(f"Fusing conv1 with {nodes[0].name}") for line in log)
    compare(m)


def test_auto_pad_same_resolved() -> None:
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], auto_pad="SAME_UPPER", strides=[2, 2], name="conv1"),
             helper.make_node("Relu", ["c"], ["y"])]
    m = model(nodes, {"x": (1, 4, 7, 8)}, ["y"], {"w": W})
    g, _ = optimized(m)
    assert ops(g) == ["FusedConv"] and g.nodes[0].attrs["pads"] == [1, 0, 1, 1]
    compare(m)


def test_residual_add_then_relu() -> None:
    """ResNet style: relu(conv(x) + skip), Z computed by another conv before."""
    nodes = [conv("x", "skip", "conv0"), conv("skip", "c", "conv1"),
             helper.make_node("Add", ["c", "skip"], ["s"], name="add1"),
             helper.make_node("Relu", ["s"], ["y"], name="relu1")]
    m = model(nodes, {"x": (1, 4, 5, 5)}, ["y"], {"w": W[:4], "b": B[:4]})
    g, log = optimized(m)
    assert ops(g) == ["FusedConv", "FusedConv"]
    last = g.nodes[1]
    assert len(last.inputs) == 4 and last.attrs["act_before_add"] == 0 and last.attrs["activation"] == "Relu"
    assert "[kiln] [V] Fusing conv1 with add1" in log and "[kiln] [V] Fusing conv1 with relu1" in log
    compare(m)


def test_relu_then_residual_add() -> None:
    nodes = [conv(), helper.make_node("Relu", ["c"], ["r"], name="relu1"),
             helper.make_node("Sum", ["z", "r"], ["y"], name="sum1")]
    m = model(nodes, {"x": (1, 4, 5, 5), "z": (1, 8, 5, 5)}, ["y"], {"w": W, "b": B})
    g, _ = optimized(m)
    assert ops(g) == ["FusedConv"] and g.nodes[0].attrs["act_before_add"] == 1
    compare(m)


def test_both_add_operands_convs() -> None:
    """Projection shortcut: the later conv takes the Add; the earlier conv's output is Z. (The two convs read
    different tensors: two convs of one input summed are one convolution, kiln.passes.summed_convs.)"""
    nodes = [helper.make_node("Conv", ["x", "w2", "b"], ["a"], pads=[1, 1, 1, 1], name="conv_a"),
             conv("x2", "c", "conv_b"),
             helper.make_node("Add", ["a", "c"], ["s"], name="add1"),
             helper.make_node("Relu", ["s"], ["y"], name="relu1")]
    m = model(nodes, {"x": (1, 4, 5, 5), "x2": (1, 4, 5, 5)}, ["y"], {"w": W, "w2": W[::-1].copy(), "b": B})
    g, _ = optimized(m)
    assert ops(g) == ["FusedConv", "FusedConv"] and g.nodes[1].name == "conv_b"
    compare(m)


def test_broadcast_add_is_not_a_residual() -> None:
    nodes = [conv(), helper.make_node("Add", ["c", "z"], ["y"], name="add1")]
    m = model(nodes, {"x": (1, 4, 5, 5), "z": (1, 8, 1, 1)}, ["y"], {"w": W, "b": B})
    g, _ = optimized(m)
    assert ops(g) == ["FusedConv", "Pointwise"]  # the Add stays its own layer (lowered to a program)
    assert g.nodes[0].attrs.get("residual", 0) in (0, False) and len(g.nodes[0].inputs) <= 3
    compare(m)


def test_shared_conv_output_not_fused() -> None:
    nodes = [conv(), helper.make_node("Relu", ["c"], ["y"], name="relu1"),
             helper.make_node("Neg", ["c"], ["y2"], name="neg")]
    m = model(nodes, {"x": (1, 4, 5, 5)}, ["y", "y2"], {"w": W, "b": B})
    g, _ = optimized(m)
    assert ops(g) == ["FusedConv", "Relu", "Neg"] and g.nodes[0].attrs["activation"] == ""
    compare(m)
