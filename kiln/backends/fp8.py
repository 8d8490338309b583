"""What the FP8 GEMM tactics of both backends share (``cpu.fp8_gemm``, ``cuda.fp8_gemm``): which FP8 layers
(kiln.ops.qlayers' QGemm, and QConv when it is a 1x1 GEMM over pixels) they take, the epilogue prepared once on
the device, and the kernel around a float32 accumulator of the float8 product.

The epilogue runs as torch ops after the product (multipliers, bias, residual, activation, float8 quantize),
the reference's own arithmetic on the accumulator; only the accumulation differs from the reference's exact
float64 sum (float32 on both backends), so results agree within one float8 step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from kiln.backends.kernel import Kernel
from kiln.errors import KilnError
from kiln.ir.dtype import DType
from kiln.ir.graph import Node
from kiln.ops.activations import Epilogue, activate
from kiln.ops.conv import strides_dilations, window_ints
from kiln.ops.qlayers import FLOAT, FLOAT16, FLOAT8E4M3FN, QuantSpec, fp8_layer, quantize_fp8

Tensor = torch.Tensor
Product = Callable[[Tensor], Tensor]
"""rows [M, K] float8 -> float32 accumulator [M, N] (times the per-tensor multiplier where the product takes it)."""

FP8_OUT = (FLOAT8E4M3FN, FLOAT, FLOAT16)
_Z_TYPES = (DType.FLOAT32, DType.FLOAT16, DType.FLOAT8E4M3FN)


def gemm_shaped(node: Node) -> bool:
    """A gemm layer (FusedGemm, QGemm), or a conv layer (FusedConv, QConv) that is a GEMM over pixels: constant
    [K, C, 1, 1] weight, stride 1, no padding, one group."""
    if node.domain != "kiln":
        return False
    if node.op_type in ("FusedGemm", "QGemm"):
        return True
    w = node.input(1)
    if node.op_type not in ("FusedConv", "QConv") or w is None or w.const is None or w.const.dim() != 4 or \
            tuple(w.const.shape[2:]) != (1, 1):
        return False
    strides, _ = strides_dilations(node, 2)
    return (int(node.attr("group", 1) or 1) == 1 and all(s == 1 for s in strides)
            and all(p == 0 for p in window_ints(node, "pads", 2, 0)))


def fp8_gemm_ok(node: Node) -> bool:
    """An FP8 QGemm / 1x1 QConv these tactics take: float8 X and constant weight, per-tensor or per-output-channel
    finite positive scales, a constant float32 bias, a float or float8 residual, float8/float32/float16 output,
    no requantization before the residual (a_scale)."""
    if not fp8_layer(node) or len(node.outputs) != 1:
        return False
    x, w, b, z = (node.input(i) for i in range(4))
    wt = None if w is None else w.const
    if x is None or x.type.dtype != DType.FLOAT8E4M3FN or wt is None or wt.numel() == 0:
        return False
    if node.op_type == "QGemm":
        if wt.dim() != 2 or (x.type.rank is not None and x.type.rank < 2):
            return False
    elif x.type.rank not in (None, 4) or not gemm_shaped(node):
        return False
    n_out = int(wt.shape[0])
    q = QuantSpec.of(node)
    scales = (q.x_scale, *q.w_scales) + ((q.y_scale,) if q.fp8_out else ()) + \
        ((q.z_scale,) if z is not None and z.type.dtype == DType.FLOAT8E4M3FN else ())
    if q.out_dtype not in FP8_OUT or q.a_scale > 0 or len(q.w_scales) not in (1, n_out) or \
            not all(math.isfinite(s) and s > 0 for s in scales):
        return False
    if (q.x_zero_point, q.y_zero_point, q.z_zero_point) != (0, 0, 0):
        return False
    if b is not None and (b.const is None or b.const.dtype != torch.float32 or b.const.numel() != n_out):
        return False
    return z is None or z.type.dtype in _Z_TYPES


@dataclass
class Fp8Epilogue:
    """The layer's epilogue with its constants on the device: v = acc * mult + bias, the residual (float8:
    times z_scale), the activation, then float8(v / y_scale) or the float output type."""

    mult: Tensor | None  # [N] per-channel multipliers; None: the product applied the per-tensor one
    bias: Tensor | None
    z_scale: float
    ep: Epilogue
    spec: QuantSpec

    def __call__(self, acc: Tensor, z: Tensor | None) -> Tensor:
        v = acc
        if self.mult is not None and self.bias is not None:
            v = torch.addcmul(self.bias, v, self.mult)
        elif self.mult is not None:
            v = v.mul_(self.mult)
        elif self.bias is not None:
            v = v.add_(self.bias)
        ep = self.ep
        if ep.act_before_add:
            v = activate(v, ep.activation, ep.alpha, ep.beta)
        if z is not None:
            v = v.add_(z.float() * self.z_scale) if z.dtype == torch.float8_e4m3fn else v.add_(z)
        if not ep.act_before_add:
            v = activate(v, ep.activation, ep.alpha, ep.beta)
        out = quantize_fp8(v, self.spec.y_scale) if self.spec.fp8_out else v.to(self.spec.out_torch)
        return out if out.is_contiguous() else out.contiguous()  # a padded product's columns, nothing after it


def prepare(node: Node, device: torch.device, per_tensor_in_product: bool) -> tuple[Fp8Epilogue, Tensor]:
    """(the epilogue, the float32 multiplier x_scale * w_scales on the device: one value or one per channel).
    With `per_tensor_in_product` a per-tensor multiplier is left to the product (scale_a of torch._scaled_mm)."""
    w = node.inputs[1].const
    n_out = int(w.shape[0])  # type: ignore[union-attr]
    q = QuantSpec.of(node)
    per_channel = len(q.w_scales) > 1
    mult = q.multipliers(n_out).to(device)
    b = node.input(2)
    bias = None if b is None else b.const.to(device=device, dtype=torch.float32)  # type: ignore[union-attr]
    keep = mult if per_channel or not per_tensor_in_product else None
    epi = Fp8Epilogue(keep, bias, q.z_scale, Epilogue.of(node), q)
    return epi, (mult if per_channel else mult[:1].reshape(()))


def fp8_kernel(node: Node, product: Product, epi: Fp8Epilogue) -> Kernel:
    """The layer's kernel: X's rows (a 1x1 conv's pixels, channels innermost) through `product` and `epi`."""
    n_out = int(node.inputs[1].const.shape[0])  # type: ignore[union-attr]
    conv = node.op_type == "QConv"

    def gemm(a: Tensor, _w: Any = None, _b: Any = None, z: Tensor | None = None) -> Tensor:
        _check_float8(a, node)
        lead = a.shape[:-1]
        y = epi(product(a.reshape(-1, a.shape[-1])), None if z is None else z.reshape(-1, n_out))
        return y.view(*lead, n_out)

    def conv1x1(x: Tensor, _w: Any = None, _b: Any = None, z: Tensor | None = None) -> Tensor:
        _check_float8(x, node)
        n, _, h, wd = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(n * h * wd, -1)  # a view when x is channels-last
        zr = None if z is None else z.permute(0, 2, 3, 1).reshape(n * h * wd, n_out)
        return epi(product(rows), zr).view(n, h, wd, n_out).permute(0, 3, 1, 2)

    return Kernel(conv1x1 if conv else gemm, prepacked=frozenset({1, 2}),
                  out_format="channels_last" if conv else "contiguous")


def _check_float8(x: Tensor, node: Node) -> None:
    if x.dtype != torch.float8_e4m3fn:
        raise KilnError(f"'{node.name}' ({node.op_type}) was built for float8_e4m3fn input, got {x.dtype}")
