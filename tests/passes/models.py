"""Helpers for the pass tests: small ONNX graphs, random-weight copies of onnx's light models, comparisons."""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from kiln.builder import Builder, BuilderConfig
from kiln.ir.graph import Graph
from kiln.logger import Logger, Severity
from kiln.testing import run_kiln, run_oracle

LIGHT_DIR = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")


def rel_error(got: Any, want: Any) -> float:
    """max |got - want| / max |want| (normwise: element-wise ratios blow up near zero)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"shape {got.shape} != {want.shape}"
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def model(nodes: list[onnx.NodeProto], inputs: dict[str, tuple[int, ...]], outputs: list[str],
          inits: dict[str, np.ndarray] | None = None, opset: int = 17) -> onnx.ModelProto:
    """A float32 model from nodes, graph input shapes, output names and initializers."""
    g_in = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, s) for n, s in inputs.items()]
    g_out = [helper.make_empty_tensor_value_info(n) for n in outputs]
    init = [numpy_helper.from_array(np.asarray(a), n) for n, a in (inits or {}).items()]
    m = helper.make_model(helper.make_graph(nodes, "t", g_in, g_out, init),
                          opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = min(m.ir_version, 10)
    return m


def feeds_for(m: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """Fresh random float32 inputs for every graph input (static shapes)."""
    rng = np.random.default_rng(seed)
    inits = {i.name for i in m.graph.initializer}
    out = {}
    for v in m.graph.input:
        if v.name in inits:
            continue
        shape = [d.dim_value for d in v.type.tensor_type.shape.dim]
        out[v.name] = rng.standard_normal(shape).astype(np.float32)
    return out


def compare(m: onnx.ModelProto, tol: float = 1e-4, seed: int = 0) -> list[np.ndarray]:
    """Kiln's built plan vs onnxruntime on fresh random inputs: normwise rel. error <= tol per output."""
    feeds = feeds_for(m, seed)
    got = run_kiln(m, feeds)
    want = run_oracle(m, feeds)
    for i, (a, b) in enumerate(zip(got, want)):
        err = rel_error(a, b)
        assert err <= tol, f"output {i}: rel err {err:.3g} > {tol}"
    return got


def optimized(m: onnx.ModelProto) -> tuple[Graph, list[str]]:
    """The optimized graph of a model and the verbose log lines of its build."""
    import io
    buf = io.StringIO()
    logger = Logger(Severity.VERBOSE, buf)
    from kiln.frontend.onnx import load_onnx
    g = load_onnx(m, logger)
    Builder(logger).build(g, BuilderConfig())
    return g, buf.getvalue().splitlines()


def ops(g: Graph) -> list[str]:
    return [n.op_type for n in g.nodes]


def randomize_light(path: str, seed: int = 0, logits: bool = True) -> onnx.ModelProto:
    """A light model whose constant-filled weights (ConstantOfShape) get random values instead.

    BatchNormalization scales and variances are in [0.5, 1.5]; other weights ~ N(0, 1/fan_in) so
    that activations stay O(1) through deep networks. With `logits` a final Softmax is dropped
    (its input becomes the output): softmax would hide errors in the logits.
    """
    m = onnx.load(path)
    rng = np.random.default_rng(seed)
    init = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    bn_var = {n.input[4] for n in m.graph.node if n.op_type == "BatchNormalization" and len(n.input) > 4}
    bn_scale = {n.input[1] for n in m.graph.node if n.op_type == "BatchNormalization"}
    keep, new_init = [], []
    for n in m.graph.node:
        if n.op_type == "ConstantOfShape" and n.input[0] in init:
            shape = [int(d) for d in init[n.input[0]]]
            name = n.output[0]
            if name in bn_var:
                a = rng.uniform(0.5, 1.5, shape)
            elif name in bn_scale:
                a = rng.uniform(0.5, 1.5, shape)
            else:
                fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
                a = rng.standard_normal(shape) * (1.0 / np.sqrt(max(fan_in, 1))) if len(shape) > 1 \
                    else rng.uniform(-0.1, 0.1, shape)
            new_init.append(numpy_helper.from_array(a.astype(np.float32), name))
        else:
            keep.append(n)
    if logits and keep and keep[-1].op_type == "Softmax" and keep[-1].output[0] == m.graph.output[0].name:
        last = keep.pop()
        m.graph.output[0].name = last.input[0]
        m.graph.output[0].type.tensor_type.ClearField("shape")
    del m.graph.node[:]
    m.graph.node.extend(keep)
    m.graph.initializer.extend(new_init)
    return m
