"""1x1 stride-1 convolutions as one oneDNN matmul over the pixels, storing into any channel slice.

A channels-last [N, C, H, W] tensor whose pixels are evenly spaced is a [N*H*W, C] matrix with row
stride = its pixel stride; so is a channel slice of a Concat's output. The layer is that matrix times
the [C, K] weights (reordered once), with bias, residual add and activation as post-ops, written into
the destination matrix, whatever its row stride (oneDNN's GEMM kernel takes leading dimensions). With
``strided_out`` it is the 1x1 producer through which a Concat is elided on the CPU; with two
destinations (a value feeding two Concats) the second receives a copy of the first.

A matmul is made per (input, destination, residual) shapes and strides, after checking the input's channels
against the weights and the residual's shape against the output; `Primitive.run` refuses tensors that
are not float32.
"""
from __future__ import annotations

from typing import Any

import torch

from kiln.backends.cpu.common import CpuTactic, act_attrs, float_conv_weight
from kiln.backends.cpu.dnnl import FLOAT32, DnnlError, library, released, require_library
from kiln.backends.cpu.dnnl_epilogue import ELTWISE
from kiln.backends.cpu.dnnl_float import MatMul
from kiln.backends.cpu.dnnl_primitive import ChannelsLast
from kiln.backends.cpu.fallback import ReferenceFallback
from kiln.backends.tactic import Built, Kernel, register_tactic
from kiln.errors import KilnError
from kiln.ir.graph import Node

Tensor = torch.Tensor


def pixel_rows(t: Tensor) -> int | None:
    """The row stride of `t` [N, C, H, W] seen as a [N*H*W, C] matrix (contiguous channels, evenly spaced
    pixels), or None."""
    sn, sc, sh, sw = t.stride()
    n, _, h, w = t.shape
    if sc != 1 or (h > 1 and sh != w * sw) or (n > 1 and sn != h * w * sw):
        return None
    return sw


class MatMulConvTactic(CpuTactic):
    """Conv / FusedConv with a 1x1 kernel, stride 1, no pads or groups, float32, as one oneDNN matmul."""

    id = "cpu.conv_matmul"
    priority = 8  # below the direct oneDNN convolution: chosen by timing or to elide a Concat
    writes_out = 2
    ops = (("", "Conv"), ("ai.onnx", "Conv"), ("kiln", "FusedConv"))

    def accepts(self, node: Node) -> bool:
        wt = float_conv_weight(node, ("", *ELTWISE))
        if library() is None or wt is None or tuple(wt.shape[2:]) != (1, 1) or int(node.attr("group", 1)) != 1:
            return False
        if any(int(s) != 1 for s in node.attr("strides", None) or [1, 1]) or any(
                int(p) for p in node.attr("pads", None) or [0] * 4):
            return False
        return (node.attr("auto_pad", "NOTSET") or "NOTSET") in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER")

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        lib = require_library(node, self.id)
        w = node.inputs[1].const.float()  # type: ignore[union-attr]
        k_out = int(w.shape[0])
        wm = w.reshape(k_out, -1).t().contiguous()  # [C, K]
        b_v = node.input(2)
        bias = None if b_v is None else b_v.const.float().contiguous()  # type: ignore[union-attr]
        fused = node.op_type == "FusedConv"
        act, alpha, beta = act_attrs(node) if fused else ("", 0.0, 0.0)
        act_first = fused and bool(int(node.attr("act_before_add", 0) or 0))
        x_cl, z_cl = ChannelsLast(lib), ChannelsLast(lib)
        c_in = int(w.shape[1])
        # per (input, destination, residual) shapes and strides: (primitive, output shape, reorder x, reorder z,
        # the dense destination it writes before the copy into the given one, if any)
        prims: dict[tuple[Any, ...], tuple[MatMul, tuple[int, ...], bool, bool, Tensor | None]] = {}
        fb = ReferenceFallback(node)

        closed: list[bool] = []

        def make(x: Tensor, y: Tensor | None, z: Tensor | None) -> tuple[MatMul, tuple[int, ...], bool, bool,
                                                                        Tensor | None]:
            if closed:
                raise released(node.name)
            if any(t is not None and t.dtype is not FLOAT32 for t in (x, y, z)):
                raise KilnError(f"'{node.name}' takes float32 tensors, got "
                                f"{', '.join(str(t.dtype) for t in (x, y, z) if t is not None)}")
            n, c, h, wd = (int(s) for s in x.shape)
            shape, pixels = (n, k_out, h, wd), n * h * wd
            if c != c_in:
                raise KilnError(f"'{node.name}' has weights for {c_in} input channels, got an input of shape "
                                f"{list(x.shape)}")
            if z is not None and tuple(z.shape) != shape:
                raise KilnError(f"'{node.name}' adds a residual of shape {list(shape)}, got {list(z.shape)}")
            if y is None:
                y = torch.empty(shape, memory_format=torch.channels_last)
            ldx, ldy, ldz = pixel_rows(x), pixel_rows(y), None if z is None else pixel_rows(z)
            if tuple(y.shape) != shape or ldy is None:
                raise KilnError(f"'{node.name}' takes a destination of shape {list(shape)} with contiguous channels "
                                f"and evenly spaced pixels, got {list(y.shape)} with strides {list(y.stride())}")
            def matmul(ldx: int | None, ldz: int | None, ldy: int | None) -> MatMul:
                """The matmul over these row strides (None: a dense copy made at each call)."""
                xm = x.as_strided((pixels, c_in), (ldx, 1)) if ldx else torch.empty(pixels, c_in)
                zm = None if z is None else z.as_strided((pixels, k_out), (ldz, 1)) if ldz else \
                    torch.empty(pixels, k_out)
                ym = y.as_strided((pixels, k_out), (ldy, 1)) if ldy else torch.empty(pixels, k_out)
                return MatMul(lib, xm, wm, ym, bias, zm, act, alpha, beta, act_first)
            try:
                prim, y_tmp = matmul(ldx, ldz, ldy), None
            except DnnlError:
                if ldx in (None, c_in) and ldz in (None, k_out) and ldy == k_out:
                    raise
                # oneDNN's fast matmul kernels take some leading dimensions only (its binary post-op refuses a
                # residual whose row stride differs from the destination's): dense operands, copied at each call;
                # x kept as it is where that suffices
                try:
                    prim = matmul(ldx, None, None)
                except DnnlError:
                    ldx = None
                    prim = matmul(None, None, None)
                ldz, y_tmp = None, torch.empty(shape, memory_format=torch.channels_last)
            return prim, shape, ldx is None, z is not None and ldz is None, y_tmp

        def k_mm(x: Tensor, _w: Any = None, _b: Any = None, z: Tensor | None = None,
                 out: Tensor | tuple[Tensor, ...] | None = None) -> Tensor:
            outs = out if isinstance(out, tuple) else (out,) if out is not None else ()
            y = outs[0] if outs else None
            key = (x.shape, x.stride(), None if y is None else (y.shape, y.stride()),
                   None if z is None else (z.shape, z.stride()))
            entry = prims.get(key)
            if entry is None:
                entry = fb.attempt(key, lambda: make(x, y, z), f"1x1 matmul at input shape {list(x.shape)}")
                if entry is None:
                    return fb(key, (x, None, None, z), out)
                prims[key] = entry
            prim, shape, reorder_x, reorder_z, y_tmp = entry
            if reorder_x:
                x = x_cl(x)
            if y is None:
                y = torch.empty(shape, memory_format=torch.channels_last)
            dst = y if y_tmp is None else y_tmp
            if z is None:
                prim.run(x, dst)
            else:
                prim.run(x, dst, z_cl(z) if reorder_z else z)  # the matmul reads the tensors' own addresses
            if y_tmp is not None:
                y.copy_(y_tmp)
            for extra in outs[1:]:
                extra.copy_(y)
            return y

        def bind(args: Any, out: Any) -> Any:
            x, z = args[0], (args[3] if len(args) > 3 else None)
            outs = out if isinstance(out, tuple) else (out,)
            y = outs[0]
            if not isinstance(y, Tensor) or not isinstance(x, Tensor):
                return None
            entry = prims.get((x.shape, x.stride(), (y.shape, y.stride()), None if z is None else (z.shape, z.stride())))
            if entry is None or entry[2] or entry[3] or entry[4] is not None:  # a fallback ran, or a copy is made
                return None
            call = entry[0].bind(x, y) if z is None else entry[0].bind(x, y, z)
            extra = outs[1:]

            def bound() -> Tensor:
                call()
                for e in extra:  # a value feeding two Concats: the second receives a copy
                    e.copy_(y)
                return y
            return bound

        def release() -> None:
            closed.append(True)
            entries = list(prims.values())
            prims.clear()
            for prim, *_ in entries:
                prim.close()
            x_cl.close()
            z_cl.close()
        return Kernel(k_mm, prepacked=frozenset({1, 2}), fallback=fb, release=release,  # W, B live in the kernel
                      bind=bind)


register_tactic(MatMulConvTactic())
