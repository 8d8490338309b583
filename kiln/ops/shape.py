"""Shape and layout ops: Reshape, Transpose, Concat, Split, Tile, Expand, Pad, Squeeze, Unsqueeze,
Flatten, DepthToSpace, SpaceToDepth, Shape, Size, Trilu, CenterCropPad, Col2Im (Resize and Upsample:
kiln/ops/resize.py).

Pure data movement is done on a same-width signed integer view for the element types (unsigned
ints, float8) for which torch lacks gather/scatter kernels; see `as_bits` / `from_bits`.
"""
from __future__ import annotations

import math

from typing import Any, Sequence

import torch

from kiln.errors import UnsupportedDTypeError, UnsupportedOpError
from kiln.ir.dims import DimExpr, sym
from kiln.ir.dtype import DType
from kiln.ir.graph import Node, Value
from kiln.ir.types import TensorType
from kiln.ops.registry import OpDef, ints, norm_axis, register, require

Tensor = torch.Tensor

_BITS: dict[torch.dtype, torch.dtype] = {
    torch.uint16: torch.int16, torch.uint32: torch.int32, torch.uint64: torch.int64,
    torch.float8_e4m3fn: torch.int8, torch.float8_e4m3fnuz: torch.int8,
    torch.float8_e5m2: torch.int8, torch.float8_e5m2fnuz: torch.int8,
}


def as_bits(x: Tensor) -> Tensor:
    """A view of x whose element type torch can gather/scatter/copy (bit-exact)."""
    bits = _BITS.get(x.dtype)
    return x if bits is None else x.view(bits)


def from_bits(y: Tensor, dtype: torch.dtype) -> Tensor:
    """Inverse of as_bits."""
    return y if y.dtype == dtype else y.view(dtype)


def wide_dtype(dtype: torch.dtype, node: Node) -> torch.dtype:
    """A dtype in which torch can do arithmetic/comparisons that is exact for values of `dtype`."""
    if dtype in (torch.uint16, torch.uint32, torch.uint64):
        return torch.int64
    if dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2, torch.float8_e5m2fnuz,
                 torch.float16, torch.bfloat16):
        return torch.float32
    if dtype.is_complex:
        raise UnsupportedDTypeError(f"node '{node.name}': {node.op_type} does not support {dtype}")
    return dtype


def optional_ints(t: Tensor | None) -> list[int] | None:
    """Host ints of an optional shape-like input; None when omitted or empty."""
    if t is None or t.numel() == 0:
        return None
    return ints(t)


def _prod(xs: Sequence[int]) -> int:
    p = 1
    for v in xs:
        p = p * v  # ints at run time; symbolic sizes while types are inferred (kiln.ops.symbolic)
    return p


# ---- Reshape / Transpose / Concat / Split ---------------------------------------------------------

def _derived(have: list[int | str | None], other: list[int | str | None]) -> int | str | None:
    """A Reshape's -1 entry: the input's element count over the other entries', where the symbols cancel
    ([batch, seq, 768] to [batch, seq, -1, 64]: 12), else None."""
    if any(d is None for d in have + other):
        return None
    if any(isinstance(d, DimExpr) for d in have + other):
        return _derived_expr(have, other)
    left = [d for d in have if isinstance(d, str)]
    for d in other:
        if isinstance(d, str):
            if d not in left:
                return _derived_expr(have, other)
            left.remove(d)
    n = math.prod(d for d in have if isinstance(d, int))
    m = math.prod(d for d in other if isinstance(d, int))
    if m <= 0 or n % m:
        return None
    if not left:
        return n // m
    return left[0] if len(left) == 1 and n == m else _derived_expr(have, other)


def _derived_expr(have: list[Any], other: list[Any]) -> Any:
    """_derived where derived dims take part: the quotient of the two products when it is a polynomial with
    integer coefficients (exact for every value of the symbols), else None."""
    import sympy

    def expr(d: Any) -> Any:
        return sympy.Integer(d) if isinstance(d, int) else d.expr if isinstance(d, DimExpr) else sym(d)
    q = sympy.cancel(math.prod((expr(d) for d in have), start=sympy.Integer(1))
                     / math.prod((expr(d) for d in other), start=sympy.Integer(1)))
    num, den = sympy.fraction(q)
    if den != 1 or not all(a.is_Integer for a in num.atoms(sympy.Rational)):
        return None
    return DimExpr.make(sympy.expand(num))


@register
class Reshape(OpDef):
    op_type = "Reshape"
    value_inputs = (1,)

    def compute(self, node: Node, x: Tensor, shape: Tensor | None = None) -> Tensor:
        dims = ints(shape) if node.opset >= 5 else list(node.attr("shape", []))
        if not node.attr("allowzero", 0):
            dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
        return x.reshape(dims)

    def infer(self, node: Node, types: Sequence[TensorType | None],
              consts: Sequence[Tensor | None]) -> list[TensorType]:
        """A target only known at run time still fixes the element type (x's) and the rank (its length)."""
        from kiln.ops.infer import infer_by_meta
        target = types[1] if len(types) > 1 else None
        if node.opset < 5 or (len(consts) > 1 and consts[1] is not None) or target is None:
            return infer_by_meta(self, node, types, consts)
        x = types[0]
        rank = target.shape[0] if target.shape is not None and len(target.shape) == 1 else None
        dims: tuple[int | str | None, ...] | None = (None,) * rank if isinstance(rank, int) else None
        from kiln.ops.shape_values import shape_entries
        e = shape_entries(node.input(1))
        if e is not None and not e[1] and (rank is None or len(e[0]) == rank):
            # a target a shape chain computes: its entries are the output's dims (0 copies x's, -1 is derived)
            xs = x.shape if x is not None and x.shape is not None and len(x.shape) >= len(e[0]) else None
            copies = not node.attr("allowzero", 0)

            def dim(i: int, d: int | str | None) -> int | str | None:
                if d == 0 and copies:
                    return xs[i] if xs is not None else None
                return None if d == -1 else d
            dims = tuple(dim(i, d) for i, d in enumerate(e[0]))
            if list(e[0]).count(-1) == 1 and x is not None and x.shape is not None:
                k = list(e[0]).index(-1)
                dims = dims[:k] + (_derived(list(x.shape), [d for i, d in enumerate(dims) if i != k]),) + dims[k + 1:]
        return [TensorType(x.dtype if x is not None else None, dims)]


@register
class Transpose(OpDef):
    op_type = "Transpose"

    def compute(self, node: Node, x: Tensor) -> Tensor:
        perm = node.attr("perm") or list(range(x.dim() - 1, -1, -1))
        return x.permute([norm_axis(p, x.dim()) for p in perm])


@register
class Concat(OpDef):
    op_type = "Concat"

    def compute(self, node: Node, *xs: Tensor) -> Tensor:
        parts = [x for x in xs if x is not None]
        axis = norm_axis(node.attr("axis", 1), parts[0].dim())
        return torch.cat(parts, dim=axis)


def split_sizes(node: Node, dim: int, split: list[int] | None, n_out: int) -> list[int]:
    """Chunk sizes for Split: explicit, by num_outputs (last chunk smaller), or equal parts."""
    if split:
        return split
    num = node.attr("num_outputs")
    if num:
        chunk = -(-dim // num)
        return [chunk] * (num - 1) + [dim - chunk * (num - 1)]
    if dim % n_out:
        raise ValueError(f"node '{node.name}': cannot split dim {dim} into {n_out} equal parts")
    return [dim // n_out] * n_out


@register
class Split(OpDef):
    op_type = "Split"
    value_inputs = (1,)

    def compute(self, node: Node, x: Tensor, split: Tensor | None = None) -> tuple[Tensor, ...]:
        axis = norm_axis(node.attr("axis", 0), x.dim())
        if node.opset >= 13 or (node.opset < 2 and split is not None):
            sizes = optional_ints(split)
        else:
            sizes = list(node.attr("split") or []) or None
        sizes = split_sizes(node, x.shape[axis], sizes, len(node.outputs))
        return tuple(torch.split(x, sizes, dim=axis))


# ---- Tile / Expand / Squeeze / Unsqueeze / Flatten ------------------------------------------------

@register
class Tile(OpDef):
    op_type = "Tile"
    value_inputs = (1, 2)

    def compute(self, node: Node, x: Tensor, repeats: Tensor, axis: Tensor | None = None) -> Tensor:
        if node.opset < 6:
            reps = [1] * x.dim()
            reps[norm_axis(ints(axis)[0], x.dim())] = ints(repeats)[0]
        else:
            reps = ints(repeats)
        return from_bits(as_bits(x).repeat(*reps), x.dtype) if reps else x


@register
class Expand(OpDef):
    op_type = "Expand"
    value_inputs = (1,)

    def compute(self, node: Node, x: Tensor, shape: Tensor) -> Tensor:
        out = torch.broadcast_shapes(tuple(x.shape), tuple(ints(shape)))
        return from_bits(as_bits(x).expand(out).contiguous(), x.dtype)


@register
class Squeeze(OpDef):
    op_type = "Squeeze"
    value_inputs = (1,)

    def compute(self, node: Node, x: Tensor, axes: Tensor | None = None) -> Tensor:
        ax = optional_ints(axes) if node.opset >= 13 else node.attr("axes")
        if not ax:
            return x.reshape([d for d in x.shape if d != 1])
        ax = sorted({norm_axis(a, x.dim()) for a in ax})
        for a in ax:
            require(x.shape[a] == 1, lambda: f"node '{node.name}': cannot squeeze axis {a} of size {x.shape[a]}")
        return x.reshape([d for i, d in enumerate(x.shape) if i not in ax])


@register
class Unsqueeze(OpDef):
    op_type = "Unsqueeze"
    value_inputs = (1,)

    def compute(self, node: Node, x: Tensor, axes: Tensor | None = None) -> Tensor:
        ax = ints(axes) if node.opset >= 13 else list(node.attr("axes", []))
        rank = x.dim() + len(ax)
        shape = list(x.shape)
        for a in sorted(norm_axis(a, rank) for a in ax):
            shape.insert(a, 1)
        return x.reshape(shape)


@register
class Flatten(OpDef):
    op_type = "Flatten"

    def compute(self, node: Node, x: Tensor) -> Tensor:
        axis = norm_axis(node.attr("axis", 1), x.dim())
        return x.reshape(_prod(x.shape[:axis]), _prod(x.shape[axis:]))


# ---- DepthToSpace / SpaceToDepth -------------------------------------------------------------------

@register
class DepthToSpace(OpDef):
    op_type = "DepthToSpace"

    def compute(self, node: Node, x: Tensor) -> Tensor:
        b = node.attr("blocksize")
        n, c, h, w = x.shape
        if node.attr("mode", "DCR") == "CRD":
            y = x.reshape(n, c // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
        else:
            y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
        return y.reshape(n, c // (b * b), h * b, w * b)


@register
class SpaceToDepth(OpDef):
    op_type = "SpaceToDepth"

    def compute(self, node: Node, x: Tensor) -> Tensor:
        b = node.attr("blocksize")
        n, c, h, w = x.shape
        y = x.reshape(n, c, h // b, b, w // b, b)
        if node.attr("mode", "DCR") == "CRD":
            y = y.permute(0, 1, 3, 5, 2, 4)
        else:
            y = y.permute(0, 3, 5, 1, 2, 4)
        return y.reshape(n, c * b * b, h // b, w // b)


# ---- Shape / Size / Trilu ------------------------------------------------------------------------

@register
class Shape(OpDef):
    op_type = "Shape"

    def compute(self, node: Node, x: Tensor) -> Tensor:
        r = x.dim()
        start = min(max(norm_axis(node.attr("start", 0), r), 0), r)
        end = node.attr("end")
        end = r if end is None else min(max(norm_axis(end, r), 0), r)
        return torch.tensor(list(x.shape[start:end]), dtype=torch.int64, device=x.device)

    def infer(self, node: Node, types: Sequence[TensorType | None],
              consts: Sequence[Tensor | None]) -> list[TensorType]:
        """A 1-D int64 tensor as long as the (sliced) rank: known whenever x's rank is."""
        t = types[0] if types else None
        if t is None or t.shape is None:
            return [TensorType(DType.INT64, (None,))]
        r = len(t.shape)
        start = min(max(norm_axis(node.attr("start", 0), r), 0), r)
        end = node.attr("end")
        end = r if end is None else min(max(norm_axis(end, r), 0), r)
        return [TensorType(DType.INT64, (max(end - start, 0),))]


@register
class Size(OpDef):
    op_type = "Size"

    def compute(self, node: Node, x: Tensor) -> Tensor:
        return torch.tensor(x.numel(), dtype=torch.int64, device=x.device)

    def infer(self, node: Node, types: Sequence[TensorType | None],
              consts: Sequence[Tensor | None]) -> list[TensorType]:
        return [TensorType(DType.INT64, ())]


@register
class Trilu(OpDef):
    op_type = "Trilu"
    opsets = (14, 28)
    value_inputs = (1,)

    def compute(self, node: Node, x: Tensor, k: Tensor | None = None) -> Tensor:
        kk = ints(k)[0] if k is not None else 0
        xb = as_bits(x)
        y = torch.triu(xb, kk) if node.attr("upper", 1) else torch.tril(xb, kk)
        return from_bits(y, x.dtype)


# ---- Pad / CenterCropPad ---------------------------------------------------------------------------

def pad_index(dim: int, begin: int, end: int, mode: str, device: torch.device) -> Tensor:
    i = torch.arange(-begin, dim + end, device=device)
    if mode == "edge" or (mode == "reflect" and dim == 1):
        return i.clamp(0, dim - 1)
    if mode == "wrap":
        return torch.remainder(i, dim)
    period = 2 * (dim - 1)
    j = torch.remainder(i, period)
    return torch.where(j >= dim, period - j, j)


def pad_tensor(x: Tensor, begins: list[int], ends: list[int], mode: str, value: Any = None) -> Tensor:
    """Pad (negative amounts crop) every axis of x; value is a scalar or a 0-d tensor for constant mode."""
    x = x[tuple(slice(max(-b, 0), d - max(-e, 0)) for b, e, d in zip(begins, ends, x.shape))]
    begins = [max(b, 0) for b in begins]
    ends = [max(e, 0) for e in ends]
    if mode == "constant":
        shape = [d + b + e for d, b, e in zip(x.shape, begins, ends)]
        xb = as_bits(x)
        if isinstance(value, Tensor):
            fill = as_bits(value.reshape(()).to(x.dtype))
            out = fill.expand(shape).clone()
        else:
            out = torch.zeros(shape, dtype=x.dtype, device=x.device)
            if value:
                out.fill_(value)
            out = as_bits(out)
        out[tuple(slice(b, b + d) for b, d in zip(begins, x.shape))] = xb
        return from_bits(out, x.dtype)
    if mode not in ("edge", "reflect", "wrap"):
        raise ValueError(f"unknown pad mode {mode!r}")
    y = as_bits(x)
    for axis, (b, e) in enumerate(zip(begins, ends)):
        if b or e:
            y = y.index_select(axis, pad_index(y.shape[axis], b, e, mode, y.device))
    return from_bits(y, x.dtype)


@register
class Pad(OpDef):
    op_type = "Pad"
    value_inputs = (1, 3)

    def check(self, node: Node) -> None:
        mode = node.attr("mode", "constant")
        if mode not in ("constant", "reflect", "edge", "wrap"):
            raise UnsupportedOpError(f"node '{node.name}': Pad mode {mode!r} is not supported")

    def infer(self, node: Node, types: Sequence[TensorType | None],
              consts: Sequence[Tensor | None]) -> list[TensorType]:
        """Every mode pads to the same shape; the constant mode's computation also runs on symbolic sizes
        (the others index with an arange over the padded length)."""
        from kiln.ops.infer import infer_by_meta
        if node.attr("mode", "constant") == "constant":
            out = infer_by_meta(self, node, types, consts)
        else:
            plain = Node("Pad", node.inputs, [Value(v.name) for v in node.outputs],
                         {**node.attrs, "mode": "constant"}, name=node.name, opset=node.opset)
            out = infer_by_meta(self, plain, types, consts)
        x = types[0] if types else None
        if out and out[0].shape is None and x is not None and x.shape is not None:
            # amounts known only at run time: the rank is x's, and so is each dim no amount touches
            out = [TensorType(out[0].dtype or x.dtype, self._untouched(node, x.shape))] + list(out[1:])
        return out

    @staticmethod
    def _untouched(node: Node, shape: tuple[Any, ...]) -> tuple[Any, ...]:
        """x's dims where the pads a shape chain holds are 0 at both ends of that axis; None elsewhere."""
        from kiln.ops.shape_values import shape_entries
        dims: list[Any] = [None] * len(shape)
        e = shape_entries(node.input(1)) if node.opset >= 11 and node.input(1) is not None else None
        axes_v = node.input(3) if node.opset >= 18 else None
        if e is None or e[1] or len(e[0]) != 2 * len(shape) or axes_v is not None:
            return tuple(dims)
        for k, d in enumerate(shape):
            if e[0][k] == 0 and e[0][len(shape) + k] == 0:
                dims[k] = d
        return tuple(dims)

    def compute(self, node: Node, x: Tensor, pads: Tensor | None = None, value: Tensor | None = None,
                axes: Tensor | None = None) -> Tensor:
        begins, ends, fill = pad_amounts(node, x.dim(), pads, value, axes)
        return pad_tensor(x, begins, ends, node.attr("mode", "constant"), fill)


def pad_amounts(node: Node, rank: int, pads: Tensor | None, value: Tensor | None,
                axes: Tensor | None) -> tuple[list[int], list[int], Any]:
    """A Pad's (begins, ends, fill) per axis of a rank-`rank` input, from its attributes (opset < 11) or its pads /
    constant_value / axes inputs; fill is None, a float or a 0-d tensor."""
    if node.opset < 11:
        raw = list(node.attr("paddings" if node.opset < 2 else "pads", []))
        fill: Any = node.attr("value", 0.0)
    else:
        raw = ints(pads)
        fill = value if value is not None and value.numel() else None
    ax = [norm_axis(a, rank) for a in ints(axes)] if axes is not None and node.opset >= 18 else list(range(rank))
    if len(raw) != 2 * len(ax):
        raise ValueError(f"node '{node.name}': Pad has {len(raw)} pads for {len(ax)} axes")
    begins, ends = [0] * rank, [0] * rank
    for i, a in enumerate(ax):
        begins[a], ends[a] = raw[i], raw[len(ax) + i]
    return begins, ends, fill


@register
class CenterCropPad(OpDef):
    op_type = "CenterCropPad"
    opsets = (18, 28)
    value_inputs = (1,)

    def compute(self, node: Node, x: Tensor, shape: Tensor) -> Tensor:
        r = x.dim()
        ax = [norm_axis(a, r) for a in node.attr("axes") or range(r)]
        begins, ends = [0] * r, [0] * r
        for a, target in zip(ax, ints(shape)):
            diff = target - x.shape[a]
            if diff < 0:
                begins[a], ends[a] = -((-diff) // 2), -((-diff) - (-diff) // 2)
            else:
                begins[a], ends[a] = diff // 2, diff - diff // 2
        return pad_tensor(x, begins, ends, "constant")


# ---- Col2Im --------------------------------------------------------------------------------------

@register
class Col2Im(OpDef):
    op_type = "Col2Im"
    opsets = (18, 28)
    value_inputs = (1, 2)

    def compute(self, node: Node, x: Tensor, image_shape: Tensor, block_shape: Tensor) -> Tensor:
        image, block = ints(image_shape), ints(block_shape)
        nd = len(image)
        dil = list(node.attr("dilations") or [1] * nd)
        strides = list(node.attr("strides") or [1] * nd)
        pads = list(node.attr("pads") or [0] * (2 * nd))
        padded = [image[d] + pads[d] + pads[nd + d] for d in range(nd)]
        nblocks = [(padded[d] - dil[d] * (block[d] - 1) - 1) // strides[d] + 1 for d in range(nd)]
        dev = x.device
        lin = torch.zeros((), dtype=torch.int64, device=dev)
        for d in range(nd):
            k = torch.arange(block[d], device=dev) * dil[d]
            pos = k[:, None] + torch.arange(nblocks[d], device=dev)[None, :] * strides[d]  # (K_d, L_d)
            view = [1] * (2 * nd)
            view[d], view[nd + d] = block[d], nblocks[d]
            lin = lin * padded[d] + pos.reshape(view)
        n = x.shape[0]
        c = x.shape[1] // _prod(block)
        src = x.reshape(n, c, -1)
        out = torch.zeros(n, c, _prod(padded), dtype=x.dtype, device=dev)
        out.index_add_(2, lin.reshape(-1), src)
        out = out.reshape(n, c, *padded)
        return out[(slice(None), slice(None)) + tuple(slice(pads[d], pads[d] + image[d]) for d in range(nd))]
