"""Pooling: MaxPool (with Indices), AveragePool, LpPool, their Global forms, MaxUnpool, MaxRoiPool, RoiAlign.

Where torch's own pooling (symmetric pads of at most half a window) gives the ONNX geometry it is
used directly; otherwise the input is padded explicitly (-inf for max, zeros for sums) up to the
extent the last window needs, so asymmetric pads, ceil_mode and dilations reduce to an unpadded pool.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from kiln.errors import ShapeError, UnsupportedDTypeError, UnsupportedOpError
from kiln.ir.graph import Node
from kiln.ir.types import TensorType
from kiln.ops.attrs import Attr
from kiln.ops.attrs import REQUIRED
from kiln.ops.conv import (INT32_MAX, WINDOW, WindowOp, auto_pad_mode, check_window_ints, require_float,
                           spatial_rank, strides_dilations, torch_pad, window_ints, window_pads)
from kiln.ops.registry import OpDef, ints, register

Tensor = torch.Tensor

_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _out_size(n: int, begin: int, end: int, extent: int, stride: int, ceil: bool) -> int:
    """Number of windows; in ceil mode a last window starting in the end padding is dropped."""
    span = n + begin + end - extent
    o = (-(-span // stride) if ceil else span // stride) + 1
    if ceil and (o - 1) * stride >= n + begin:
        o -= 1
    return max(o, 0)


class Window:
    """Geometry of one pooling node on one input: output sizes and the pads that realise them."""

    def __init__(self, node: Node, x: Tensor, ranks: Sequence[int] = (1, 2, 3)) -> None:
        self.nd = nd = spatial_rank(node, x, ranks)
        self.sizes = [int(s) for s in x.shape[2:]]
        kernel = node.attr("kernel_shape", None)
        if not kernel or not isinstance(kernel, (list, tuple)):
            raise UnsupportedOpError(f"node '{node.name}': {node.op_type} needs kernel_shape ({nd} sizes)")
        # one value per spatial dim (two pads), each within MAX_WINDOW: a wrong length is an error, never
        # a silent broadcast or truncation, and nothing below loops or allocates by an absurd attribute
        self.kernel = check_window_ints(node, "kernel_shape", kernel, nd)
        self.strides, self.dilations = strides_dilations(node, nd)
        pads = window_pads(node, self.sizes, self.kernel, self.strides, self.dilations)
        self.begin, self.end = pads[:nd], pads[nd:]
        self.extent = [(k - 1) * d + 1 for k, d in zip(self.kernel, self.dilations)]
        for i, (n, b, e, ext) in enumerate(zip(self.sizes, self.begin, self.end, self.extent)):
            if ext > n + b + e:
                raise UnsupportedOpError(
                    f"node '{node.name}': {node.op_type} window spans {ext} elements in spatial dim {i} (kernel "
                    f"{self.kernel[i]}, dilation {self.dilations[i]}), more than the padded input's {n + b + e}")
        ceil = bool(node.attr("ceil_mode", 0)) and auto_pad_mode(node) == "NOTSET"
        self.out = [_out_size(*g, ceil) for g in zip(self.sizes, self.begin, self.end, self.extent, self.strides)]
        # pad at the end so that the last window fits exactly (may be negative: a crop)
        self.need = [(o - 1) * s + ext - n - b for o, s, ext, n, b in
                     zip(self.out, self.strides, self.extent, self.sizes, self.begin)]

    def torch_ceil_mode(self) -> bool | None:
        """ceil_mode for torch's own padded pooling when it yields this geometry exactly, else None.

        torch pads symmetrically (at most half the undilated kernel) and, in ceil mode, drops a last
        window that would start in the end padding, as ONNX does.
        """
        if self.begin != self.end or any(b < 0 or 2 * b > k for b, k in zip(self.begin, self.kernel)):
            return None
        for ceil in (False, True):
            geometry = zip(self.sizes, self.begin, self.end, self.extent, self.strides)
            if [_out_size(*g, ceil) for g in geometry] == self.out:
                return ceil
        return None

    def pad(self, x: Tensor, value: float, explicit_value: float | None = None) -> Tensor:
        """x padded by the begin pads and up to the last window's end.

        With `explicit_value`, the explicit pads get that value and only the ceil-mode overhang `value`.
        """
        if explicit_value is None:
            return F.pad(x, torch_pad(self.begin, self.need), value=value)
        x = F.pad(x, torch_pad(self.begin, self.end), value=explicit_value)
        return F.pad(x, torch_pad([0] * self.nd, [need - e for need, e in zip(self.need, self.end)]), value=value)

    def window_sum(self, x: Tensor) -> Tensor:
        """Sum of each window of an already padded x (N, C, *padded) as a depthwise convolution."""
        n, c = x.shape[:2]
        ones = torch.ones((1, 1, *self.kernel), dtype=x.dtype, device=x.device)
        y = _CONV[self.nd](x.reshape(n * c, 1, *x.shape[2:]), ones, None, self.strides, 0, self.dilations)
        return y.reshape(n, c, *y.shape[2:])

    def windows(self, x: Tensor) -> Tensor:
        """View of an already padded x as (N, C, *out, prod(kernel)) window elements."""
        for i, (ext, s) in enumerate(zip(self.extent, self.strides)):
            x = x.unfold(2 + i, ext, s)
        x = x[(Ellipsis, *[slice(None, None, d) for d in self.dilations])]
        return x.reshape(*x.shape[:2 + self.nd], -1)


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _lowest(dtype: torch.dtype) -> float:
    return float("-inf") if dtype.is_floating_point else int(torch.iinfo(dtype).min)


# ---- MaxPool --------------------------------------------------------------------------------------

_MAXPOOL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.uint8,
                   torch.int16, torch.int32, torch.int64)


@register
class MaxPool(WindowOp):
    op_type = "MaxPool"
    attributes = {**WINDOW, "ceil_mode": Attr("int", 0, choices=(0, 1)), "storage_order": Attr("int", 0, choices=(0, 1))}

    def compute(self, node: Node, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        if x.dtype not in _MAXPOOL_DTYPES:
            raise UnsupportedDTypeError(f"node '{node.name}': MaxPool does not support element type {x.dtype}")
        want_idx = len(node.outputs) > 1
        if x.dtype in (torch.int8, torch.uint8) and not want_idx:
            # exact through a float type holding every 8-bit value (int8 activations between integer layers):
            # torch's pooling kernels instead of the window-unfolding path below
            wide = torch.float16 if x.is_cuda else torch.float32
            return self.compute(node, x.to(wide)).to(x.dtype)  # type: ignore[union-attr]
        win = Window(node, x)
        if x.dtype.is_floating_point:
            ceil = win.torch_ceil_mode()
            if ceil is not None:
                res = _MAX_POOL[win.nd](x, win.kernel, win.strides, win.begin, win.dilations, ceil_mode=ceil,
                                        return_indices=want_idx)
                if not want_idx:
                    return res
                y, flat = res
                return y, _onnx_indices(node, win, x, _unflatten(flat, win.sizes), [0] * win.nd)
            padded = win.pad(x, _lowest(x.dtype))
            res = _MAX_POOL[win.nd](padded, win.kernel, win.strides, 0, win.dilations, return_indices=want_idx)
            if not want_idx:
                return res
            y, flat = res
            return y, _onnx_indices(node, win, x, _unflatten(flat, [int(s) for s in padded.shape[2:]]), win.begin)
        vals = win.windows(win.pad(x, _lowest(x.dtype)))
        y = vals.amax(-1)
        if not want_idx:
            return y
        coords = _unflatten(vals.argmax(-1), win.kernel)
        for i in range(win.nd):
            shape = [1] * win.nd
            shape[i] = -1
            start = torch.arange(win.out[i], device=x.device).reshape(shape) * win.strides[i]
            coords[i] = start + coords[i] * win.dilations[i]
        return y, _onnx_indices(node, win, x, coords, win.begin)


def _unflatten(flat: Tensor, sizes: Sequence[int]) -> list[Tensor]:
    """Row-major coordinates of flat indices into a block of the given sizes."""
    coords = []
    for size in reversed(list(sizes)):
        coords.append(flat % size)
        flat = flat // size
    coords.reverse()
    return coords


def _onnx_indices(node: Node, win: Window, x: Tensor, coords: list[Tensor], offsets: Sequence[int]) -> Tensor:
    """MaxPool's Indices output: flat positions in the whole input (row- or column-major planes)."""
    coords = [c - o for c, o in zip(coords, offsets)]
    order = range(win.nd) if int(node.attr("storage_order", 0)) == 0 else reversed(range(win.nd))
    index = torch.zeros_like(coords[0])
    for i in order:
        index = index * win.sizes[i] + coords[i]
    plane = math.prod(win.sizes)
    n, c = int(x.shape[0]), int(x.shape[1])
    base = torch.arange(n * c, device=x.device, dtype=torch.int64).reshape(n, c, *([1] * win.nd)) * plane
    return (index + base).to(torch.int64)


# ---- AveragePool / LpPool -------------------------------------------------------------------------

@register
class AveragePool(WindowOp):
    op_type = "AveragePool"
    attributes = {**WINDOW, "ceil_mode": Attr("int", 0, choices=(0, 1)), "count_include_pad": Attr("int", 0, choices=(0, 1))}

    def compute(self, node: Node, x: Tensor) -> Tensor:
        require_float(node, x)
        win = Window(node, x)
        include_pad = bool(node.attr("count_include_pad", 0))
        dt = _acc_dtype(x)
        xf = x.to(dt)
        ceil = win.torch_ceil_mode() if win.dilations == [1] * win.nd else None
        if ceil is not None:
            y = _AVG_POOL[win.nd](xf, win.kernel, win.strides, win.begin, ceil_mode=ceil,
                                  count_include_pad=include_pad)
            return y.to(x.dtype)
        total = win.window_sum(win.pad(xf, 0.0))
        mask = torch.ones((1, 1, *win.sizes), dtype=dt, device=x.device)
        count = win.window_sum(win.pad(mask, 0.0, 1.0 if include_pad else 0.0))
        return (total / count).to(x.dtype)


def _lp_p(node: Node) -> float:
    p = float(node.attr("p", 2))
    if p <= 0:
        raise UnsupportedOpError(f"node '{node.name}': p must be positive, got {p}")
    return p


def _pow_abs(x: Tensor, p: float) -> Tensor:
    return x * x if p == 2 else x.abs().pow(p)


def _root(x: Tensor, p: float) -> Tensor:
    return x.sqrt() if p == 2 else x.pow(1.0 / p)


@register
class LpPool(WindowOp):
    op_type = "LpPool"
    attributes = {**WINDOW, "ceil_mode": Attr("int", 0, choices=(0, 1))}

    def compute(self, node: Node, x: Tensor) -> Tensor:
        require_float(node, x)
        p = _lp_p(node)
        win = Window(node, x)
        dt = _acc_dtype(x)
        total = win.window_sum(win.pad(_pow_abs(x.to(dt), p), 0.0))
        return _root(total, p).to(x.dtype)


# ---- Global pools ---------------------------------------------------------------------------------

def _spatial(node: Node, x: Tensor) -> list[int]:
    if x.dim() < 3:
        raise UnsupportedOpError(f"node '{node.name}': {node.op_type} needs an input of rank 3 or more")
    return list(range(2, x.dim()))


@register
class GlobalAveragePool(OpDef):
    op_type = "GlobalAveragePool"

    def compute(self, node: Node, x: Tensor) -> Tensor:
        require_float(node, x)
        return x.to(_acc_dtype(x)).mean(_spatial(node, x), keepdim=True).to(x.dtype)


@register
class GlobalMaxPool(OpDef):
    op_type = "GlobalMaxPool"

    def compute(self, node: Node, x: Tensor) -> Tensor:
        require_float(node, x)
        return x.amax(_spatial(node, x), keepdim=True)


@register
class GlobalLpPool(OpDef):
    op_type = "GlobalLpPool"

    def compute(self, node: Node, x: Tensor) -> Tensor:
        require_float(node, x)
        p = _lp_p(node)
        total = _pow_abs(x.to(_acc_dtype(x)), p).sum(_spatial(node, x), keepdim=True)
        return _root(total, p).to(x.dtype)


# ---- MaxUnpool ------------------------------------------------------------------------------------

@register
class MaxUnpool(WindowOp):
    op_type = "MaxUnpool"
    opsets = (9, 28)
    value_inputs = (2,)
    attributes = {"kernel_shape": Attr("ints", REQUIRED, min=1, max=INT32_MAX), "strides": WINDOW["strides"],
                  "pads": WINDOW["pads"]}

    def compute(self, node: Node, x: Tensor, indices: Tensor, output_shape: Tensor | None = None) -> Tensor:
        nd = x.dim() - 2
        if nd < 1:
            raise UnsupportedOpError(f"node '{node.name}': MaxUnpool needs an input of rank 3 or more")
        if not node.attr("kernel_shape", None):
            raise UnsupportedOpError(f"node '{node.name}': MaxUnpool needs kernel_shape ({nd} sizes)")
        kernel = window_ints(node, "kernel_shape", nd, 1)
        strides = window_ints(node, "strides", nd, 1)
        pads = window_ints(node, "pads", nd, 0)
        if output_shape is not None:
            shape = ints(output_shape)
            if len(shape) != x.dim() or shape[:2] != [int(x.shape[0]), int(x.shape[1])]:
                raise ShapeError(f"node '{node.name}': output_shape {shape} does not match input {tuple(x.shape)}")
        else:
            shape = [int(x.shape[0]), int(x.shape[1])] + [
                (int(n) - 1) * s - pads[i] - pads[nd + i] + k
                for i, (n, s, k) in enumerate(zip(x.shape[2:], strides, kernel))]
        y = torch.zeros(math.prod(shape), dtype=x.dtype, device=x.device)
        return y.scatter(0, indices.reshape(-1).to(torch.int64), x.reshape(-1)).reshape(shape)


# ---- MaxRoiPool / RoiAlign ------------------------------------------------------------------------

def _roi_output_type(types: Sequence[TensorType | None], oh: int, ow: int) -> list[TensorType]:
    """(num_rois, C, oh, ow) in X's element type: static whatever the ROI values."""
    x, rois = types[0], types[1]
    c = x.shape[1] if x is not None and x.shape is not None and len(x.shape) == 4 else None
    r = rois.shape[0] if rois is not None and rois.shape is not None and len(rois.shape) == 2 else None
    return [TensorType(x.dtype if x is not None else None, (r, c, oh, ow))]


def _round_half_away(x: Tensor) -> Tensor:
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


@register
class MaxRoiPool(OpDef):
    op_type = "MaxRoiPool"

    def compute(self, node: Node, x: Tensor, rois: Tensor) -> Tensor:
        require_float(node, x, rois)
        if x.dim() != 4:
            raise UnsupportedOpError(f"node '{node.name}': MaxRoiPool needs a 4-D input")
        ph, pw = [int(v) for v in node.attr("pooled_shape")]
        scale = float(node.attr("spatial_scale", 1.0))
        h, w = int(x.shape[2]), int(x.shape[3])
        dt = _acc_dtype(x)
        r = rois.to(dt)
        batch = r[:, 0].to(torch.int64)
        start_w, start_h, end_w, end_h = (_round_half_away(r[:, i] * scale) for i in range(1, 5))
        roi_h = (end_h - start_h + 1).clamp_min(1)
        roi_w = (end_w - start_w + 1).clamp_min(1)

        def bin_masks(start: Tensor, length: Tensor, bins: int, size: int) -> Tensor:
            b = torch.arange(bins, device=x.device, dtype=dt)
            lo = (torch.floor(b * (length[:, None] / bins)) + start[:, None]).clamp(0, size)
            hi = (torch.ceil((b + 1) * (length[:, None] / bins)) + start[:, None]).clamp(0, size)
            pos = torch.arange(size, device=x.device, dtype=dt)
            return (pos >= lo[..., None]) & (pos < hi[..., None])  # (R, bins, size)

        mh = bin_masks(start_h, roi_h, ph, h)
        mw = bin_masks(start_w, roi_w, pw, w)
        low = _lowest(x.dtype)
        outs = []
        for i in range(int(rois.shape[0])):
            v = x.index_select(0, batch[i:i + 1])[0]  # (C, H, W)
            t = torch.where(mw[i][None, None], v[:, :, None, :], low).amax(-1)  # (C, H, pw)
            t = torch.where(mh[i][None, :, :, None], t[:, None, :, :], low).amax(2)  # (C, ph, pw)
            outs.append(t)
        if not outs:
            return x.new_zeros((0, x.shape[1], ph, pw))
        y = torch.stack(outs)
        return torch.where(y == low, torch.zeros_like(y), y)

    def infer(self, node: Node, types: Sequence[TensorType | None],
              consts: Sequence[Tensor | None]) -> list[TensorType]:
        ph, pw = [int(v) for v in node.attr("pooled_shape")]
        return _roi_output_type(types, ph, pw)


@register
class RoiAlign(OpDef):
    op_type = "RoiAlign"
    opsets = (10, 28)

    def compute(self, node: Node, x: Tensor, rois: Tensor, batch_indices: Tensor) -> Tensor:
        require_float(node, x, rois)
        if x.dim() != 4:
            raise UnsupportedOpError(f"node '{node.name}': RoiAlign needs a 4-D input")
        mode = node.attr("mode", "avg")
        if mode not in ("avg", "max"):
            raise UnsupportedOpError(f"node '{node.name}': unknown RoiAlign mode '{mode}'")
        default_ctm = "half_pixel" if node.opset >= 16 else "output_half_pixel"
        half_pixel = node.attr("coordinate_transformation_mode", default_ctm) == "half_pixel"
        oh, ow = int(node.attr("output_height", 1)), int(node.attr("output_width", 1))
        ratio = int(node.attr("sampling_ratio", 0))
        scale = float(node.attr("spatial_scale", 1.0))
        c, h, w = int(x.shape[1]), int(x.shape[2]), int(x.shape[3])
        dt = _acc_dtype(x)
        offset = 0.5 if half_pixel else 0.0
        boxes = (rois.to(torch.float64) * scale - offset).tolist()
        batch = batch_indices.to(torch.int64)
        outs = []
        for i, (x1, y1, x2, y2) in enumerate(boxes):
            rh, rw = y2 - y1, x2 - x1
            if not half_pixel:
                rh, rw = max(rh, 1.0), max(rw, 1.0)
            gh = ratio if ratio > 0 else int(-(-rh // oh)) if rh > 0 else 0
            gw = ratio if ratio > 0 else int(-(-rw // ow)) if rw > 0 else 0
            if gh <= 0 or gw <= 0:
                outs.append(torch.zeros((c, oh, ow), dtype=dt, device=x.device))
                continue
            iy, wy = _roi_taps(y1, rh / oh, oh, gh, h, x.device, dt)  # (oh*gh*2,), (oh, gh, 2)
            ix, wx = _roi_taps(x1, rw / ow, ow, gw, w, x.device, dt)
            v = x.index_select(0, batch[i:i + 1])[0].to(dt)
            v = v[:, iy][:, :, ix].reshape(c, oh, gh, 2, ow, gw, 2)
            prod = v * wy[None, :, :, :, None, None, None] * wx[None, None, None, None]
            if mode == "avg":
                outs.append(prod.sum((2, 3, 5, 6)) / (gh * gw))
            else:
                outs.append(prod.amax((3, 6)).amax((2, 4)))
        if not outs:
            return x.new_zeros((0, c, oh, ow))
        return torch.stack(outs).to(x.dtype)

    def infer(self, node: Node, types: Sequence[TensorType | None],
              consts: Sequence[Tensor | None]) -> list[TensorType]:
        return _roi_output_type(types, int(node.attr("output_height", 1)), int(node.attr("output_width", 1)))


def _roi_taps(start: float, bin_size: float, bins: int, grid: int, size: int, device: torch.device,
              dt: torch.dtype) -> tuple[Tensor, Tensor]:
    """Bilinear taps (low, high) and their weights along one axis for every bin and sample."""
    b = torch.arange(bins, device=device, dtype=torch.float64)[:, None]
    g = torch.arange(grid, device=device, dtype=torch.float64)[None, :]
    p = start + b * bin_size + (g + 0.5) * bin_size / grid  # (bins, grid)
    valid = (p >= -1.0) & (p <= size)
    p = p.clamp_min(0)
    low = p.floor().to(torch.int64)
    at_end = low >= size - 1
    low = torch.where(at_end, torch.full_like(low, size - 1), low)
    high = torch.where(at_end, low, low + 1)
    p = torch.where(at_end, low.to(p.dtype), p)
    frac = p - low
    weights = torch.stack([1 - frac, frac], -1) * valid[..., None]
    return torch.stack([low, high], -1).reshape(-1), weights.to(dt)
