"""Gemm fusion (kiln/passes/gemm_fusion.py): Gemm / MatMul (+ bias) (+ activation) (+ residual) -> FusedGemm."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import helper

from tests.passes.models import compare, model, ops, optimized

RNG = np.random.default_rng(4)


def rnd(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_alpha_beta_relu(trans_b: int) -> None:
    w = rnd(6, 5) if trans_b else rnd(5, 6)
    nodes = [helper.make_node("Gemm", ["x", "w", "c"], ["g"], alpha=0.7, beta=1.5, transB=trans_b, name="fc1"),
             helper.make_node("Relu", ["g"], ["y"], name="relu1")]
    m = model(nodes, {"x": (3, 5)}, ["y"], {"w": w, "c": rnd(1, 6)})
    g, log = optimized(m)
    assert ops(g) == ["FusedGemm"] and g.nodes[0].attrs["activation"] == "Relu"
    w_fused = g.nodes[0].inputs[1].const
    assert tuple(w_fused.shape) == (6, 5) and w_fused.dtype == torch.float32
    assert "[kiln] [V] Fusing fc1 with relu1" in log
    compare(m)


def test_matmul_bias_gelu_3d() -> None:
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm1"),
             helper.make_node("Add", ["m", "b"], ["a"], name="bias1"),
             helper.make_node("Gelu", ["a"], ["y"], name="gelu1")]
    m = model(nodes, {"x": (2, 3, 8)}, ["y"], {"w": rnd(8, 4), "b": rnd(4)}, opset=20)
    g, log = optimized(m)
    assert ops(g) == ["FusedGemm"] and len(g.nodes[0].inputs) == 3
    assert "[kiln] [V] Fusing mm1 with bias1" in log
    compare(m)


def test_gemm_runtime_c_becomes_residual() -> None:
    nodes = [helper.make_node("Gemm", ["x", "w", "z"], ["g"], transB=1, name="fc1"),
             helper.make_node("Sigmoid", ["g"], ["y"], name="sig1")]
    m = model(nodes, {"x": (3, 5), "z": (3, 6)}, ["y"], {"w": rnd(6, 5)})
    g, _ = optimized(m)
    assert ops(g) == ["FusedGemm"] and len(g.nodes[0].inputs) == 4 and g.nodes[0].attrs["act_before_add"] == 0
    compare(m)


def test_gemm_trans_a_not_fused() -> None:
    nodes = [helper.make_node("Gemm", ["x", "w"], ["g"], transA=1, name="fc1"),
             helper.make_node("Relu", ["g"], ["y"])]
    m = model(nodes, {"x": (5, 3)}, ["y"], {"w": rnd(5, 6)})
    g, _ = optimized(m)
    assert ops(g) == ["Gemm", "Relu"]
    compare(m)


def test_matmul_runtime_weight_not_fused() -> None:
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    m = model(nodes, {"x": (3, 5), "w": (5, 2)}, ["y"])
    g, _ = optimized(m)
    assert ops(g) == ["MatMul"]
    compare(m)


def test_activation_after_a_row_reshape_becomes_the_epilogue() -> None:
    """GPT-2's Conv1D: rows flattened for a 2-D Gemm, reshaped back, then the activation (here a
    decomposed x * sigmoid(x)): the activation moves above the Reshape into the FusedGemm."""
    rng = np.random.default_rng(12)
    inits = {"w": rng.standard_normal((16, 24)).astype(np.float32), "b": rng.standard_normal(24).astype(np.float32),
             "shape": np.array([2, 5, 24], np.int64)}
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["g"]), helper.make_node("Reshape", ["g", "shape"], ["r"]),
             helper.make_node("Sigmoid", ["r"], ["s"]), helper.make_node("Mul", ["r", "s"], ["y"])]
    m = model(nodes, {"x": (10, 16)}, ["y"], inits)
    g, _ = optimized(m)
    assert ops(g)[0] == "FusedGemm" and set(ops(g)) <= {"FusedGemm", "Reshape"}
    assert g.nodes[0].attrs["activation"] == "SiLU"
    compare(m)


def test_a_reshape_read_twice_keeps_its_activation_apart() -> None:
    rng = np.random.default_rng(13)
    inits = {"w": rng.standard_normal((16, 24)).astype(np.float32), "shape": np.array([2, 5, 24], np.int64)}
    nodes = [helper.make_node("Gemm", ["x", "w"], ["g"]), helper.make_node("Reshape", ["g", "shape"], ["r"]),
             helper.make_node("Relu", ["r"], ["y"])]
    m = model(nodes, {"x": (10, 16)}, ["y", "r"], inits)
    g, _ = optimized(m)
    assert "Relu" in ops(g) or any(n.attrs.get("activation") == "" for n in g.nodes if n.op_type == "FusedGemm")
    compare(m)
