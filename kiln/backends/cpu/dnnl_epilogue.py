"""A oneDNN layer's fused epilogue: the bias descriptor, and the residual add, activation and requantization as
post-ops in the node's order (float and integer layers alike)."""
from __future__ import annotations

import ctypes as C
from typing import Any

import torch

from kiln.backends.cpu.dnnl import (ARG_SRC_1, BINARY_ADD, ELTWISE_LINEAR, ELTWISE_ROUND, POST_OP_ARG_BASE, P,
                                    Library, Owned, data_type)
from kiln.errors import KilnError


ELTWISE: dict[str, tuple[int, Any]] = {
    # activation -> (algorithm, (alpha, beta) from the node's alpha/beta)
    "Relu": (0x20, lambda a, b: (0.0, 0.0)),
    "LeakyRelu": (0x20, lambda a, b: (a, 0.0)),
    "Tanh": (0x21, lambda a, b: (0.0, 0.0)),
    "HardSigmoid": (0x28, lambda a, b: (a, b)),
    "Sigmoid": (0x29, lambda a, b: (0.0, 0.0)),
    "GeluTanh": (0x2B, lambda a, b: (0.0, 0.0)),
    "SiLU": (0x2C, lambda a, b: (1.0, 0.0)),
    "Clip": (0x2E, lambda a, b: (a, b)),
    "Gelu": (0x31, lambda a, b: (0.0, 0.0)),
    "Mish": (0x33, lambda a, b: (0.0, 0.0)),
    "HardSwish": (0x34, lambda a, b: (1.0 / 6.0, 0.5)),
}
"""Fused activations oneDNN applies as eltwise post-ops (kiln.ops.fused.ACTIVATIONS names)."""


def bias_md(lib: Library, tmp: Owned, b: torch.Tensor | None, n: int, shape: list[int], strides: list[int]) -> Any:
    """The bias descriptor, after checking that the bias holds exactly the n values the primitive reads."""
    if b is None:
        return None
    if b.dtype != torch.float32 or b.numel() != n:
        raise KilnError(f"the bias must hold {n} float32 values, got {list(b.shape)} {b.dtype}")
    return lib.md(tmp, shape, strides)


def post_ops(lib: Library, tmp: Owned, act: str, alpha: float, beta: float, z: torch.Tensor | None,
             act_first: bool, z_scale: float = 1.0, z_zero_point: int = 0,
             out_scale: float = 1.0, out_round: bool = False,
             mid: tuple[float, int, int, int] | None = None) -> tuple[P, int, Any]:
    """Primitive attributes with the residual add (`z`) and the activation as post-ops in the node's order:
    (attributes, the execute argument of z or -1, z's memory descriptor or None), all owned by `tmp`.

    An integer z is added dequantized, v + (z - z_zero_point) * z_scale, as v * (1 / z_scale) - z_zero_point,
    + z, * z_scale (exact with power-of-two scales); a last eltwise linear multiplies by `out_scale` (the
    reciprocal output scale of an integer layer), and `out_round` rounds half to even before oneDNN adds the
    output zero point (it would round v + zp otherwise: -17.5 - 5 gives -22, not -18 - 5). `mid` (scale,
    zero point, lo, hi): the layer's own result is requantized to that grid and dequantized before the residual
    (a Q/DQ pair of the model kept inside a fused residual add, kiln.ops.qlayers' a_scale)."""
    d = lib.dll
    attr, po = lib.attr(tmp), P()
    lib.ok(d.dnnl_post_ops_create(C.byref(po)), "post-ops")
    tmp.add("post_ops", po)

    def linear(a: float, b: float) -> None:
        lib.ok(d.dnnl_post_ops_append_eltwise(po, ELTWISE_LINEAR, a, b), "eltwise post-op")
    z_arg, z_md = -1, None
    for op in (["act", "mid", "z"] if act_first else ["mid", "z", "act"]):
        if op == "mid" and mid is not None:
            scale, zp, lo, hi = mid
            linear(1.0 / scale, 0.0)
            lib.ok(d.dnnl_post_ops_append_eltwise(po, ELTWISE_ROUND, 0.0, 0.0), "eltwise post-op")
            lib.ok(d.dnnl_post_ops_append_eltwise(po, ELTWISE["Clip"][0], float(lo - zp), float(hi - zp)),
                   "eltwise post-op")
            linear(scale, 0.0)
        elif op == "act" and act:
            alg, params = ELTWISE[act]
            a, bb = params(alpha, beta)
            lib.ok(d.dnnl_post_ops_append_eltwise(po, alg, a, bb), "eltwise post-op")
        elif op == "z" and z is not None:
            dequant = z.dtype in (torch.int8, torch.uint8) and (z_scale != 1.0 or z_zero_point != 0)
            if dequant:
                linear(1.0 / z_scale, float(-z_zero_point))
            z_arg = POST_OP_ARG_BASE * (d.dnnl_post_ops_len(po) + 1) | ARG_SRC_1
            z_md = lib.md(tmp, z.shape, z.stride(), data_type(z))
            lib.ok(d.dnnl_post_ops_append_binary(po, BINARY_ADD, z_md), "binary post-op")
            if dequant and z_scale != 1.0:
                linear(z_scale, 0.0)
    if out_scale != 1.0:
        linear(out_scale, 0.0)
    if out_round:
        lib.ok(d.dnnl_post_ops_append_eltwise(po, ELTWISE_ROUND, 0.0, 0.0), "eltwise post-op")
    lib.ok(d.dnnl_primitive_attr_set_post_ops(attr, po), "post-op attribute")
    return attr, z_arg, z_md
