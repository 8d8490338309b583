"""Depthwise Conv / FusedConv of float32 images in C (``native/dwconv.c``), reading and writing channels-last views.

A depthwise layer (one filter per channel: group = input channels = output channels) does a few multiply-adds
per value it moves, so what it costs is memory traffic and fixed overhead. oneDNN's primitive (cpu.conv_dnnl)
wants dense channels-last tensors: GhostNet's cheap convolution reads the primary convolution's part of an
elided Concat (a channel slice) and writes the other part, and the dense primitive pays a copy on each side.
This kernel addresses input, output and residual by their batch, row and pixel strides (channels innermost),
so a slice is read and written in place (``strided_out``), with the bias, the activation and the residual
add fused; OpenMP threads share the output rows when the layer is large enough to repay waking them.

Two builds compete under the autotuner on an AVX-512 CPU (config ``vec``): 16-float vectors, and 8-float ones
(dwconv256.c), which waste no lanes on a layer of 8 channels. Inputs the kernel was not made for (another
dtype or device, a channel count other than the weight's, no channels-innermost form) run the op's reference.
Declines everything where no C compiler works.
"""
from __future__ import annotations

import ctypes as C
from typing import Any

import torch

from kiln.backends.cpu import native
from kiln.backends.cpu.common import CpuTactic, act_attrs, float_conv_weight
from kiln.backends.cpu.conv import conv_geometry
from kiln.backends.cpu.features import cpu_flags
from kiln.backends.strides import channels_innermost
from kiln.backends.tactic import Built, Kernel, register_tactic
from kiln.errors import KilnError
from kiln.ir.graph import Node
from kiln.ops.activations import TABLE
from kiln.ops.registry import lookup

Tensor = torch.Tensor
_P, _L, _F, _I = C.c_void_p, C.c_long, C.c_float, C.c_int
ACTIVATIONS = ("", "Relu", "LeakyRelu", "Clip", "Sigmoid", "SiLU", "HardSwish", "HardSigmoid", "Mish", "Gelu",
               "GeluTanh")
"""The fused activations dwconv.c computes (by their kiln.ops.activations codes)."""
PARALLEL_MIN = 32_768
"""Layers of fewer multiply-adds (N * OH * OW * C * KH * KW) run on one thread: below this a second thread
saves a microsecond or two and waking it can cost more (cf. kiln.backends.cpu.se.PARALLEL_MIN)."""


class _Params(C.Structure):
    """struct kiln_dw of native/dwconv.c."""

    _fields_ = [("w", _P), ("b", _P)] + [(n, _L) for n in ("C", "Cp", "KH", "KW", "sh", "sw", "dh", "dw", "ph",
                                                           "pw")] + \
        [("act", _I), ("act_first", _I), ("alpha", _F), ("beta", _F)]


class _Call(C.Structure):
    """struct kiln_dw_call of native/dwconv.c: one call's arguments (a bound call's packed once)."""

    _fields_ = [("p", _P), ("x", _P)] + [(n, _L) for n in ("N", "H", "W", "sxn", "sxh", "sxw")] + [("y", _P)] + \
        [(n, _L) for n in ("OH", "OW", "syn", "syh", "syw")] + [("z", _P)] + \
        [(n, _L) for n in ("szn", "szh", "szw")] + [("threads", _I)]


def _library(vec: int) -> Any:
    name = "dwconv256" if vec == 256 else "dwconv"
    lib = native.load(name)
    if lib is not None and not hasattr(lib, "_kiln_typed"):
        lib.kiln_dwconv_f32_call.argtypes = [_P]
        lib.kiln_dwconv_f32_call.restype = C.c_int
        lib._kiln_typed = True
    return lib


def _depthwise_weight(node: Node) -> Tensor | None:
    """The float32 weight [C, 1, KH, KW] of a 2-D depthwise layer whose activation dwconv.c computes, else None."""
    w = float_conv_weight(node, ACTIVATIONS)
    if w is None or int(w.shape[1]) != 1:
        return None
    group = node.attr("group", 1)
    c_in = node.inputs[0].type.shape[1]  # type: ignore[index,union-attr]
    if group != int(w.shape[0]) or (isinstance(c_in, int) and c_in != group):
        return None
    return w


def _check_out(out: Any, shape: tuple[int, ...]) -> None:
    """A destination must be a float32 CPU tensor of the layer's output shape (any strides)."""
    if out is not None and (not isinstance(out, Tensor) or out.dtype != torch.float32 or not out.is_cpu
                            or tuple(out.shape) != shape):
        got = f"{out.dtype} {list(out.shape)}" if isinstance(out, Tensor) else type(out).__name__
        raise KilnError(f"a depthwise convolution writes a float32 {list(shape)} destination, got {got}")


class CpuDepthwiseConvTactic(CpuTactic):
    """Depthwise 2-D float32 Conv / FusedConv on channels-last views, epilogue fused (see module doc)."""

    id = "cpu.dwconv_c"
    priority = 11
    writes_out = 1
    strided_out = True  # any channels-innermost view: a channel slice of an elided Concat's buffer
    ops = (("", "Conv"), ("ai.onnx", "Conv"), ("kiln", "FusedConv"))

    def accepts(self, node: Node) -> bool:
        # the geometry (SAME pads too) is resolved per input shape
        return _depthwise_weight(node) is not None and _library(512) is not None

    def configs(self, node: Node, ctx: Any) -> list[dict[str, Any]]:
        if "avx512f" in cpu_flags() and _library(256) is not None:
            return [{"vec": 512}, {"vec": 256}]
        return [{"vec": 512}]  # the widest vectors the CPU has (the name is the build, not the width)

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        lib = _library(int(config.get("vec", 512)))
        if lib is None:
            raise KilnError(f"{self.id}: no C compiler builds its kernel here ({native.error('dwconv')})")
        w = _depthwise_weight(node)
        assert w is not None, f"{self.id} does not support node {node.name}"
        c, kh, kw = int(w.shape[0]), int(w.shape[2]), int(w.shape[3])
        cp = -(-c // 16) * 16
        taps = w.new_zeros((kh * kw, cp))
        taps[:, :c] = w.reshape(c, kh * kw).t()
        b_v = node.input(2)
        bias = w.new_zeros(cp)
        if b_v is not None:
            bias[:c] = b_v.const.float()  # type: ignore[union-attr]
        act, alpha, beta = act_attrs(node) if node.op_type == "FusedConv" else ("", 0.0, 0.0)
        act_first = node.op_type == "FusedConv" and bool(int(node.attr("act_before_add", 0) or 0))
        reference = lookup(node.op_type, node.domain).compute
        consts = [None if v is None else v.const for v in node.inputs]
        f32, call = torch.float32, lib.kiln_dwconv_f32_call
        made: dict[tuple[int, int], tuple[Any, int, int]] = {}  # input (H, W) -> (params, OH, OW)

        def geometry(h: int, wd: int) -> tuple[Any, int, int]:
            got = made.get((h, wd))
            if got is None:
                geo = conv_geometry(node, [kh, kw], [h, wd])
                (sh, sw), (dh, dw) = geo.strides, geo.dilations
                oh = (h + geo.pads[0] + geo.pads[2] - dh * (kh - 1) - 1) // sh + 1
                ow = (wd + geo.pads[1] + geo.pads[3] - dw * (kw - 1) - 1) // sw + 1
                p = _Params(taps.data_ptr(), bias.data_ptr(), c, cp, kh, kw, sh, sw, dh, dw, geo.pads[0],
                            geo.pads[1], TABLE[act].code, int(act_first), float(alpha), float(beta))
                got = made[(h, wd)] = (p, oh, ow)
            return got

        def plan(x: Any, z: Any, out: Any) -> tuple[_Call, Tensor, Tensor | None] | None:
            """(the C call's packed arguments, the output it writes, a destination to copy that output to) or None
            where the reference must run."""
            if isinstance(x, Tensor) and x.dim() == 4 and x.shape[1] != c:
                raise KilnError(f"'{node.name}': the input has {x.shape[1]} channels, the depthwise weights {c}")
            if not isinstance(x, Tensor) or x.dtype != f32 or not x.is_cpu or x.dim() != 4 \
                    or not channels_innermost(x) or min(x.shape[2:]) < 1:
                return None
            n, _, h, wd = x.shape
            p, oh, ow = geometry(int(h), int(wd))
            if oh < 1 or ow < 1:
                return None
            shape = (int(n), c, oh, ow)
            _check_out(out, shape)
            if z is not None and (not isinstance(z, Tensor) or z.dtype != f32 or tuple(z.shape) != shape
                                  or not channels_innermost(z)):
                return None
            direct = out is not None and channels_innermost(out)  # _check_out: a float32 tensor of this shape
            y = out if direct else torch.empty(shape, dtype=f32, memory_format=torch.channels_last)
            zs = (None, 0, 0, 0) if z is None else (z.data_ptr(), z.stride(0), z.stride(2), z.stride(3))
            threads = torch.get_num_threads() if int(n) * oh * ow * c * kh * kw >= PARALLEL_MIN else 1
            packed = _Call(C.addressof(p), x.data_ptr(), int(n), int(h), int(wd), x.stride(0), x.stride(2),
                           x.stride(3), y.data_ptr(), oh, ow, y.stride(0), y.stride(2), y.stride(3), *zs, threads)
            return packed, y, (None if direct else out)

        def run(packed: _Call) -> None:
            if call(C.addressof(packed)) != 0:
                raise KilnError(f"'{node.name}': the depthwise kernel refused its arguments")

        def k_dwconv(x: Tensor, _w: Any = None, _b: Any = None, z: Tensor | None = None,
                     out: Tensor | None = None) -> Tensor:
            planned = plan(x, z, out)
            if planned is None:
                y = reference(node, x, consts[1], consts[2], *([] if z is None else [z]))
                if out is None:
                    return y
                _check_out(out, tuple(y.shape))
                out.copy_(y)
                return out
            packed, y, copy_to = planned
            run(packed)
            if copy_to is not None:
                copy_to.copy_(y)
                return copy_to
            return y

        def bind(args: Any, out: Any) -> Any:
            x, z = args[0], (args[3] if len(args) > 3 else None)
            planned = plan(x, z, out)
            if planned is None or planned[2] is not None or out is None:
                return None  # the reference ran, or the result was copied into out
            packed, y, _ = planned

            def bound() -> Tensor:
                run(packed)
                return y
            bound.kept = (x, z, y, made, taps, bias, packed)  # type: ignore[attr-defined]  # what pointers point into
            return bound
        return Kernel(k_dwconv, writes_out=1, strided_out=True, prepacked=frozenset({1, 2}), bind=bind)


register_tactic(CpuDepthwiseConvTactic())
