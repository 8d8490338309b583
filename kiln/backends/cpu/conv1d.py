"""1-D Conv / FusedConv (input [N, C, L]) on oneDNN's own 2-D convolution primitive over a [N, C, 1, L] view.

The weight [K, C/group, k] runs as [K, C/group, 1, k] with strides, dilations and pads (1, s), (1, d),
(0, begin) / (0, end), so any stride, dilation, padding and group count (depthwise included) is oneDNN's
own, with the bias, residual add and activation as post-ops in the node's order, exactly as
``cpu.conv_dnnl`` does for images (one primitive per input shape and strides, weights reordered once).
The view is channels-last ([N, L, C] in memory, oneDNN's brgconv): an input in another layout is
reordered per call into a reused buffer, and the output is returned as the [N, K, L'] view of a
channels-last buffer (strides (L'K, 1, K)), which the next 1-D convolution reads without a copy. Where
oneDNN has only its reference loops for that layout (a single input channel, as in an STFT's conv; a
length-1 output) the primitive reads and writes the plain [N, C, L] layout instead (its gemm
convolution) and the output is dense. The kernel allocates its output (writes_out = 0: an arena slot is
a dense [N, K, L'] tensor). Shapes oneDNN declines in both layouts run the op's reference
implementation, with one warning. bfloat16 layers (a bf16 build) as ``cpu.conv_dnnl``'s.
"""
from __future__ import annotations

from typing import Any

import torch

from kiln.backends.cpu.common import CpuTactic, act_attrs, float_conv_weight, layer_dtypes
from kiln.backends.cpu.conv import conv_geometry
from kiln.backends.cpu.dnnl import DnnlError, library, released, require_library
from kiln.backends.cpu.dnnl_epilogue import ELTWISE
from kiln.backends.cpu.dnnl_float import Convolution
from kiln.backends.cpu.dnnl_primitive import ChannelsLast
from kiln.backends.cpu.fallback import ReferenceFallback
from kiln.backends.tactic import Built, Kernel, register_tactic
from kiln.errors import KilnError
from kiln.ir.graph import Node

Tensor = torch.Tensor


def _as_3d(y: Tensor) -> Tensor:
    """A [N, K, 1, L'] result as [N, K, L'] (the reference fallback already gives the 3-D result)."""
    return y.select(2, 0) if y.dim() == 4 else y


class DnnlConv1dTactic(CpuTactic):
    """1-D float32 or bfloat16 Conv / FusedConv as a cached oneDNN 2-D convolution over a [N, C, 1, L] view
    (see module doc)."""

    id = "cpu.conv1d_dnnl"
    priority = 12
    ops = (("", "Conv"), ("ai.onnx", "Conv"), ("kiln", "FusedConv"))

    def accepts(self, node: Node) -> bool:
        # the geometry (SAME pads too) is resolved per input shape
        return library() is not None and float_conv_weight(node, ("", *ELTWISE), rank=3, bf16=True) is not None

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        lib = require_library(node, self.id)
        w3 = node.inputs[1].const.float().contiguous()  # type: ignore[union-attr]
        if w3.dim() != 3:
            raise KilnError(f"'{node.name}': {self.id} takes a 3-D weight, got {list(w3.shape)}")
        w = w3.unsqueeze(2)  # [K, C/group, 1, k]
        b_v = node.input(2)
        b = None if b_v is None else b_v.const.float().contiguous()  # type: ignore[union-attr]
        if b is not None and (b.dim() != 1 or b.numel() != int(w.shape[0])):
            raise KilnError(f"'{node.name}': the bias has shape {list(b.shape)}, expected [{int(w.shape[0])}]")
        k_len = int(w3.shape[2])
        fused = node.op_type == "FusedConv"
        act, alpha, beta = act_attrs(node) if fused else ("", 0.0, 0.0)
        act_first = fused and bool(int(node.attr("act_before_add", 0) or 0))
        k_out = int(w.shape[0])
        x_dt, y_dt, z_dt = layer_dtypes(node, 3)

        def make(x: Tensor, z: Tensor | None, plain: bool) -> tuple[Convolution, tuple[int, ...]]:
            geo = conv_geometry(node, [k_len], [int(x.shape[3])])
            (s,), (d,), (lo,), (hi,) = geo.strides, geo.dilations, geo.begin, geo.end
            n = int(x.shape[3])
            shape = (int(x.shape[0]), k_out, 1, (n + lo + hi - d * (k_len - 1) - 1) // s + 1)
            if shape[3] < 1:
                raise ValueError(f"input length {n} is shorter than the window")
            if z is not None and tuple(z.shape) != shape:
                raise KilnError(f"'{node.name}' adds a residual of shape {[shape[0], shape[1], shape[3]]}, "
                                f"got {list(z.shape[:2]) + list(z.shape[3:])}")
            y0 = torch.empty(shape, dtype=y_dt, memory_format=torch.contiguous_format if plain else torch.channels_last)
            return Convolution(lib, x, w, b, y0, z, (1, s), (1, d), (0, lo), (0, hi), geo.group,
                               act, alpha, beta, act_first), shape
        fb = ReferenceFallback(node)
        x_cl, z_cl = ChannelsLast(lib, (x_dt,)), ChannelsLast(lib, (z_dt,))
        cache: dict[tuple[Any, ...], tuple[Convolution, tuple[int, ...], bool]] = {}
        closed: list[bool] = []

        def views(x: Tensor, z: Tensor | None, plain: bool) -> tuple[Tensor, Tensor | None]:
            """x and z as the [N, C, 1, L] tensors a primitive of this layout reads."""
            if plain:
                return x.contiguous().unsqueeze(2), None if z is None else z.contiguous().unsqueeze(2)
            return x_cl(x.unsqueeze(2)), None if z is None else z_cl(z.unsqueeze(2))

        def make_either(x: Tensor, z: Tensor | None) -> tuple[Convolution, tuple[int, ...], bool]:
            try:  # channels-last (brgconv); where oneDNN has only its reference loops for it (one input
                # channel, a length-1 output), the plain layout's gemm convolution
                return (*make(*views(x, z, False), False), False)
            except DnnlError:
                return (*make(*views(x, z, True), True), True)

        def k_conv1d(x: Tensor, _w: Any = None, _b: Any = None, z: Tensor | None = None) -> Tensor:
            if x.dim() != 3 or (z is not None and z.dim() != 3):
                raise KilnError(f"'{node.name}' takes a 3-D input [N, C, L], got {list(x.shape)}")
            key = (x.shape, x.stride(), None if z is None else (z.shape, z.stride()))
            entry = cache.get(key)
            if entry is None:
                if closed:
                    raise released(node.name)
                if x.dtype is not x_dt or (z is not None and z.dtype is not z_dt):
                    raise KilnError(f"'{node.name}' takes {x_dt} tensors, got {x.dtype}")
                entry = fb.attempt(key, lambda: make_either(x, z), f"input shape {list(x.shape)}")
                if entry is None:
                    return fb(key, (x, None, None, z), None)
                cache[key] = entry
            prim, shape, plain = entry
            x4, z4 = views(x, z, plain)
            if plain:
                y = torch.empty((shape[0], shape[1], shape[3]), dtype=y_dt)
                y4 = y.unsqueeze(2)
            else:
                y = y4 = torch.empty(shape, dtype=y_dt, memory_format=torch.channels_last)
            prim.run(x4, y4) if z4 is None else prim.run(x4, y4, z4)
            return _as_3d(y)

        def release() -> None:
            closed.append(True)
            prims = [p for p, _, _ in cache.values()]
            cache.clear()
            for p in prims:
                p.close()
            x_cl.close()
            z_cl.close()
        return Kernel(k_conv1d, prepacked=frozenset({1, 2}), fallback=fb, release=release)  # W, B live in the kernel


register_tactic(DnnlConv1dTactic())
