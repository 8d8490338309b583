"""The fused-op definitions (kiln/ops/fused.py) against plain torch."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kiln.ir.graph import Node, Value
from kiln.ops.fused import ACTIVATIONS, activate
from kiln.ops.registry import lookup


def node(op: str, n_in: int, **attrs: object) -> Node:
    return Node(op, [Value(f"i{k}") for k in range(n_in)], [Value("y")], attrs, name=op.lower(), domain="kiln")


def test_registered_in_kiln_domain() -> None:
    for op in ("FusedConv", "FusedGemm", "Pointwise"):
        assert lookup(op, "kiln").domain == "kiln"


@pytest.mark.parametrize("act_before_add", [0, 1])
@pytest.mark.parametrize("act", sorted(a for a in ACTIVATIONS if a))
def test_fused_conv(act: str, act_before_add: int) -> None:
    x, w, b = torch.randn(2, 4, 7, 6), torch.randn(6, 2, 3, 3), torch.randn(6)
    alpha, beta = (-0.5, 0.5) if act == "Clip" else (0.2, 0.4)
    n = node("FusedConv", 4, strides=[2, 1], pads=[1, 0, 0, 2], dilations=[1, 2], group=2, activation=act,
             alpha=alpha, beta=beta, act_before_add=act_before_add)
    conv = F.conv2d(F.pad(x, [0, 2, 1, 0]), w, b, [2, 1], 0, [1, 2], 2)
    z = torch.randn_like(conv)
    want = activate(conv, act, alpha, beta) + z if act_before_add else activate(conv + z, act, alpha, beta)
    got = lookup("FusedConv", "kiln").compute(n, x, w, b, z)
    torch.testing.assert_close(got, want)


def test_fused_gemm_batched() -> None:
    a, w, b = torch.randn(2, 3, 5), torch.randn(4, 5), torch.randn(4)
    n = node("FusedGemm", 3, activation="LeakyRelu", alpha=0.1, beta=0.0, act_before_add=0)
    torch.testing.assert_close(lookup("FusedGemm", "kiln").compute(n, a, w, b), F.leaky_relu(a @ w.T + b, 0.1))


def test_pointwise_program() -> None:
    x, s = torch.randn(3, 4), torch.randn(4)
    program = [{"op": "Mul", "args": ["i0", "i1"], "attrs": {}},
               {"op": "Clip", "args": ["t0", "c0", "c1"], "attrs": {}},
               {"op": "LeakyRelu", "args": ["t1"], "attrs": {"alpha": 0.3}},
               {"op": "Add", "args": ["t2", "i0"], "attrs": {}}]
    n = node("Pointwise", 2, program=program, consts=[-0.5, 0.7], outputs=["t3"])
    want = F.leaky_relu(torch.clamp(x * s, -0.5, 0.7), 0.3) + x
    torch.testing.assert_close(lookup("Pointwise", "kiln").compute(n, x, s), want)


def test_half_activation_in_float32() -> None:
    x = torch.randn(64).half()
    torch.testing.assert_close(activate(x, "Mish"), F.mish(x.float()).half())
