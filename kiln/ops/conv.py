"""Convolutions: Conv, ConvTranspose and DeformConv over 1-D/2-D/3-D (DeformConv: any rank).

Also the window geometry shared with the pooling ops (kiln.ops.pool): strides, dilations and
begin/end pads from `auto_pad` or `pads`; and `ConvGeometry`, a conv node's resolved geometry, the one
the graph passes and the backends share. torch's convolutions take one symmetric padding per
dim, so asymmetric pads are applied explicitly with F.pad first.
"""
from __future__ import annotations

import itertools
import math
import operator
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from kiln.errors import ShapeError, UnsupportedDTypeError, UnsupportedOpError
from kiln.ir.graph import Node
from kiln.ir.types import Dim, TensorType
from kiln.ops.attrs import Attr
from kiln.ops.registry import OpDef, register

Tensor = torch.Tensor

_CONV: dict[int, Callable[..., Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T: dict[int, Callable[..., Tensor]] = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_AUTO_PADS = ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")

INT32_MAX = 2**31 - 1
"""Declared upper bound of every window size (kernel, stride, dilation, pad): the backends' kernels index
with int32, so a larger value can never describe a window they compute."""

_PROBE = 1 << 21  # a spatial size every window fits in (MAX_WINDOW is 2**20): meta tensors only
_BATCH_PROBE = 3  # a batch standing in for a symbolic one (window ops keep the batch: meta tensors only)
MAX_WINDOW = 1 << 20
"""Largest kernel size, stride, dilation or pad (per spatial dim, after auto_pad) a window op computes with.
Far above any real window (a 1-D pool of 2**20 taps spans a minute of 16 kHz audio), yet small enough that
a loop over a window's taps ends within a second, and that products of two such sizes (a dilated extent,
an output offset) stay far inside int64. A node beyond it is refused with one line instead of running for
hours or allocating a padded input of absurd size."""

WINDOW: dict[str, Attr] = {
    "auto_pad": Attr("str", "NOTSET", choices=("", *_AUTO_PADS)),
    "strides": Attr("ints", None, min=1, max=INT32_MAX), "dilations": Attr("ints", None, min=1, max=INT32_MAX),
    "pads": Attr("ints", None, min=0, max=INT32_MAX), "kernel_shape": Attr("ints", None, min=1, max=INT32_MAX),
}
"""What Kiln's window ops (convolutions, pooling) honour of ONNX's geometry attributes: positive strides,
dilations and kernel sizes, non-negative pads, all within int32; the four auto_pad modes. Each op's `check`
(`check_window_attrs`) and, when it runs, `window_ints` further bound each by MAX_WINDOW and require one
value per spatial dim (two pads)."""


# ---- window geometry (shared with kiln.ops.pool) --------------------------------------------------

def require_float(node: Node, *xs: Tensor | None) -> None:
    """Raise UnsupportedDTypeError unless every given tensor has a floating-point dtype."""
    for x in xs:
        if x is not None and not x.dtype.is_floating_point:
            raise UnsupportedDTypeError(f"node '{node.name}': {node.op_type} does not support element type {x.dtype}")


def spatial_rank(node: Node, x: Tensor, ranks: Sequence[int] = (1, 2, 3)) -> int:
    nd = x.dim() - 2
    if nd not in ranks:
        raise UnsupportedOpError(f"node '{node.name}': {node.op_type} on a rank-{x.dim()} input is not supported")
    return nd


def auto_pad_mode(node: Node) -> str:
    mode = node.attr("auto_pad", "NOTSET") or "NOTSET"
    if mode not in _AUTO_PADS:
        raise UnsupportedOpError(f"node '{node.name}': unknown auto_pad '{mode}'")
    return mode


_WINDOW_LOW = {"strides": 1, "dilations": 1, "kernel_shape": 1, "pads": 0, "output_padding": 0}


def check_window_ints(node: Node, name: str, values: Sequence[int], count: int) -> list[int]:
    """`values` of the window attribute `name` as ints: exactly `count` of them, each within
    [low, MAX_WINDOW] (low: 1 for strides, dilations and kernel sizes, 0 for pads); UnsupportedOpError
    naming the node otherwise."""
    vals = list(values)
    if len(vals) != count:
        what = "two per spatial dim" if name == "pads" else "one per spatial dim"
        raise UnsupportedOpError(f"node '{node.name}': {node.op_type} {name} has {len(vals)} values, "
                                 f"expected {count} ({what})")
    low = _WINDOW_LOW.get(name, 0)
    out = []
    for v in vals:
        try:
            v = operator.index(v)
        except TypeError:
            raise UnsupportedOpError(f"node '{node.name}': {node.op_type} {name} must be ints, got {v!r}") from None
        if not low <= v <= MAX_WINDOW:
            raise UnsupportedOpError(f"node '{node.name}': {node.op_type} {name} value {v} is outside "
                                     f"[{low}, {MAX_WINDOW}] (Kiln's bound on window sizes)")
        out.append(v)
    return out


def window_ints(node: Node, name: str, nd: int, default: int) -> list[int]:
    """The window attribute `name` (strides, dilations, kernel_shape: nd values; pads: 2 * nd), `default`
    in every dim when absent or empty; checked by `check_window_ints`."""
    count = 2 * nd if name == "pads" else nd
    v = node.attr(name, None)
    if v is None or (isinstance(v, (list, tuple)) and not v):
        return [default] * count
    if not isinstance(v, (list, tuple)):
        raise UnsupportedOpError(f"node '{node.name}': {node.op_type} {name} must be a list of ints")
    return check_window_ints(node, name, v, count)


_WEIGHT_INPUT = {"Conv": 1, "ConvTranspose": 1, "FusedConvTranspose": 1, "FusedConv": 1, "DeformConv": 1,
                 "ConvInteger": 1, "QLinearConv": 3}


def check_window_attrs(node: Node) -> None:
    """A window op's geometry attributes checked without running it (its OpDef.check, run by the importer
    and the plan loader): kernel_shape, strides, dilations and output_padding give one value per spatial
    dim and pads two, output_shape one per spatial dim (or per dim); each within [low, MAX_WINDOW];
    UnsupportedOpError otherwise. The spatial rank: a constant weight's, else the first of these lists given
    (the input's rank is only checked when the op runs: a plan's types are claims until inference proves them)."""
    nd = None
    w = node.input(_WEIGHT_INPUT[node.op_type]) if node.op_type in _WEIGHT_INPUT else None
    if w is not None and w.const is not None and w.const.dim() >= 3:
        nd = w.const.dim() - 2
    for name in ("kernel_shape", "strides", "dilations", "output_padding", "pads"):
        v = node.attr(name, None)
        if v is None or (isinstance(v, (list, tuple)) and not v):
            continue
        if not isinstance(v, (list, tuple)):
            raise UnsupportedOpError(f"node '{node.name}': {node.op_type} {name} must be a list of ints")
        per = 2 if name == "pads" else 1
        if nd is None:
            if len(v) % per:
                raise UnsupportedOpError(f"node '{node.name}': {node.op_type} pads has {len(v)} values, expected "
                                         "two per spatial dim")
            nd = len(v) // per
        check_window_ints(node, name, v, per * nd)
    out_shape = node.attr("output_shape", None)
    if out_shape and nd is not None and len(out_shape) not in (nd, nd + 2):
        raise UnsupportedOpError(f"node '{node.name}': {node.op_type} output_shape has {len(out_shape)} values, "
                                 f"expected {nd} (one per spatial dim)")


class WindowOp(OpDef):
    """Base of the window ops (convolutions, pools): `check` is `check_window_attrs`."""

    def check(self, node: Node) -> None:
        check_window_attrs(node)

    def infer(self, node: Node, types: Sequence[TensorType | None],
              consts: Sequence[Tensor | None]) -> list[TensorType]:
        """With dynamic spatial dims: batch, channels and element type from a run at a probe size (they
        do not depend on the spatial sizes); each spatial output dim is exactly the input's where the
        stride is 1 and the window and pads cancel (then out = n + const, the const measured at the probe),
        static where an explicit output_shape gives it, and unknown otherwise (a strided window's
        floor((n + pads - extent) / stride) + 1 is never decided from sample sizes)."""
        from kiln.ops.infer import infer_by_meta
        x = types[0] if types else None
        if x is not None and x.shape is not None and len(x.shape) >= 3 and not isinstance(x.shape[0], int):
            return self._batch_probed(node, types, consts, x.shape[0])
        if x is None or x.shape is None or len(x.shape) < 3 or all(isinstance(d, int) for d in x.shape[2:]) \
                or any(c is None and t is not None for t, c in list(zip(types, consts))[1:]):
            return infer_by_meta(self, node, types, consts)  # (a run-time input beside x: FusedConv's residual)
        nd = len(x.shape) - 2
        probe = TensorType(x.dtype, tuple(x.shape[:2]) + (_PROBE,) * nd)
        outs = infer_by_meta(self, node, [probe, *types[1:]], consts)
        strides = window_ints(node, "strides", nd, 1)
        fixed = node.op_type in TRANSPOSED and node.attr("output_shape", None)
        exact = None if fixed else _window_dims(node, types, consts, nd, list(x.shape[2:]))
        result = []
        for o in outs:
            if o.shape is None or len(o.shape) != nd + 2:
                result.append(TensorType(o.dtype, None if o.shape is None else (None,) * len(o.shape)))
                continue
            spatial: list[Dim] = []
            for k, (d, s, n) in enumerate(zip(o.shape[2:], strides, x.shape[2:])):
                if fixed and isinstance(d, int):
                    spatial.append(d)
                elif exact is not None and exact[k] is not None:
                    spatial.append(exact[k])
                elif s == 1 and d == _PROBE:
                    spatial.append(n)
                else:
                    spatial.append(None)
            result.append(TensorType(o.dtype, tuple(o.shape[:2]) + tuple(spatial)))
        return result

    def _batch_probed(self, node: Node, types: Sequence[TensorType | None], consts: Sequence[Tensor | None],
                      batch: Dim) -> list[TensorType]:
        """A window op maps each batch row to an output row: with a symbolic batch, the other dims come from
        inference at a probe batch (every input whose dim 0 is that symbol probed alike) and the outputs keep the
        symbol. (A symbolic run with the batch unknown fails on some geometries, asymmetric pads among them,
        and then knew no dim at all.)"""
        probed = [t if t is None or not t.shape or t.shape[0] != batch else
                  TensorType(t.dtype, (_BATCH_PROBE,) + tuple(t.shape[1:])) for t in types]
        outs = self.infer(node, probed, consts)
        return [o if o.shape is None or not o.shape else
                TensorType(o.dtype, ((batch,) if o.shape[0] == _BATCH_PROBE else (None,)) + tuple(o.shape[1:]))
                for o in outs]


def _window_dims(node: Node, types: Sequence[TensorType | None], consts: Sequence[Tensor | None], nd: int,
                 sizes: list[Dim]) -> list[Dim] | None:
    """Each spatial output dim of a convolution or pool as the definition's exact expression of its input dim:
    floor((n + pads - dilation * (k - 1) - 1) / stride) + 1, or ceil(n / stride) for SAME padding (a derived dim,
    kiln.ir.dims, where n is symbolic); for ConvTranspose stride * (n - 1) + output_padding + extent - pads (n * stride
    for SAME). None where the geometry is not read here: a ConvTranspose's output_shape, ceil_mode with a stride, a
    kernel size not in the attributes or a static weight."""
    import sympy
    from torch.utils._sympy.functions import FloorDiv

    from kiln.ir.dims import DimExpr, sym
    if node.op_type in TRANSPOSED and node.attr("output_shape", None):
        return None
    kernel = node.attr("kernel_shape", None)
    if not kernel:
        w = _WEIGHT_INPUT.get(node.op_type)
        wt = types[w] if w is not None and w < len(types) else None
        if wt is None or wt.shape is None or len(wt.shape) != nd + 2 or not all(isinstance(d, int) for d in wt.shape):
            return None
        kernel = list(wt.shape[2:])
    kernel = check_window_ints(node, "kernel_shape", list(kernel), nd)
    strides, dilations = strides_dilations(node, nd)
    pads = window_ints(node, "pads", nd, 0)
    auto = node.attr("auto_pad", "NOTSET") or "NOTSET"
    ceil = bool(node.attr("ceil_mode", 0))
    out: list[Dim] = []
    for i, n in enumerate(sizes):
        if n is None:
            out.append(None)
            continue
        e = sympy.Integer(n) if isinstance(n, int) else n.expr if isinstance(n, DimExpr) else sym(n)  # type: ignore
        s, extent = strides[i], dilations[i] * (kernel[i] - 1) + 1
        if node.op_type in TRANSPOSED:  # conv_transpose_geometry's output size, as an expression of n
            if auto in ("SAME_UPPER", "SAME_LOWER"):
                out.append(DimExpr.make(e * s))
                continue
            cut = 0 if auto == "VALID" else pads[i] + pads[i + nd]
            out.append(DimExpr.make(s * (e - 1) + window_ints(node, "output_padding", nd, 0)[i] + extent - cut))
            continue
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            out.append(DimExpr.make(FloorDiv(e + s - 1, s)))
            continue
        if ceil and s != 1:
            out.append(None)
            continue
        span = e - extent + (0 if auto == "VALID" else pads[i] + pads[i + nd])
        out.append(DimExpr.make(FloorDiv(span, s) + 1))
    return out


def strides_dilations(node: Node, nd: int) -> tuple[list[int], list[int]]:
    """strides and dilations, one per spatial dim (default 1), each within [1, MAX_WINDOW]."""
    return window_ints(node, "strides", nd, 1), window_ints(node, "dilations", nd, 1)


def same_pads(mode: str, sizes: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
              dilations: Sequence[int]) -> list[int]:
    """Begin pads then end pads for auto_pad SAME_UPPER/SAME_LOWER (output size ceil(in / stride))."""
    begin, end = [], []
    for n, k, s, d in zip(sizes, kernel, strides, dilations):
        out = -(-n // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - n)
        small, big = total // 2, total - total // 2
        begin.append(small if mode == "SAME_UPPER" else big)
        end.append(big if mode == "SAME_UPPER" else small)
    return begin + end


def window_pads(node: Node, sizes: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
                dilations: Sequence[int]) -> list[int]:
    """Begin pads then end pads of a sliding-window op, from auto_pad or the pads attribute."""
    nd = len(sizes)
    mode = auto_pad_mode(node)
    if mode in ("SAME_UPPER", "SAME_LOWER"):
        # what SAME resolves to is bounded too (a huge kernel or dilation asks for a huge padding)
        return check_window_ints(node, "pads", same_pads(mode, sizes, kernel, strides, dilations), 2 * nd)
    if mode == "VALID":
        return [0] * (2 * nd)
    return window_ints(node, "pads", nd, 0)


def torch_pad(begin: Sequence[int], end: Sequence[int]) -> list[int]:
    """F.pad argument (last dim first) from per-dim begin and end pads."""
    out: list[int] = []
    for b, e in zip(reversed(list(begin)), reversed(list(end))):
        out += [b, e]
    return out


def kernel_shape(node: Node, w: Tensor) -> list[int]:
    ks = [int(k) for k in w.shape[2:]]
    attr = node.attr("kernel_shape", None)
    if attr is not None and list(attr) != ks:
        raise UnsupportedOpError(f"node '{node.name}': kernel_shape {list(attr)} disagrees with weight shape {ks}")
    return ks


@dataclass(frozen=True)
class ConvGeometry:
    """A convolution's window with auto_pad resolved, per spatial dim: strides, begin then end pads (ONNX
    order: all begins, then all ends), dilations, kernel sizes; and the group count.

    The one conv geometry of the graph passes (kiln.passes.conv_fusion writes it as FusedConv's attributes)
    and the backends. Libraries that take one symmetric padding per dim use `symmetric_pads` and apply
    `extra_pad` to the input first."""

    strides: tuple[int, ...]
    pads: tuple[int, ...]
    dilations: tuple[int, ...]
    group: int
    kernel: tuple[int, ...]

    @classmethod
    def of(cls, node: Node, sizes: Sequence[int] | None = None,
           kernel: Sequence[int] | None = None) -> "ConvGeometry | None":
        """The geometry of a Conv / FusedConv. `kernel`: the kernel sizes (default: those of the constant
        weight, input 1); `sizes`: the input's spatial sizes (default: its static shape), needed only by
        auto_pad SAME_UPPER/SAME_LOWER with a stride above 1. None where it cannot be known: no constant weight,
        strided SAME without sizes, an unknown auto_pad, attribute lengths or an input rank that disagree with the kernel's, a
        kernel_shape that disagrees with the weight, negative pads."""
        if kernel is None:
            w = node.input(1)
            if w is None or w.const is None:
                return None
            kernel = w.const.shape[2:]
        ks = tuple(int(k) for k in kernel)
        nd = len(ks)
        x = node.input(0)
        if not 1 <= nd <= 3 or x is None or (x.type.rank is not None and x.type.rank != nd + 2):
            return None
        strides = tuple(int(s) for s in node.attr("strides", None) or [1] * nd)
        dilations = tuple(int(d) for d in node.attr("dilations", None) or [1] * nd)
        mode = node.attr("auto_pad", "NOTSET") or "NOTSET"
        if mode in ("SAME_UPPER", "SAME_LOWER"):
            shape = x.type.shape
            if sizes is None and shape is not None and all(isinstance(d, int) for d in shape[2:]):
                sizes = [int(d) for d in shape[2:]]  # type: ignore[arg-type]
            if sizes is None and all(s == 1 for s in strides):
                sizes = [1] * nd  # at stride 1 the pads total extent - 1 whatever the size
            if sizes is None:
                return None
            pads = same_pads(mode, [int(n) for n in sizes], ks, strides, dilations)
        elif mode == "VALID":
            pads = [0] * (2 * nd)
        elif mode == "NOTSET":
            pads = [int(p) for p in node.attr("pads", None) or [0] * (2 * nd)]
        else:
            return None
        if len(strides) != nd or len(dilations) != nd or len(pads) != 2 * nd or min(pads) < 0:
            return None
        attr_ks = node.attr("kernel_shape", None)
        if attr_ks is not None and tuple(int(k) for k in attr_ks) != ks:
            return None
        return cls(strides, tuple(pads), dilations, int(node.attr("group", 1) or 1), ks)

    def attrs(self) -> dict[str, Any]:
        """FusedConv's geometry attributes (explicit pads)."""
        return {"strides": list(self.strides), "pads": list(self.pads), "dilations": list(self.dilations),
                "group": self.group}

    @property
    def begin(self) -> tuple[int, ...]:
        return self.pads[:len(self.kernel)]

    @property
    def end(self) -> tuple[int, ...]:
        return self.pads[len(self.kernel):]

    @property
    def symmetric(self) -> bool:
        return self.begin == self.end

    @property
    def pointwise(self) -> bool:
        """A 1x1, stride 1, unpadded, ungrouped convolution: a matmul over pixels."""
        return (all(k == 1 for k in self.kernel) and all(s == 1 for s in self.strides) and not any(self.pads)
                and self.group == 1)

    def out_sizes(self, sizes: Sequence[int]) -> tuple[int, ...]:
        """The output's spatial sizes for an input of these spatial sizes."""
        return tuple((n + b + e - d * (k - 1) - 1) // s + 1 for n, b, e, d, k, s in
                     zip(sizes, self.begin, self.end, self.dilations, self.kernel, self.strides))

    def out_hw(self, h: int, w: int) -> tuple[int, int]:
        """`out_sizes` of a 2-D convolution."""
        oh, ow = self.out_sizes((h, w))
        return oh, ow

    @property
    def symmetric_pads(self) -> list[int]:
        """Per dim the padding both sides share (what a library taking one padding per dim is given)."""
        return [max(0, min(b, e)) for b, e in zip(self.begin, self.end)]

    @property
    def extra_pad(self) -> list[int] | None:
        """F.pad argument for the pads beyond `symmetric_pads` (applied to the input first); None if none."""
        sym = self.symmetric_pads
        extra_b = [b - p for b, p in zip(self.begin, sym)]
        extra_e = [e - p for e, p in zip(self.end, sym)]
        return torch_pad(extra_b, extra_e) if any(extra_b + extra_e) else None

    def without_extra(self) -> "ConvGeometry":
        """The same geometry on an input that `extra_pad` has already been applied to."""
        sym = tuple(self.symmetric_pads)
        return replace(self, pads=sym + sym)

    def padded_shape(self, shape: Sequence[int] | None) -> list[int] | None:
        """An input shape (N, C, spatial...) once `extra_pad` is applied."""
        if shape is None:
            return None
        sym = self.symmetric_pads
        return [*shape[:2], *(n + b + e - 2 * p for n, b, e, p in zip(shape[2:], self.begin, self.end, sym))]


def _bias_shape(b: Tensor, nd: int) -> Tensor:
    return b.reshape(1, -1, *([1] * nd))


# ---- Conv -----------------------------------------------------------------------------------------

@register
class Conv(WindowOp):
    op_type = "Conv"
    attributes = {**WINDOW, "group": Attr("int", 1, min=1)}

    def compute(self, node: Node, x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
        require_float(node, x, w, b)
        nd = spatial_rank(node, x)
        kernel = kernel_shape(node, w)
        strides, dilations = strides_dilations(node, nd)
        pads = window_pads(node, list(x.shape[2:]), kernel, strides, dilations)
        begin, end = pads[:nd], pads[nd:]
        if begin == end and min(begin, default=0) >= 0:
            padding: list[int] = begin
        else:
            x = F.pad(x, torch_pad(begin, end))
            padding = [0] * nd
        return _CONV[nd](x, w, b, strides, padding, dilations, int(node.attr("group", 1)))


# ---- ConvTranspose --------------------------------------------------------------------------------

def conv_transpose_geometry(node: Node, sizes: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
                            dilations: Sequence[int]) -> tuple[list[int], list[int]]:
    """(begin crop, output size) per spatial dim, relative to the full transposed-conv output."""
    nd = len(sizes)
    out_pad = window_ints(node, "output_padding", nd, 0)
    full = [s * (n - 1) + op + (k - 1) * d + 1 for n, k, s, d, op in zip(sizes, kernel, strides, dilations, out_pad)]
    mode = auto_pad_mode(node)
    out_shape = node.attr("output_shape", None)
    pads = window_ints(node, "pads", nd, 0) if node.attr("pads", None) else None
    if out_shape:
        if len(out_shape) not in (nd, nd + 2):
            raise UnsupportedOpError(f"node '{node.name}': {node.op_type} output_shape has {len(out_shape)} values, "
                                     f"expected {nd} (one per spatial dim)")
        out = [int(v) for v in list(out_shape)[-nd:]]
    elif mode in ("SAME_UPPER", "SAME_LOWER"):
        out = [n * s for n, s in zip(sizes, strides)]
    else:
        pads = list(pads or [0] * (2 * nd)) if mode == "NOTSET" else [0] * (2 * nd)
        return pads[:nd], [f - b - e for f, b, e in zip(full, pads[:nd], pads[nd:])]
    if pads and mode == "NOTSET":
        return list(pads[:nd]), out
    totals = [f - o for f, o in zip(full, out)]
    if mode == "SAME_UPPER":
        begin = [t // 2 for t in totals]
    else:
        begin = [t - t // 2 for t in totals]
    return begin, out


CONV_TRANSPOSE_ATTRS = {**WINDOW, "group": Attr("int", 1, min=1),
                        "output_padding": Attr("ints", None, min=0, max=INT32_MAX),
                        "output_shape": Attr("ints", None, min=0)}
"""ConvTranspose's attributes (kiln.ops.fused.FusedConvTranspose carries them unchanged)."""
TRANSPOSED = ("ConvTranspose", "FusedConvTranspose")


@register
class ConvTranspose(WindowOp):
    op_type = "ConvTranspose"
    attributes = CONV_TRANSPOSE_ATTRS

    def compute(self, node: Node, x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
        require_float(node, x, w, b)
        nd = spatial_rank(node, x)
        kernel = kernel_shape(node, w)
        strides, dilations = strides_dilations(node, nd)
        group = int(node.attr("group", 1))
        sizes = [int(n) for n in x.shape[2:]]
        begin, out = conv_transpose_geometry(node, sizes, kernel, strides, dilations)
        natural = [s * (n - 1) + (k - 1) * d + 1 for n, k, s, d in zip(sizes, kernel, strides, dilations)]
        crop_end = [f - bg - o for f, bg, o in zip(natural, begin, out)]
        extra = [bg - ce for bg, ce in zip(begin, crop_end)]
        if all(bg >= 0 and 0 <= e < max(s, d) for bg, e, s, d in zip(begin, extra, strides, dilations)):
            return _CONV_T[nd](x, w, b, strides, begin, extra, group, dilations)
        y = _CONV_T[nd](x, w, None, strides, 0, 0, group, dilations)
        y = F.pad(y, torch_pad([-bg for bg in begin], [-ce for ce in crop_end]))
        return y if b is None else y + _bias_shape(b, nd).to(y.dtype)


# ---- DeformConv -----------------------------------------------------------------------------------

def _sample_linear(x: Tensor, pos: list[Tensor]) -> Tensor:
    """Multilinear samples of x (N, G, Cg, *sizes) at positions pos[i] (N, G, L), zeros outside.

    Returns (N, G, Cg, L).
    """
    n, g, cg = x.shape[:3]
    sizes = [int(s) for s in x.shape[3:]]
    flat = x.reshape(n, g, cg, -1)
    lows = [p.floor() for p in pos]
    fracs = [p - lo for p, lo in zip(pos, lows)]
    lows_i = [lo.to(torch.int64) for lo in lows]
    out = torch.zeros((n, g, cg, pos[0].shape[-1]), dtype=x.dtype, device=x.device)
    for corner in itertools.product((0, 1), repeat=len(sizes)):
        weight = torch.ones_like(pos[0])
        index = torch.zeros_like(lows_i[0])
        valid = torch.ones_like(pos[0], dtype=torch.bool)
        for dim, bit in enumerate(corner):
            idx = lows_i[dim] + bit
            weight = weight * (fracs[dim] if bit else 1 - fracs[dim])
            valid = valid & (idx >= 0) & (idx < sizes[dim])
            index = index * sizes[dim] + idx.clamp(0, sizes[dim] - 1)
        vals = torch.gather(flat, 3, index.unsqueeze(2).expand(n, g, cg, -1))
        out = out + vals * (weight * valid).unsqueeze(2).to(x.dtype)
    return out


@register
class DeformConv(WindowOp):
    op_type = "DeformConv"
    opsets = (19, 28)
    attributes = {**{k: a for k, a in WINDOW.items() if k != "auto_pad"}, "group": Attr("int", 1, min=1),
                  "offset_group": Attr("int", 1, min=1)}

    def compute(self, node: Node, x: Tensor, w: Tensor, offset: Tensor, b: Tensor | None = None,
                mask: Tensor | None = None) -> Tensor:
        require_float(node, x, w, offset, b, mask)
        nd = spatial_rank(node, x, range(1, 8))
        kernel = kernel_shape(node, w)
        strides, dilations = strides_dilations(node, nd)
        pads = window_ints(node, "pads", nd, 0)
        group = int(node.attr("group", 1))
        og = int(node.attr("offset_group", 1))
        n, c = int(x.shape[0]), int(x.shape[1])
        oc = int(w.shape[0])
        out_sizes = [int(s) for s in offset.shape[2:]]
        expect = [(int(x.shape[2 + i]) + pads[i] + pads[nd + i] - (kernel[i] - 1) * dilations[i] - 1) // strides[i] + 1
                  for i in range(nd)]
        if out_sizes != expect or c % group or c % og or int(w.shape[1]) * group != c:
            raise ShapeError(f"node '{node.name}': DeformConv shapes disagree: input {tuple(x.shape)}, "
                                     f"weight {tuple(w.shape)}, offset {tuple(offset.shape)}, output {expect}")
        kk = math.prod(kernel)
        npos = kk * math.prod(out_sizes)
        cdt = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        off = offset.to(cdt).reshape(n, og, kk, nd, -1)
        kidx = torch.cartesian_prod(*[torch.arange(k, device=x.device) for k in kernel]).reshape(kk, nd)
        oidx = torch.cartesian_prod(*[torch.arange(s, device=x.device) for s in out_sizes]).reshape(-1, nd)
        pos = []
        for i in range(nd):
            base = (oidx[:, i] * strides[i] - pads[i]).unsqueeze(0) + (kidx[:, i] * dilations[i]).unsqueeze(1)
            pos.append((base.to(cdt).unsqueeze(0).unsqueeze(0) + off[:, :, :, i, :]).reshape(n, og, npos))
        cols = _sample_linear(x.to(cdt).reshape(n, og, c // og, *x.shape[2:]), pos)
        cols = cols.reshape(n, og, c // og, kk, -1)
        if mask is not None:
            cols = cols * mask.to(cdt).reshape(n, og, 1, kk, -1)
        cols = cols.reshape(n, group, (c // group) * kk, -1)
        wm = w.to(cdt).reshape(group, oc // group, -1)
        y = torch.matmul(wm.unsqueeze(0), cols).reshape(n, oc, *out_sizes)
        if b is not None:
            y = y + _bias_shape(b.to(cdt), nd)
        return y.to(x.dtype)
