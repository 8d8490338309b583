"""Conv / FusedConv on oneDNN's own primitives (kiln.backends.cpu.dnnl): one primitive per input shape.

Competes with ``cpu.conv_onednn`` (torch's oneDNN ops) under the autotuner. The kernel keeps, per input
shape and strides, a convolution primitive with the weights already in its layout, the bias, and the
residual add and activation as post-ops in the node's order; an inference allocates the channels-last
output and executes the primitive. Asymmetric pads, groups and dilations are oneDNN's own.
Declines every layer when the oneDNN library is not installed.
"""
from __future__ import annotations

from typing import Any

import torch

from kiln.backends.cpu.common import CpuTactic, act_attrs, const_f32, is_f32
from kiln.backends.cpu.dnnl import ELTWISE, Convolution, library
from kiln.backends.tactic import Kernel, register_tactic
from kiln.errors import KilnError, PlanFormatError
from kiln.ir.graph import Node
from kiln.ops.conv import same_pads

Tensor = torch.Tensor


def _pads(node: Node, kernel: list[int], sizes: list[int], strides: list[int], dilations: list[int]
          ) -> tuple[list[int], list[int]]:
    mode = node.attr("auto_pad", "NOTSET") or "NOTSET"
    if mode in ("SAME_UPPER", "SAME_LOWER"):
        pads = same_pads(mode, sizes, kernel, strides, dilations)
    elif mode == "VALID":
        pads = [0, 0, 0, 0]
    else:
        pads = [int(p) for p in node.attr("pads", None) or [0, 0, 0, 0]]
    return pads[:2], pads[2:]


class DnnlConvTactic(CpuTactic):
    """2-D float32 Conv / FusedConv as a cached oneDNN primitive (see module doc)."""

    id = "cpu.conv_dnnl"
    priority = 12
    writes_out = 1  # into an arena slot of its own layout (a strided Concat slice gets oneDNN's slow paths)
    strided_out = False
    ops = (("", "Conv"), ("ai.onnx", "Conv"), ("kiln", "FusedConv"))

    def accepts(self, node: Node) -> bool:
        if library() is None:
            return False
        x, w, b = node.input(0), node.input(1), node.input(2)
        wt = const_f32(w)
        if not is_f32(x) or x.type.rank != 4 or wt is None or wt.dim() != 4:  # type: ignore[union-attr]
            return False
        if (b is not None and const_f32(b) is None) or len(node.outputs) != 1 or not is_f32(node.outputs[0]):
            return False
        fused = node.op_type == "FusedConv"
        if fused and (act_attrs(node)[0] not in ("", *ELTWISE) or (node.input(3) is not None
                                                                  and not is_f32(node.input(3)))):
            return False
        mode = node.attr("auto_pad", "NOTSET") or "NOTSET"
        return mode in ("NOTSET", "VALID") or x.type.is_static  # type: ignore[union-attr]

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Kernel:
        lib = library()
        if lib is None:
            raise PlanFormatError(f"layer '{node.name}' uses tactic {self.id}, which needs the oneDNN library "
                                  f"(pip install onednn-cpu-gomp); rebuild the plan without it or install it")
        w = node.inputs[1].const.float().contiguous()  # type: ignore[union-attr]
        b_v = node.input(2)
        b = None if b_v is None else b_v.const.float().contiguous()  # type: ignore[union-attr]
        kernel = [int(k) for k in w.shape[2:]]
        strides = [int(s) for s in node.attr("strides", None) or [1, 1]]
        dilations = [int(d) for d in node.attr("dilations", None) or [1, 1]]
        groups = int(node.attr("group", 1))
        fused = node.op_type == "FusedConv"
        act, alpha, beta = act_attrs(node) if fused else ("", 0.0, 0.0)
        act_first = fused and bool(int(node.attr("act_before_add", 0) or 0))
        k_out = int(w.shape[0])
        cache: dict[tuple[Any, ...], Convolution] = {}

        def k_conv(x: Tensor, _w: Any = None, _b: Any = None, z: Tensor | None = None,
                   out: Tensor | None = None) -> Tensor:
            n, _, h, wd = x.shape
            pad_l, pad_r = _pads(node, kernel, [h, wd], strides, dilations)
            oh = (h + pad_l[0] + pad_r[0] - dilations[0] * (kernel[0] - 1) - 1) // strides[0] + 1
            ow = (wd + pad_l[1] + pad_r[1] - dilations[1] * (kernel[1] - 1) - 1) // strides[1] + 1
            shape = (n, k_out, oh, ow)
            if out is not None and (tuple(out.shape) != shape
                                    or not out.is_contiguous(memory_format=torch.channels_last)):
                raise KilnError(f"'{node.name}' takes a channels-last destination of shape {list(shape)}, "
                                f"got {list(out.shape)} with strides {list(out.stride())}")
            y = out if out is not None else torch.empty(shape, memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)  # the layout the primitive was tuned for
            if z is not None:
                z = z.contiguous(memory_format=torch.channels_last)
            key = (tuple(x.shape), x.stride(), None if z is None else (tuple(z.shape), z.stride()))
            prim = cache.get(key)
            if prim is None:
                prim = cache[key] = Convolution(lib, x, w, b, y, z, strides, dilations, pad_l, pad_r, groups,
                                                act, alpha, beta, act_first)
            prim.run(x, y) if z is None else prim.run(x, y, z)
            return y
        k_conv.prepacked = frozenset({1, 2})  # type: ignore[attr-defined]  # W, B live inside the kernel
        return k_conv


register_tactic(DnnlConvTactic())
