"""Summed convolutions (kiln/passes/summed_convs.py): RepVGG / MobileOne branches of one input added together
become one convolution, checked against onnxruntime on the original model with fresh random inputs and weights.
Near misses (misaligned pads, other strides, an even/odd kernel pair, a branch read elsewhere) stay as they are."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from tests.passes.models import compare, model, ops, optimized

C = 8


def _seed() -> int:
    return int(np.random.default_rng().integers(1 << 30))


def _w(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)


def _bn(rng: np.random.Generator, name: str, x: str, y: str) -> tuple[object, dict[str, np.ndarray]]:
    p = {f"{name}_g": rng.uniform(0.5, 1.5, C), f"{name}_b": rng.standard_normal(C), f"{name}_m": rng.standard_normal(C),
         f"{name}_v": rng.uniform(0.5, 2.0, C)}
    node = helper.make_node("BatchNormalization", [x, *p], [y], name=name, epsilon=1e-5)
    return node, {k: v.astype(np.float32) for k, v in p.items()}


def _conv(name: str, x: str, y: str, k: int, pad: int, group: int = 1, stride: int = 1) -> object:
    return helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [y], name=name, kernel_shape=[k, k],
                            pads=[pad] * 4, group=group, strides=[stride, stride])


def _convs(g) -> list[str]:
    return [o for o in ops(g) if o in ("Conv", "FusedConv")]


@pytest.mark.parametrize("group", [1, C])
@pytest.mark.parametrize("stride", [1, 2])
def test_repvgg_block_is_one_convolution(group: int, stride: int) -> None:
    """3x3 conv + BN, 1x1 conv + BN and (stride 1) a BN of the input itself, summed, then ReLU."""
    rng = np.random.default_rng()
    cin = C // group
    nodes = [_conv("c3", "x", "a0", 3, 1, group, stride), _conv("c1", "x", "b0", 1, 0, group, stride)]
    inits = {"c3_w": _w(rng, C, cin, 3, 3), "c3_b": _w(rng, C, 1)[:, 0], "c1_w": _w(rng, C, cin, 1, 1),
             "c1_b": _w(rng, C, 1)[:, 0]}
    for name, x, y in (("bn3", "a0", "a"), ("bn1", "b0", "b")):
        n, p = _bn(rng, name, x, y)
        nodes.append(n)
        inits |= p
    nodes.append(helper.make_node("Add", ["a", "b"], ["s"], name="add"))
    last = "s"
    if stride == 1:
        n, p = _bn(rng, "bn_id", "x", "i")
        nodes += [n, helper.make_node("Add", ["s", "i"], ["s2"], name="add_id")]
        inits |= p
        last = "s2"
    nodes.append(helper.make_node("Relu", [last], ["y"], name="relu"))
    m = model(nodes, {"x": (2, C, 9, 11)}, ["y"], inits)
    g, log = optimized(m)
    assert _convs(g) == ["FusedConv"] and len(g.nodes) == 1, ops(g)  # the ReLU is its epilogue
    assert sum("Merging summed" in line for line in log) == (2 if stride == 1 else 1)
    compare(m, tol=1e-5, seed=_seed())


def test_mobileone_chain_of_branches_and_a_constant() -> None:
    """Four parallel depthwise 3x3 branches, a 1x1 scale branch and zeros added as a constant (timm's export of
    MobileOne before reparameterisation): one depthwise 3x3 convolution."""
    rng = np.random.default_rng()
    nodes, inits, acc = [], {"zero": np.zeros((), np.float32)}, None
    for k in range(5):
        ks, pad = (3, 1) if k < 4 else (1, 0)
        nodes.append(_conv(f"k{k}", "x", f"o{k}", ks, pad, C))
        inits |= {f"k{k}_w": _w(rng, C, 1, ks, ks), f"k{k}_b": _w(rng, C, 1)[:, 0]}
        if acc is None:
            nodes.append(helper.make_node("Add", ["o0", "zero"], ["acc0"], name="add_zero"))
        else:
            nodes.append(helper.make_node("Add", [acc, f"o{k}"], [f"acc{k}"], name=f"add{k}"))
        acc = f"acc{k}"
    m = model(nodes, {"x": (1, C, 12, 12)}, [acc], inits)
    g, _ = optimized(m)
    assert _convs(g) == ["FusedConv"] and len(g.nodes) == 1, ops(g)
    compare(m, tol=1e-5, seed=_seed())


NEAR_MISSES = {  # (kernel, pads, dilation) of the two branches: equal output shapes, not one convolution
    "pads": ((3, [0, 0, 2, 2], 1), (1, [0, 0, 0, 0], 1)),  # the 1x1 is not under the 3x3's centre
    "dilations": ((3, [2, 2, 2, 2], 2), (3, [1, 1, 1, 1], 1)),
    "even_kernel": ((2, [0, 0, 1, 1], 1), (1, [0, 0, 0, 0], 1)),  # no centre tap to align on
    "read_elsewhere": ((3, [1, 1, 1, 1], 1), (1, [0, 0, 0, 0], 1)),  # mergeable, but a branch is also an output
}


@pytest.mark.parametrize("case", sorted(NEAR_MISSES))
def test_near_misses_are_left_alone(case: str) -> None:
    rng = np.random.default_rng()
    nodes, inits = [], {}
    for name, y, (k, pads, d) in zip(("ca", "cb"), ("a", "b"), NEAR_MISSES[case]):
        nodes.append(helper.make_node("Conv", ["x", f"{name}_w", f"{name}_b"], [y], name=name, kernel_shape=[k, k],
                                      pads=pads, dilations=[d, d]))
        inits |= {f"{name}_w": _w(rng, C, C, k, k), f"{name}_b": _w(rng, C, 1)[:, 0]}
    nodes.append(helper.make_node("Add", ["a", "b"], ["y"], name="add"))
    m = model(nodes, {"x": (1, C, 8, 8)}, ["y", "a"] if case == "read_elsewhere" else ["y"], inits)
    g, log = optimized(m)
    assert not any("Merging summed" in line for line in log)
    assert len(_convs(g)) == 2
    compare(m, tol=1e-5, seed=_seed())
