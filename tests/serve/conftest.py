"""Sample plans for the serve tests, built here on the CPU from ONNX graphs made with onnx.helper (fresh seeded
weights), and small helpers (free loopback ports, Ray shutdown)."""
from __future__ import annotations

import os
import socket
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def conv_mlp(hidden: int, seed: int) -> onnx.ModelProto:
    """x[N,3,16,16] -> conv 3x3 (16) + relu -> maxpool 2 -> flatten -> gemm(1024, hidden) + relu ->
    gemm(hidden, hidden) + tanh -> gemm(hidden, 10) = y[N,10]. A large `hidden` makes one call weight-bound
    (the weights stream from memory once per execute, whatever the batch): what dynamic batching pays off on."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((16, 3, 3, 3)) * 0.3).astype(np.float32)
    b = (rng.standard_normal(16) * 0.1).astype(np.float32)
    f1 = (rng.standard_normal((1024, hidden)) / 32).astype(np.float32)
    f2 = (rng.standard_normal((hidden, hidden)) / np.sqrt(hidden)).astype(np.float32)
    f3 = (rng.standard_normal((hidden, 10)) / np.sqrt(hidden)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "f1"], ["h1"]), helper.make_node("Relu", ["h1"], ["a1"]),
             helper.make_node("Gemm", ["a1", "f2"], ["h2"]), helper.make_node("Tanh", ["h2"], ["a2"]),
             helper.make_node("Gemm", ["a2", "f3"], ["y"])]
    g = helper.make_graph(nodes, "conv_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
                          [numpy_helper.from_array(a, n) for a, n in ((w, "w"), (b, "b"), (f1, "f1"), (f2, "f2"),
                                                                      (f3, "f3"))])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def two_inputs(seed: int) -> onnx.ModelProto:
    """a[N,6] float32, b[N,1] int64 -> y[N,4] = tanh(a @ W) * b, s[N,1] = sum(a, 1); two inputs sharing N."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((6, 4)).astype(np.float32)
    ax = numpy_helper.from_array(np.array([1], np.int64), "ax")
    nodes = [helper.make_node("MatMul", ["a", "w"], ["m"]), helper.make_node("Tanh", ["m"], ["t"]),
             helper.make_node("Cast", ["b"], ["bf"], to=TensorProto.FLOAT), helper.make_node("Mul", ["t", "bf"], ["y"]),
             helper.make_node("ReduceSum", ["a", "ax"], ["s"], keepdims=1)]
    g = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 6]),
                                         helper.make_tensor_value_info("b", TensorProto.INT64, ["N", 1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4]),
                           helper.make_tensor_value_info("s", TensorProto.FLOAT, ["N", 1])],
                          [numpy_helper.from_array(w, "w"), ax])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def build(model: onnx.ModelProto, path: str, profiles: dict[str, tuple[tuple, tuple, tuple]]) -> str:
    """Build `model` for the CPU with one profile (input -> (min, opt, max)) and save it at `path`."""
    from kiln.builder import Builder, BuilderConfig, OptimizationProfile
    from kiln.plan.format import save_plan
    prof = OptimizationProfile()
    for name, (a, b, c) in profiles.items():
        prof.set_shape(name, a, b, c)
    save_plan(Builder().build(model, BuilderConfig(device="cpu", profiles=[prof], optimization_level=0)), path)
    return path


def free_port() -> int:
    """A TCP port free on the loopback interface now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def small_plan(tmp_path_factory) -> tuple[str, onnx.ModelProto]:
    """(plan path, ONNX model): conv_mlp(64), batch 1..16."""
    d = tmp_path_factory.mktemp("serve_small")
    model = conv_mlp(64, seed=11)
    return build(model, str(d / "small.kiln"), {"x": ((1, 3, 16, 16), (8, 3, 16, 16), (16, 3, 16, 16))}), model


def python() -> str:
    return sys.executable
