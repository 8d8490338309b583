"""Residual add + LayerNorm / RMSNorm -> AddLayerNormalization (kiln.passes.residual_norm), on the CUDA target.

The pipeline runs as the builder runs it for the CUDA target (PassContext(device="cuda")); the rewritten graph is
then run on the CPU through the ops' references and compared with onnxruntime on the original model, on fresh
random inputs. Post-norm (BERT: the sum read by the norm only) and pre-norm (ViT / GPT-2: the sum is the residual
stream, read again) blocks, the residual as a gemm epilogue or a plain Add, RMSNorm; near misses stay unfused.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from kiln.frontend.onnx import load_onnx
from kiln.logger import Logger
from kiln.passes.base import PassContext, PassManager
from kiln.passes.pipeline import default_pipeline
from kiln.runtime.interpreter import GraphFunction
from kiln.testing import run_oracle

H = 32


def _model(nodes: list, consts: dict[str, np.ndarray], outs: list[str], opset: int = 17):
    inits = [numpy_helper.from_array(v, k) for k, v in consts.items()]
    ins = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 5, H])]
    g = helper.make_graph(nodes, "m", ins, [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs],
                          inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _w(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return (rng.standard_normal(shape) / math.sqrt(shape[0])).astype(np.float32)


def _optimized(model, device: str = "cuda"):
    g = load_onnx(model, Logger())
    PassManager(default_pipeline(), subgraphs=True).run(g, PassContext(Logger(), device=device))
    return g


def _check(model, seed: int) -> list:
    g = _optimized(model)
    x = np.random.default_rng(seed).standard_normal((3, 5, H)).astype(np.float32)
    got = GraphFunction(g)([torch.from_numpy(x)])
    want = run_oracle(model, {"x": x})
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-5)
    return g.nodes


def _ln(name: str, x: str, y: str, rng: np.random.Generator, consts: dict, rms: bool = False) -> object:
    consts[f"{name}_g"] = (1 + 0.2 * rng.standard_normal(H)).astype(np.float32)
    if rms:
        return helper.make_node("RMSNormalization", [x, f"{name}_g"], [y], name=name, epsilon=1e-6)
    consts[f"{name}_b"] = (0.1 * rng.standard_normal(H)).astype(np.float32)
    return helper.make_node("LayerNormalization", [x, f"{name}_g", f"{name}_b"], [y], name=name, epsilon=1e-5)


def _ops(nodes) -> list[str]:
    return [n.op_type for n in nodes]


def test_post_norm_gemm_residual_becomes_one_norm_layer() -> None:
    """BERT's sublayer end: LayerNorm(x + (a @ W + b)): the gemm keeps its bias, the norm adds the residual."""
    rng = np.random.default_rng(1)
    c = {"w": _w(rng, H, H), "bias": (0.1 * rng.standard_normal(H)).astype(np.float32)}
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("MatMul", ["a", "w"], ["m"]),
             helper.make_node("Add", ["m", "bias"], ["mb"]), helper.make_node("Add", ["mb", "x"], ["h"]),
             _ln("ln", "h", "y", rng, c)]
    nodes_after = _check(_model(nodes, c, ["y"]), seed=2)
    fused = [n for n in nodes_after if n.op_type == "AddLayerNormalization"]
    assert len(fused) == 1 and len(fused[0].outputs) == 1, _ops(nodes_after)
    gemm = fused[0].inputs[0].producer
    assert gemm.op_type == "FusedGemm" and gemm.input(3) is None and gemm.input(2) is not None
    assert "LayerNormalization" not in _ops(nodes_after)


@pytest.mark.parametrize("rms", [False, True])
def test_pre_norm_residual_stream_keeps_the_sum(rms: bool) -> None:
    """A pre-norm block: h = x + f(x) is normalized for the next sublayer and read again as its residual: the
    fused layer stores the sum as its second output, which the next residual add reads."""
    rng = np.random.default_rng(3)
    c = {"w1": _w(rng, H, H), "w2": _w(rng, H, H)}
    nodes = [helper.make_node("Tanh", ["x"], ["t"]), helper.make_node("Add", ["x", "t"], ["h"]),
             _ln("ln1", "h", "n1", rng, c, rms), helper.make_node("MatMul", ["n1", "w1"], ["m1"]),
             helper.make_node("Add", ["m1", "h"], ["h2"]), _ln("ln2", "h2", "y", rng, c, rms),
             helper.make_node("MatMul", ["y", "w2"], ["z"])]
    nodes_after = _check(_model(nodes, c, ["z", "h2"], opset=23 if rms else 17), seed=4)
    fused = [n for n in nodes_after if n.op_type == "AddLayerNormalization"]
    assert len(fused) == 2, _ops(nodes_after)
    assert all(int(n.attr("rms")) == int(rms) for n in fused)
    assert [len(n.outputs) for n in fused] == [2, 2]  # h read by the next residual add; h2 a graph output


def test_cpu_target_and_near_misses_stay_unfused() -> None:
    """The CPU target keeps the unfused form; on CUDA an activation after the residual, an add that broadcasts x
    to a larger shape and a norm with Mean/InvStdDev outputs are not residual norms."""
    rng = np.random.default_rng(5)
    c = {"w": _w(rng, H, H), "vec": rng.standard_normal(H).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "x"], ["h"]),
             _ln("ln", "h", "y", rng, c)]
    model = _model(nodes, c, ["y"])
    assert "AddLayerNormalization" not in _ops(_optimized(model, device="cpu").nodes)
    assert "AddLayerNormalization" in _ops(_optimized(model).nodes)
    c["wide"] = rng.standard_normal((2, 1, 5, H)).astype(np.float32)  # broadcasts x up: the sum is not x's shape
    nodes = [helper.make_node("Add", ["x", "wide"], ["h"]), _ln("ln", "h", "y", rng, c)]
    assert "AddLayerNormalization" not in _ops(_check(_model(nodes, c, ["y"]), seed=6))
    nodes = [helper.make_node("Tanh", ["x"], ["t"]), helper.make_node("Add", ["x", "t"], ["h"]),
             helper.make_node("LayerNormalization", ["h", "ln_g", "ln_b"], ["y", "mu", "rstd"], epsilon=1e-5)]
    c.update({"ln_g": np.ones(H, np.float32), "ln_b": np.zeros(H, np.float32)})
    assert "AddLayerNormalization" not in _ops(_check(_model(nodes, c, ["y", "mu", "rstd"]), seed=7))


@pytest.mark.parametrize("const_shape", [(1, 5, H), (H,)])
def test_constant_residual_broadcast_over_the_batch_fuses(const_shape) -> None:
    """ViT's embedding: Concat(class token, patches) + a position embedding [1, S, D] (a constant for every image),
    normalized for the first block and kept as its residual stream: one AddLayerNormalization reading the constant
    (a lower-rank one gets leading 1s), its sum stored for the block's residual add."""
    rng = np.random.default_rng(8)
    c = {"pos": rng.standard_normal(const_shape).astype(np.float32), "w": _w(rng, H, H)}
    nodes = [helper.make_node("Tanh", ["x"], ["t"]), helper.make_node("Add", ["t", "pos"], ["h"]),
             _ln("ln", "h", "n", rng, c), helper.make_node("MatMul", ["n", "w"], ["m"]),
             helper.make_node("Add", ["m", "h"], ["z"])]
    nodes_after = _check(_model(nodes, c, ["z"]), seed=9)
    fused = [n for n in nodes_after if n.op_type == "AddLayerNormalization"]
    assert len(fused) == 1 and len(fused[0].outputs) == 2, _ops(nodes_after)
    r = fused[0].inputs[1]
    assert r.const is not None and tuple(r.const.shape) == (1,) * (3 - len(const_shape)) + const_shape
    assert "Add" not in _ops(nodes_after)[:_ops(nodes_after).index("AddLayerNormalization")]
