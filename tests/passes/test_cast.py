"""Cast folding (kiln/passes/cast.py): boundary Casts of a float16 network fold into its convolutions."""
from __future__ import annotations

import io

import numpy as np
import torch
from onnx import helper

from kiln.builder import Builder, BuilderConfig
from kiln.frontend.onnx import load_onnx
from kiln.ir.dtype import DType
from kiln.logger import Logger, Severity
from kiln.passes.base import PassContext, PassManager
from kiln.passes.cast import FoldCasts
from kiln.passes.precision import ReducedPrecision
from kiln.runtime.interpreter import GraphFunction
from tests.passes.models import model, rel_error


def _net():
    rng = np.random.default_rng(3)
    w1 = (rng.standard_normal((8, 3, 3, 3)) / 5).astype(np.float32)
    w2 = (rng.standard_normal((4, 8, 1, 1)) / 3).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("LeakyRelu", ["a"], ["b"], alpha=0.1, name="act"),
             helper.make_node("Conv", ["b", "w2"], ["y"], name="head"),
             helper.make_node("Softmax", ["b"], ["s"], axis=1, name="softmax")]  # float32: reads b through a Cast
    return model(nodes, {"x": (2, 3, 9, 9)}, ["y", "s"], {"w1": w1, "w2": w2})


def test_boundary_casts_fold_into_convolutions() -> None:
    m = _net()
    g = load_onnx(m, Logger())
    Builder(Logger()).build(g, BuilderConfig(device="cpu"))  # the optimization pipeline: conv+act fused
    x = torch.randn(2, 3, 9, 9)
    want = GraphFunction(g, "cpu")([x])
    buf = io.StringIO()
    ctx = PassContext(Logger(Severity.VERBOSE, buf))
    PassManager([ReducedPrecision(DType.FLOAT16)]).run(g, ctx)
    casts = sum(n.op_type == "Cast" for n in g.nodes)
    PassManager([FoldCasts()]).run(g, ctx)
    # the input Cast folds into conv1 (convert on load), head's output Cast into head (convert on store);
    # the Cast feeding Softmax has a non-conv reader and stays
    assert sum(n.op_type == "Cast" for n in g.nodes) == casts - 2
    convs = {n.name: n for n in g.nodes if n.op_type == "FusedConv"}
    first = next(n for n in convs.values() if n.inputs[0].name == "x")
    assert first.inputs[0].type.dtype == DType.FLOAT32 and first.inputs[1].const.dtype == torch.float16
    head = next(n for n in convs.values() if n.outputs[0].name == "y")
    assert head.attr("out_dtype") == DType.FLOAT32.onnx and head.outputs[0].type.dtype == DType.FLOAT32
    assert "convert on load" in buf.getvalue() and "convert on store" in buf.getvalue()
    got = GraphFunction(g, "cpu")([x])
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        assert rel_error(a.numpy(), b.numpy()) < 1e-2
