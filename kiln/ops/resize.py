"""Resampling ops: Resize (every ONNX mode, coordinate transform, nearest rounding, antialias, axes,
keep_aspect_ratio_policy) and Upsample. Each output axis is computed from source coordinates and taps as
the ONNX reference does; where torch's own interpolation gives the same values it is used instead."""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import torch

from kiln.errors import UnsupportedOpError
from kiln.ir.graph import Node
from kiln.ir.layout import dense
from kiln.ir.types import TensorType
from kiln.ops.registry import OpDef, norm_axis, register
from kiln.ops.shape import _prod, as_bits, from_bits, optional_ints

Tensor = torch.Tensor

_CTMS = ("half_pixel", "half_pixel_symmetric", "pytorch_half_pixel", "align_corners", "asymmetric",
         "tf_half_pixel_for_nn", "tf_crop_and_resize")
_NEAREST = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")


def _source_coords(ctm: str, out_w: int, in_w: int, scale: float,
                   roi: tuple[float, float] | None, dev: torch.device) -> tuple[Tensor, Tensor | None]:
    """Input coordinate of each output index (float64), and the extrapolation mask for tf_crop_and_resize."""
    y = torch.arange(out_w, dtype=torch.float64, device=dev)
    out_f = scale * in_w
    if ctm == "align_corners":
        x = y * 0.0 if out_f == 1 else y * (in_w - 1) / (out_f - 1)
    elif ctm == "asymmetric":
        x = y / scale
    elif ctm == "pytorch_half_pixel":
        x = y * 0.0 - 0.5 if out_f == 1 else (y + 0.5) / scale - 0.5
    elif ctm == "half_pixel":
        x = (y + 0.5) / scale - 0.5
    elif ctm == "half_pixel_symmetric":
        offset = in_w / 2 * (1 - out_w / out_f)
        x = offset + (y + 0.5) / scale - 0.5
    elif ctm == "tf_half_pixel_for_nn":
        x = (y + 0.5) / scale
    else:  # tf_crop_and_resize
        r0, r1 = roi if roi is not None else (0.0, 1.0)
        if out_f == 1:
            x = y * 0.0 + (r1 - r0) * (in_w - 1) / 2
        else:
            x = y * (r1 - r0) * (in_w - 1) / (out_f - 1)
        x = x + r0 * (in_w - 1)
        return x, (x < 0) | (x > in_w - 1)
    return x, None


def _cubic(a: float) -> Callable[[Tensor], Tensor]:
    def kernel(t: Tensor) -> Tensor:
        t = t.abs()
        near = ((a + 2) * t - (a + 3)) * t * t + 1
        far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
        return torch.where(t <= 1, near, torch.where(t < 2, far, torch.zeros_like(t)))
    return kernel


def _coefficients(mode: str, ratio: Tensor, scale: float, antialias: bool, a: float) -> Tensor:
    """Interpolation weights (out, n) for the n taps left-to-right around each sample point."""
    if mode == "linear":
        if antialias:
            s = min(scale, 1.0)
            start = math.floor(-1 / s) + 1
            taps = torch.arange(start, 2 - start, dtype=torch.float64, device=ratio.device)
            w = (1 - ((taps[None, :] - ratio[:, None]) * s).abs()).clamp(0, 1)
            return w / w.sum(dim=1, keepdim=True)
        return torch.stack([1 - ratio, ratio], dim=1)
    s = min(scale, 1.0) if antialias else 1.0
    start = math.floor(-2 / s) + 1
    taps = torch.arange(start, 2 - start, dtype=torch.float64, device=ratio.device)
    w = _cubic(a)((taps[None, :] - ratio[:, None]) * s)
    return w / w.sum(dim=1, keepdim=True) if antialias else w


def _nearest_index(coords: Tensor, scale: float, in_w: int, nearest_mode: str) -> Tensor:
    fl = torch.floor(coords)
    if nearest_mode == "simple":
        nearest_mode = "ceil" if scale < 1 else "floor"
    if nearest_mode == "round_prefer_floor":
        idx = fl + (coords - fl > 0.5)
    elif nearest_mode == "round_prefer_ceil":
        idx = fl + (coords - fl >= 0.5)
    elif nearest_mode == "floor":
        idx = fl
    else:
        idx = torch.ceil(coords)
    return idx.to(torch.int64).clamp(0, in_w - 1)


def _taps(coords: Tensor, n: int) -> Tensor:
    """Indices (out, n) of the n input samples nearest each coordinate, ties to the left (may lie outside)."""
    pad = -(-n // 2)
    xp = coords + pad
    pf = torch.floor(xp)
    frac = xp - pf
    if n % 2 == 0:
        off = torch.where(frac == 0, -(n // 2), -(n // 2) + 1)
    else:
        off = torch.where(frac <= 0.5, -((n - 1) // 2), -((n - 1) // 2) + 1)
    return (pf.to(torch.int64) + off)[:, None] + torch.arange(n, device=coords.device)[None, :] - pad


AxisKey = tuple  # (mode, ctm, nearest_mode, antialias, cubic_a, exclude_outside, out_w, in_w, scale, roi)


@functools.lru_cache(maxsize=512)
def _axis_plan(key: AxisKey, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Resampling plan of one axis, built once per shape/attributes/device: (indices, weights, mask).

    nearest: indices (out,); linear/cubic: clamped tap indices (out, n) and weights (out, n) in dtype.
    mask flags outputs that take extrapolation_value (tf_crop_and_resize), else None.
    """
    mode, ctm, nearest_mode, antialias, cubic_a, exclude_outside, out_w, in_w, scale, roi = key
    coords, mask = _source_coords(ctm, out_w, in_w, scale, roi, device)
    if mode == "nearest":
        return _nearest_index(coords, scale, in_w, nearest_mode), None, mask
    fl = torch.floor(coords)
    ratio = torch.where(coords == fl, torch.ones_like(coords), coords - fl)
    w = _coefficients(mode, ratio, scale, antialias, cubic_a)
    taps = _taps(coords, w.shape[1])
    if exclude_outside:
        w = torch.where((taps < 0) | (taps >= in_w), torch.zeros_like(w), w)
        total = w.sum(dim=1, keepdim=True)
        w = w / torch.where(total == 0, torch.ones_like(total), total)
    return taps.clamp(0, in_w - 1), w.to(dtype), mask


def _interp_axis(x: Tensor, axis: int, taps: Tensor, w: Tensor) -> Tensor:
    """Weighted sum of the n taps around each source coordinate along one axis (linear/cubic)."""
    out_w, n = taps.shape
    g = x.index_select(axis, taps.reshape(-1))
    g = g.reshape(*x.shape[:axis], out_w, n, *x.shape[axis + 1:])
    wshape = [1] * (x.dim() + 1)
    wshape[axis], wshape[axis + 1] = out_w, n
    return (g * w.reshape(wshape)).sum(dim=axis + 1)


def _extrapolate(y: Tensor, masks: dict[int, Tensor], value: float) -> Tensor:
    """tf_crop_and_resize: extrapolation_value where a source coordinate falls outside the input."""
    for axis, mask in masks.items():
        shape = [1] * y.dim()
        shape[axis] = mask.shape[0]
        y = torch.where(mask.reshape(shape), torch.tensor(value, dtype=y.dtype, device=y.device), y)
    return y


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype == torch.float64 or dtype in (torch.int32, torch.int64, torch.uint32, torch.uint64):
        return torch.float64
    return torch.float32


def resize(x: Tensor, out_sizes: list[int], scales: list[float], axes: list[int],
           roi: list[float] | None, p: dict[str, Any]) -> Tensor:
    """Separable N-D resize of x along `axes` to out_sizes (full rank) with per-axis scales (full rank)."""
    r = x.dim()
    dtype = x.dtype

    def axis_roi(a: int) -> tuple[float, float] | None:
        return None if roi is None else (roi[a], roi[r + a])

    def trivial(a: int) -> bool:
        ra = axis_roi(a)
        return (math.isclose(scales[a], 1.0) and out_sizes[a] == x.shape[a]
                and (ra is None or (math.isclose(ra[0], 0.0) and math.isclose(ra[1], 1.0))))

    todo = [a for a in axes if not trivial(a)]
    if not todo:
        return x
    if any(out_sizes[a] == 0 or x.shape[a] == 0 for a in todo):
        return x.new_empty([out_sizes[a] if a in todo else d for a, d in enumerate(x.shape)])
    keys = {a: (p["mode"], p["ctm"], p["nearest_mode"], p["antialias"], p["cubic_a"], p["exclude_outside"],
                out_sizes[a], x.shape[a], scales[a], axis_roi(a)) for a in todo}
    if p["mode"] == "nearest":
        lin, masks = _nearest_plan(tuple(keys.items()), tuple(x.shape), x.device)
        lo = min(todo)
        if lo == 2 and x.dim() == 4 and not masks and x.shape[1] > 1 \
                and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            # channels-last: gather whole pixels (C contiguous values each) and stay channels-last, instead
            # of copying to NCHW first and handing the next layer a tensor of the other layout
            n, c, h, w = x.shape
            pix = as_bits(x).permute(0, 2, 3, 1).reshape(n, h * w, c).index_select(1, lin.reshape(-1))
            return from_bits(pix.reshape(n, lin.shape[0], lin.shape[1], c).permute(0, 3, 1, 2), dtype)
        flat = as_bits(x).reshape(_prod(x.shape[:lo]), _prod(x.shape[lo:]))
        y = flat.index_select(1, lin.reshape(-1)).reshape(list(x.shape[:lo]) + list(lin.shape))
        return from_bits(_extrapolate(y, masks, p["extrapolation_value"]) if masks else y, dtype)
    if _torch_interp_ok(x, todo, scales, out_sizes, p):
        return _torch_interp(x, todo, scales, out_sizes, p)
    cdt = _compute_dtype(dtype)
    y = x.to(cdt)
    masks = {}
    for a in todo:
        taps, w, mask = _axis_plan(keys[a], x.device, cdt)
        y = _interp_axis(y, a, taps, w)  # type: ignore[arg-type]
        if mask is not None:
            masks[a] = mask
    y = _extrapolate(y, masks, p["extrapolation_value"])
    if dtype.is_floating_point:
        return y.to(dtype)
    info = torch.iinfo(dtype)
    return y.round().clamp(info.min, info.max).to(dtype)


@functools.lru_cache(maxsize=256)
def _nearest_plan(keys: tuple[tuple[int, AxisKey], ...], shape: tuple[int, ...],
                  device: torch.device) -> tuple[Tensor, dict[int, Tensor]]:
    """Linear source offsets into the trailing block from the first resized axis: one index_select does
    the whole nearest resize. Also the extrapolation masks of the resized axes."""
    index, masks = {}, {}
    for a, key in keys:
        index[a], _, mask = _axis_plan(key, device, torch.float64)
        if mask is not None:
            masks[a] = mask
    lin = torch.zeros((), dtype=torch.int64, device=device)
    for a in range(min(index), len(shape)):
        idx = index.get(a)
        if idx is None:
            idx = torch.arange(shape[a], device=device)
        lin = lin[..., None] * shape[a] + idx
    return lin, masks


def _torch_interp_ok(x: Tensor, todo: list[int], scales: list[float], out_sizes: list[int],
                     p: dict[str, Any]) -> bool:
    """Whether aten's upsample kernels compute exactly the ONNX result for this configuration."""
    r = x.dim()
    if not x.dtype.is_floating_point or x.dtype.itemsize == 1 or p["antialias"] or not todo or min(todo) < 2:
        return False
    if p["mode"] == "cubic":
        if r != 4 or p["exclude_outside"] or p["cubic_a"] != -0.75:
            return False
    elif p["mode"] != "linear" or not 3 <= r <= 5:
        return False
    if p["ctm"] == "pytorch_half_pixel":
        return all(out_sizes[d] > 1 for d in todo)
    if p["ctm"] == "align_corners":
        return all(scales[d] * x.shape[d] == out_sizes[d] for d in todo)
    return p["ctm"] == "half_pixel"


def _torch_interp(x: Tensor, todo: list[int], scales: list[float], out_sizes: list[int],
                  p: dict[str, Any]) -> Tensor:
    """aten's upsample kernels take both the output size and the ONNX scales (used as 1/scale)."""
    if p["mode"] == "cubic":
        kernel = torch.ops.aten.upsample_bicubic2d
    else:
        kernel = {3: torch.ops.aten.upsample_linear1d, 4: torch.ops.aten.upsample_bilinear2d,
                  5: torch.ops.aten.upsample_trilinear3d}[x.dim()]
    factors = [scales[d] if d in todo else 1.0 for d in range(2, x.dim())]
    return kernel(dense(x), out_sizes[2:], p["ctm"] == "align_corners", *factors)


def _resize_params(node: Node) -> dict[str, Any]:
    legacy = node.op_type == "Upsample" or node.opset < 11
    mode = node.attr("mode", "nearest")
    return {
        "mode": "linear" if mode in ("bilinear", "trilinear") else mode,
        "ctm": "asymmetric" if legacy else node.attr("coordinate_transformation_mode", "half_pixel"),
        "nearest_mode": "simple" if legacy else node.attr("nearest_mode", "round_prefer_floor"),
        "cubic_a": node.attr("cubic_coeff_a", -0.75),
        "exclude_outside": bool(node.attr("exclude_outside", 0)),
        "extrapolation_value": node.attr("extrapolation_value", 0.0),
        "antialias": bool(node.attr("antialias", 0)),
    }


def _check_resize(node: Node) -> None:
    p = _resize_params(node)
    at = f"node '{node.name}': {node.op_type}"
    if p["mode"] not in ("nearest", "linear", "cubic"):
        raise UnsupportedOpError(f"{at} mode {node.attr('mode')!r} is not supported")
    if p["ctm"] not in _CTMS:
        raise UnsupportedOpError(f"{at} coordinate_transformation_mode {p['ctm']!r} is not supported")
    if p["nearest_mode"] not in _NEAREST + ("simple",):
        raise UnsupportedOpError(f"{at} nearest_mode {p['nearest_mode']!r} is not supported")
    policy = node.attr("keep_aspect_ratio_policy", "stretch")
    if policy not in ("stretch", "not_larger", "not_smaller"):
        raise UnsupportedOpError(f"{at} keep_aspect_ratio_policy {policy!r} is not supported")
    scales, sizes = node.input(2), node.input(3)
    if node.op_type == "Resize" and sizes is not None and scales is not None and _nonempty(scales):
        raise UnsupportedOpError(f"{at} takes scales or sizes, not both")


def _nonempty(v: Any) -> bool:
    """A value not known to be an empty tensor (a constant, or a type with no zero dim)."""
    if v.const is not None:
        return v.const.numel() > 0
    shape = v.type.shape
    return shape is None or 0 not in shape


def _scaled(d: Any, scale: float) -> Any:
    """floor(d * scale) for a symbolic dim, as a derived dim (kiln.ir.dims) where the float32 scale is exactly a
    fraction p/q with a small denominator (2.0, 0.5, 1.5): (d * p) // q; else unknown."""
    import fractions

    import sympy
    from torch.utils._sympy.functions import FloorDiv

    from kiln.ir.dims import DimExpr, sym
    if d is None or not scale > 0:
        return None
    f = fractions.Fraction(scale)
    if f.denominator > 1024:
        return None
    e = d.expr if isinstance(d, DimExpr) else sym(d)
    return DimExpr.make(FloorDiv(e * f.numerator, sympy.Integer(f.denominator)) if f.denominator > 1
                        else e * f.numerator)


@register
class Resize(OpDef):
    op_type = "Resize"
    opsets = (10, 28)
    value_inputs = (1, 2, 3)

    def check(self, node: Node) -> None:
        _check_resize(node)

    def infer(self, node: Node, types: Sequence[TensorType | None],
              consts: Sequence[Tensor | None]) -> list[TensorType]:
        """With dynamic dims, per axis from the op's definition: an axis resized to a given size is that
        size; one scaled by exactly 1 keeps the input's dim; a static axis scaled by s is computed (it
        depends on that axis only); a dynamic axis scaled by s != 1 is unknown. keep_aspect_ratio_policy
        couples the resized axes, which then are unknown when any input dim is."""
        from kiln.ops.infer import infer_by_meta
        x = types[0] if types else None
        if x is None or x.shape is None or all(isinstance(d, int) for d in x.shape):
            return infer_by_meta(self, node, types, consts)
        r = len(x.shape)
        if node.opset >= 11 and len(node.inputs) > 3 and node.input(3) is not None and consts[3] is None \
                and node.attr("keep_aspect_ratio_policy", "stretch") == "stretch":
            from kiln.ops.shape_values import shape_entries
            e = shape_entries(node.input(3))  # sizes a shape chain computes (Concat(Shape(x)[:2], [224, 224]))
            try:
                axes = [norm_axis(a, r) for a in node.attr("axes") or range(r)]
            except Exception:
                return [TensorType(x.dtype, (None,) * r)]
            if e is not None and not e[1] and len(e[0]) == len(axes) \
                    and not any(isinstance(d, int) and d < 0 for d in e[0]):
                at = dict(zip(axes, e[0]))
                return [TensorType(x.dtype, tuple(at.get(a, d) for a, d in enumerate(x.shape)))]
        probe = TensorType(x.dtype, tuple(d if isinstance(d, int) else 4099 for d in x.shape))
        (o,) = infer_by_meta(self, node, [probe, *types[1:]], consts)[:1]
        if o.shape is None or len(o.shape) != r:
            return [TensorType(o.dtype or x.dtype, (None,) * r)]
        rest = list(consts[1:]) + [None] * 3
        scales_t, sizes_t = (rest[0], None) if node.opset < 11 else (rest[1], rest[2])
        sizes = optional_ints(sizes_t) if sizes_t is not None else None
        try:
            axes = [norm_axis(a, r) for a in node.attr("axes") or range(r)]
        except Exception:
            return [TensorType(o.dtype, (None,) * r)]
        coupled = node.attr("keep_aspect_ratio_policy", "stretch") != "stretch"
        scales = [1.0] * r
        if not sizes and scales_t is not None and scales_t.numel():
            for i, a in enumerate(axes):
                scales[a] = float(scales_t.reshape(-1)[i])
        dims: list[Any] = []
        for a, d in enumerate(x.shape):
            if a not in axes or (not sizes and scales[a] == 1.0):
                dims.append(d)
            elif sizes:
                dims.append(None if coupled else o.shape[a])
            else:
                dims.append(o.shape[a] if isinstance(d, int) else _scaled(d, scales[a]))
        return [TensorType(o.dtype, tuple(dims))]

    def compute(self, node: Node, x: Tensor, *rest: Tensor | None) -> Tensor:
        if node.opset < 11:
            roi_t, scales_t, sizes_t = None, rest[0], None
        else:
            roi_t, scales_t, sizes_t = (tuple(rest) + (None, None, None))[:3]
        p = _resize_params(node)
        r = x.dim()
        axes = [norm_axis(a, r) for a in node.attr("axes") or range(r)]
        full_roi = None
        if roi_t is not None and roi_t.numel() and p["ctm"] == "tf_crop_and_resize":
            vals = [float(v) for v in roi_t.reshape(-1).tolist()]
            full_roi = [0.0] * r + [1.0] * r
            for i, a in enumerate(axes):
                full_roi[a], full_roi[r + a] = vals[i], vals[len(axes) + i]
        in_shape = list(x.shape)
        scales = [1.0] * r
        out = list(in_shape)
        sizes = optional_ints(sizes_t)
        if sizes is not None and scales_t is not None and scales_t.numel():
            raise UnsupportedOpError(f"node '{node.name}': Resize takes scales or sizes, not both")
        if sizes is not None:
            for i, a in enumerate(axes):
                out[a] = sizes[i]
                scales[a] = sizes[i] / in_shape[a]
            policy = node.attr("keep_aspect_ratio_policy", "stretch")
            if policy != "stretch":
                s = (min if policy == "not_larger" else max)(scales[a] for a in axes)
                for a in axes:
                    scales[a] = s
                    out[a] = int(s * in_shape[a] + 0.5)
        else:
            if scales_t is None or scales_t.numel() == 0:
                raise ValueError(f"node '{node.name}': Resize needs scales or sizes")
            vals = [float(v) for v in scales_t.reshape(-1).tolist()]
            for i, a in enumerate(axes):
                scales[a] = vals[i]
            out = [int(s * d) for s, d in zip(scales, in_shape)]
        return resize(x, out, scales, axes, full_roi, p)


@register
class Upsample(OpDef):
    op_type = "Upsample"
    opsets = (7, 9)
    value_inputs = (1,)

    def check(self, node: Node) -> None:
        _check_resize(node)

    def compute(self, node: Node, x: Tensor, scales_t: Tensor | None = None) -> Tensor:
        if node.opset >= 9:
            scales = [float(v) for v in scales_t.reshape(-1).tolist()]  # type: ignore[union-attr]
        else:
            scales = [float(v) for v in node.attr("scales")]
        out = [int(s * d) for s, d in zip(scales, x.shape)]
        return resize(x, out, scales, list(range(x.dim())), None, _resize_params(node))
