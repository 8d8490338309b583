"""FoldRowAffineIntoGemm (kiln/passes/gemm_fusion.py): LeViT's Linear + BatchNorm1d on x.flatten(0, 1), reshaped back
with reshape_as(x), becomes one FusedGemm with the norm in its weights and bias; checked against onnxruntime on fresh
random inputs and weights. Near misses (a per-row constant, the product read by another op) keep their Mul / Add."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from tests.passes.models import compare, model, ops, optimized

B, T, K, N = 2, 5, 12, 16


def _linear_norm(rng: np.random.Generator, extra_reader: bool = False) -> object:
    """y = BN(x @ W flattened to rows) reshaped back to Shape(x @ W) (timm's LinearNorm), plus x @ W again when
    `extra_reader` (the product then has a reader that reads its values)."""
    inits = {"w": (rng.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32),
             "g": rng.uniform(0.5, 1.5, N).astype(np.float32), "b": rng.standard_normal(N).astype(np.float32),
             "m": rng.standard_normal(N).astype(np.float32), "v": rng.uniform(0.5, 2.0, N).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["p"]), helper.make_node("Flatten", ["p"], ["f"], axis=2),
             helper.make_node("Shape", ["p"], ["s"]),
             helper.make_node("BatchNormalization", ["f", "g", "b", "m", "v"], ["n"], epsilon=1e-5),
             helper.make_node("Reshape", ["n", "s"], ["y"])]
    outs = ["y"]
    if extra_reader:
        nodes.append(helper.make_node("Relu", ["p"], ["r"]))
        outs.append("r")
    return model(nodes, {"x": (B, T, K)}, outs, inits)


def test_linear_norm_becomes_one_gemm() -> None:
    m = _linear_norm(np.random.default_rng())
    g, log = optimized(m)
    assert ops(g).count("FusedGemm") == 1 and not {"Mul", "Add", "Pointwise", "BatchNormalization"} & set(ops(g)), \
        ops(g)
    assert sum("Folding" in line and "above" in line for line in log) == 2, log
    compare(m, seed=int(np.random.default_rng().integers(1 << 30)))


def test_a_value_reader_of_the_product_keeps_the_scale() -> None:
    """The product is also read by a Relu: folding the Mul into W would change what the Relu reads."""
    m = _linear_norm(np.random.default_rng(), extra_reader=True)
    g, log = optimized(m)
    assert not any("Folding" in line and "_mul" in line for line in log), log
    compare(m, seed=int(np.random.default_rng().integers(1 << 30)))


@pytest.mark.parametrize("shape", [(B * T, 1), (1, 1)], ids=["per-row", "scalar"])
def test_only_a_column_constant_folds(shape: tuple[int, ...]) -> None:
    """A per-row constant does not commute with the column fold; a scalar does (it is uniform over columns)."""
    rng = np.random.default_rng()
    inits = {"w": (rng.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32),
             "c": rng.uniform(0.5, 1.5, shape).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["p"]), helper.make_node("Flatten", ["p"], ["f"], axis=2),
             helper.make_node("Mul", ["f", "c"], ["y"])]
    m = model(nodes, {"x": (B, T, K)}, ["y"], inits)
    g, log = optimized(m)
    folded = any("Folding" in line and "above" in line for line in log)
    assert folded == (shape == (1, 1)), log
    compare(m, seed=int(rng.integers(1 << 30)))


def test_levit_mlp_activation_joins_the_first_gemm() -> None:
    """LinearNorm -> HardSwish -> LinearNorm (LeViT's MLP): once the norm folds, the activation stands behind a
    Flatten / Reshape chain of the biased product, is moved above it and becomes the first GEMM's epilogue."""
    rng = np.random.default_rng()

    def lin_norm(tag: str, x: str, k: int, n: int) -> tuple[list[object], dict[str, np.ndarray]]:
        inits = {f"{tag}w": (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32),
                 f"{tag}g": rng.uniform(0.5, 1.5, n).astype(np.float32),
                 f"{tag}b": rng.standard_normal(n).astype(np.float32),
                 f"{tag}m": rng.standard_normal(n).astype(np.float32),
                 f"{tag}v": rng.uniform(0.5, 2.0, n).astype(np.float32)}
        nodes = [helper.make_node("MatMul", [x, f"{tag}w"], [f"{tag}p"]),
                 helper.make_node("Flatten", [f"{tag}p"], [f"{tag}f"], axis=2),
                 helper.make_node("Shape", [f"{tag}p"], [f"{tag}s"]),
                 helper.make_node("BatchNormalization", [f"{tag}f", *(f"{tag}{c}" for c in "gbmv")], [f"{tag}n"],
                                  epsilon=1e-5),
                 helper.make_node("Reshape", [f"{tag}n", f"{tag}s"], [f"{tag}y"])]
        return nodes, inits
    n1, i1 = lin_norm("a", "x", K, N)
    n2, i2 = lin_norm("b", "h", N, K)
    nodes = n1 + [helper.make_node("HardSwish", ["ay"], ["h"])] + n2
    m = model(nodes, {"x": (B, T, K)}, ["by"], {**i1, **i2})
    g, log = optimized(m)
    assert ops(g).count("FusedGemm") == 2 and "HardSwish" not in ops(g) and "Pointwise" not in ops(g), ops(g)
    assert any(line.startswith("[kiln] [V] Moved HardSwish") for line in log), log
    compare(m, seed=int(rng.integers(1 << 30)))
