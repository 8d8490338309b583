"""BatchNormalization folding (kiln/passes/batchnorm.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import helper

from tests.passes.models import compare, model, ops, optimized

RNG = np.random.default_rng(1)


def rnd(*shape: int, lo: float = -1.0, hi: float = 1.0) -> np.ndarray:
    return RNG.uniform(lo, hi, shape).astype(np.float32)


def bn_params(prefix: str, c: int) -> dict[str, np.ndarray]:
    return {f"{prefix}_s": rnd(c, lo=0.5, hi=1.5), f"{prefix}_b": rnd(c), f"{prefix}_m": rnd(c),
            f"{prefix}_v": rnd(c, lo=0.5, hi=1.5)}


def bn(x: str, y: str, p: str, name: str) -> object:
    return helper.make_node("BatchNormalization", [x, f"{p}_s", f"{p}_b", f"{p}_m", f"{p}_v"], [y], name=name,
                            epsilon=1e-3)


@pytest.mark.parametrize("bias", [False, True])
def test_conv_bn_folded(bias: bool) -> None:
    inits = {"w": rnd(6, 3, 3, 3), **bn_params("bn1", 6)}
    if bias:
        inits["b"] = rnd(6)
    nodes = [helper.make_node("Conv", ["x", "w"] + (["b"] if bias else []), ["c"], pads=[1, 1, 1, 1], name="conv1"),
             bn("c", "y", "bn1", "bn1")]
    m = model(nodes, {"x": (2, 3, 8, 8)}, ["y"], inits)
    g, log = optimized(m)
    assert ops(g) == ["FusedConv"]
    assert "[kiln] [V] Fusing conv1 with bn1" in log
    assert g.nodes[0].inputs[1].const.dtype == torch.float32
    compare(m)


def test_conv_transpose_grouped_bn_folded() -> None:
    inits = {"w": rnd(4, 3, 3, 3), **bn_params("bn1", 6)}
    nodes = [helper.make_node("ConvTranspose", ["x", "w"], ["c"], group=2, strides=[2, 2], name="deconv1"),
             bn("c", "y", "bn1", "bn1")]
    m = model(nodes, {"x": (1, 4, 5, 5)}, ["y"], inits)
    g, _ = optimized(m)
    assert ops(g) == ["ConvTranspose"]
    compare(m)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_bn_folded(trans_b: int) -> None:
    w = rnd(5, 7) if trans_b else rnd(7, 5)
    inits = {"w": w, "c": rnd(5), **bn_params("bn1", 5)}
    nodes = [helper.make_node("Gemm", ["x", "w", "c"], ["g"], transB=trans_b, alpha=0.5, beta=2.0, name="fc1"),
             bn("g", "y", "bn1", "bn1")]
    m = model(nodes, {"x": (3, 7)}, ["y"], inits)
    g, _ = optimized(m)
    assert ops(g) == ["FusedGemm"]
    compare(m)


def test_matmul_bn_folded() -> None:
    inits = {"w": rnd(7, 5), **bn_params("bn1", 5)}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["g"], name="mm1"), bn("g", "y", "bn1", "bn1")]
    m = model(nodes, {"x": (3, 7)}, ["y"], inits)
    g, _ = optimized(m)
    assert ops(g) == ["FusedGemm"]
    compare(m)


def test_bn_not_folded_when_conv_output_is_shared() -> None:
    """The conv output has a second reader: BN becomes a scale (Mul+Add) fused into a Pointwise."""
    inits = {"w": rnd(4, 3, 1, 1), **bn_params("bn1", 4)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv1"), bn("c", "b", "bn1", "bn1"),
             helper.make_node("Relu", ["b"], ["y"], name="relu1"),
             helper.make_node("Sigmoid", ["c"], ["y2"], name="sig")]
    m = model(nodes, {"x": (2, 3, 5, 5)}, ["y", "y2"], inits)
    g, log = optimized(m)
    assert sorted(ops(g)) == ["FusedConv", "Pointwise", "Sigmoid"]
    assert any("Converting bn1 to a per-channel scale" in line for line in log)
    compare(m)


def test_standalone_bn_becomes_scale() -> None:
    nodes = [bn("x", "b", "bn1", "bn1"), helper.make_node("Relu", ["b"], ["y"], name="relu1")]
    m = model(nodes, {"x": (2, 4, 3, 3)}, ["y"], bn_params("bn1", 4))
    g, _ = optimized(m)
    assert ops(g) == ["Pointwise"]
    assert [i["op"] for i in g.nodes[0].attrs["program"]] == ["Mul", "Add", "Relu"]
    compare(m)
