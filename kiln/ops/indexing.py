"""Indexing ops: Slice, Gather, GatherElements, GatherND, ScatterND, ScatterElements, Scatter,
TensorScatter, NonZero, OneHot, Compress, ReverseSequence, Unique."""
from __future__ import annotations

from typing import Sequence

import torch

from kiln.errors import UnsupportedOpError
from kiln.ir.dtype import DType
from kiln.ir.graph import Node
from kiln.ir.types import TensorType
from kiln.ops.registry import OpDef, ints, norm_axis, register
from kiln.ops.shape import as_bits, from_bits, wide_dtype

Tensor = torch.Tensor


def _is_host(t: Tensor) -> bool:
    """A real tensor in CPU memory (not meta, not a fake tensor of type inference, not on a device), whose
    values can be read without a device sync."""
    return type(t) is torch.Tensor and t.device.type == "cpu"


def _fix_negative(idx: Tensor, size: int | Tensor) -> Tensor:
    """Indices with negative entries counted from the end (out-of-range ones stay out of range)."""
    idx = idx.to(torch.int64)
    if _is_host(idx) and (idx.numel() == 0 or int(idx.min()) >= 0):
        return idx  # nothing to wrap: one reduction read on the host instead of three torch ops
    return torch.where(idx < 0, idx + size, idx)


# ---- Slice -------------------------------------------------------------------------------------

def slice_tensor(x: Tensor, starts: list[int], ends: list[int], axes: list[int], steps: list[int]) -> Tensor:
    """ONNX Slice semantics: clamped starts/ends, negative steps."""
    r = x.dim()
    out = x
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = norm_axis(axis, r)
        dim = x.shape[axis]
        start = start + dim if start < 0 else start
        end = end + dim if end < 0 else end
        # sym_min/sym_max: plain min/max on ints; on symbolic sizes (kiln.ops.symbolic) an expression
        if step > 0:
            start, end = torch.sym_min(torch.sym_max(start, 0), dim), torch.sym_min(torch.sym_max(end, 0), dim)
            out = out[(slice(None),) * axis + (slice(start, torch.sym_max(start, end), step),)]
        elif step < 0:
            start, end = torch.sym_min(torch.sym_max(start, 0), dim - 1), torch.sym_min(torch.sym_max(end, -1), dim - 1)
            idx = torch.arange(start, end, step, device=x.device)
            out = from_bits(as_bits(out).index_select(axis, idx), x.dtype)
        else:
            raise ValueError("Slice step cannot be 0")
    return out


@register
class Slice(OpDef):
    op_type = "Slice"
    value_inputs = (1, 2, 3, 4)

    def compute(self, node: Node, x: Tensor, starts: Tensor | None = None, ends: Tensor | None = None,
                axes: Tensor | None = None, steps: Tensor | None = None) -> Tensor:
        if node.opset < 10:
            st, en = list(node.attr("starts")), list(node.attr("ends"))
            ax = list(node.attr("axes") or range(len(st)))
            sp = [1] * len(st)
        else:
            st, en = ints(starts), ints(ends)
            ax = ints(axes) if axes is not None else list(range(len(st)))
            sp = ints(steps) if steps is not None else [1] * len(st)
        return slice_tensor(x, st, en, ax, sp)


# ---- Gather family ---------------------------------------------------------------------------------

@register
class Gather(OpDef):
    op_type = "Gather"

    def compute(self, node: Node, x: Tensor, indices: Tensor) -> Tensor:
        axis = norm_axis(node.attr("axis", 0), x.dim())
        idx = _fix_negative(indices, x.shape[axis])
        out = from_bits(as_bits(x).index_select(axis, idx.reshape(-1)), x.dtype)
        return out.reshape([*x.shape[:axis], *indices.shape, *x.shape[axis + 1:]])


@register
class GatherElements(OpDef):
    op_type = "GatherElements"
    opsets = (11, 28)

    def compute(self, node: Node, x: Tensor, indices: Tensor) -> Tensor:
        axis = norm_axis(node.attr("axis", 0), x.dim())
        idx = _fix_negative(indices, x.shape[axis])
        return from_bits(torch.gather(as_bits(x), axis, idx), x.dtype)


def _nd_linear(indices: Tensor, dims: Sequence[int]) -> Tensor:
    """Row-major linear offsets of the index tuples in indices[..., k] into a block of shape dims."""
    lin: Tensor | None = None
    for j, d in enumerate(dims):
        ij = _fix_negative(indices[..., j], d)
        lin = ij if lin is None else lin * d + ij
    return torch.zeros(indices.shape[:-1], dtype=torch.int64, device=indices.device) if lin is None else lin


@register
class GatherND(OpDef):
    op_type = "GatherND"
    opsets = (11, 28)

    def compute(self, node: Node, x: Tensor, indices: Tensor) -> Tensor:
        b = node.attr("batch_dims", 0)
        k = indices.shape[-1]
        bshape, rest = list(x.shape[:b]), list(x.shape[b + k:])
        nb = 1
        for d in bshape:
            nb *= d
        lin = _nd_linear(indices.reshape(nb, -1, k), x.shape[b:b + k])
        if b == 0:  # one gather of rows (index_select checks each offset against the block)
            out = as_bits(x).reshape(_numel(x.shape[:k]), *rest).index_select(0, lin.reshape(-1))
        else:
            data = as_bits(x).reshape(nb, _numel(x.shape[b:b + k]), *rest)
            out = data[torch.arange(nb, device=x.device)[:, None], lin]
        return from_bits(out.reshape([*bshape, *indices.shape[b:-1], *rest]), x.dtype)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# ---- Scatter family --------------------------------------------------------------------------------

_REDUCE = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}


def _scatter(data: Tensor, axis: int, index: Tensor, updates: Tensor, reduction: str, node: Node) -> Tensor:
    """torch scatter along axis with ONNX reduction semantics; every element type."""
    if reduction == "none":
        return from_bits(as_bits(data).scatter(axis, index, as_bits(updates)), data.dtype)
    if reduction not in _REDUCE:
        raise UnsupportedOpError(f"node '{node.name}': {node.op_type} reduction {reduction!r} is not supported")
    work = torch.int64 if data.dtype == torch.bool else wide_dtype(data.dtype, node)
    out = data.to(work).scatter_reduce(axis, index, updates.to(work), _REDUCE[reduction], include_self=True)
    return out.to(data.dtype)


@register
class ScatterElements(OpDef):
    op_type = ("ScatterElements", "Scatter")
    opsets = (9, 28)

    def compute(self, node: Node, x: Tensor, indices: Tensor, updates: Tensor) -> Tensor:
        axis = norm_axis(node.attr("axis", 0), x.dim())
        idx = _fix_negative(indices, x.shape[axis])
        return _scatter(x, axis, idx, updates, node.attr("reduction", "none"), node)


@register
class ScatterND(OpDef):
    op_type = "ScatterND"
    opsets = (11, 28)

    def compute(self, node: Node, x: Tensor, indices: Tensor, updates: Tensor) -> Tensor:
        k = indices.shape[-1]
        lead, rest = _numel(x.shape[:k]), _numel(x.shape[k:])
        lin = _nd_linear(indices, x.shape[:k]).reshape(-1, 1)
        upd = updates.reshape(-1, rest)
        out = _scatter(x.reshape(lead, rest), 0, lin.expand(upd.shape), upd, node.attr("reduction", "none"), node)
        return out.reshape(x.shape)


@register
class TensorScatter(OpDef):
    op_type = "TensorScatter"
    opsets = (24, 28)

    def check(self, node: Node) -> None:
        if node.attr("mode", "linear") not in ("linear", "circular"):
            raise UnsupportedOpError(f"node '{node.name}': TensorScatter mode {node.attr('mode')!r} is not supported")

    def compute(self, node: Node, past: Tensor, update: Tensor, write_indices: Tensor | None = None) -> Tensor:
        r = past.dim()
        axis = norm_axis(node.attr("axis", -2), r)
        batch, seq, max_seq = past.shape[0], update.shape[axis], past.shape[axis]
        if write_indices is None:
            start = torch.zeros(batch, dtype=torch.int64, device=past.device)
        else:
            start = write_indices.to(torch.int64)
        pos = start[:, None] + torch.arange(seq, device=past.device)[None, :]
        if node.attr("mode", "linear") == "circular":
            pos = torch.remainder(pos, max_seq)
        view = [1] * r
        view[0], view[axis] = batch, seq
        index = pos.reshape(view).expand(update.shape)
        return from_bits(as_bits(past).scatter(axis, index, as_bits(update)), past.dtype)


# ---- Data-dependent shapes -------------------------------------------------------------------------

def _const_or_none(consts: Sequence[Tensor | None], i: int) -> Tensor | None:
    return consts[i] if i < len(consts) else None


@register
class NonZero(OpDef):
    op_type = "NonZero"
    opsets = (9, 28)

    def compute(self, node: Node, x: Tensor) -> Tensor:
        if x.dtype in (torch.uint16, torch.uint32, torch.uint64):
            x = x != 0
        elif x.dtype.is_floating_point and x.dtype.itemsize == 1:
            x = x.to(torch.float32)
        return torch.nonzero(x).t().contiguous()

    def infer(self, node: Node, types: Sequence[TensorType | None],
              consts: Sequence[Tensor | None]) -> list[TensorType]:
        c = _const_or_none(consts, 0)
        if c is not None:
            out = self.compute(node, c)
            return [TensorType(DType.INT64, tuple(out.shape))]
        t = types[0]
        rank = t.rank if t is not None else None
        return [TensorType(DType.INT64, None if rank is None else (rank, None))]


@register
class Compress(OpDef):
    op_type = "Compress"
    opsets = (9, 28)

    def compute(self, node: Node, x: Tensor, condition: Tensor) -> Tensor:
        axis = node.attr("axis")
        if axis is None:
            x, axis = x.reshape(-1), 0
        axis = norm_axis(axis, x.dim())
        cond = condition.reshape(-1).to(torch.bool)[: x.shape[axis]]
        return from_bits(as_bits(x).index_select(axis, torch.nonzero(cond).reshape(-1)), x.dtype)

    def infer(self, node: Node, types: Sequence[TensorType | None],
              consts: Sequence[Tensor | None]) -> list[TensorType]:
        t = types[0]
        dtype = t.dtype if t is not None else None
        axis = node.attr("axis")
        if axis is None:
            return [TensorType(dtype, (None,))]
        if t is None or t.shape is None:
            return [TensorType(dtype, None)]
        shape = list(t.shape)
        a = norm_axis(axis, len(shape))
        cond = _const_or_none(consts, 1)
        if cond is None or not isinstance(shape[a], int):
            shape[a] = None
        else:
            shape[a] = int(cond.reshape(-1)[: shape[a]].to(torch.bool).sum())
        return [TensorType(dtype, tuple(shape))]


@register
class Unique(OpDef):
    op_type = "Unique"
    opsets = (11, 28)

    def compute(self, node: Node, x: Tensor) -> tuple[Tensor, ...]:
        axis = node.attr("axis")
        src = x if axis is not None else x.reshape(-1)
        a = 0 if axis is None else norm_axis(axis, x.dim())
        work = src.to(wide_dtype(x.dtype, node))
        y, inverse, counts = torch.unique(work, sorted=True, return_inverse=True, return_counts=True, dim=a)
        n = counts.shape[0]
        length = src.shape[a]
        pos = torch.arange(length, device=x.device)
        first = torch.full((n,), length, dtype=torch.int64, device=x.device).scatter_reduce(
            0, inverse, pos, "amin", include_self=True)
        if not node.attr("sorted", 1):
            order = torch.argsort(first)
            rank = torch.empty_like(order).scatter_(0, order, torch.arange(n, device=x.device))
            first, counts, inverse = first[order], counts[order], rank[inverse]
        y = from_bits(as_bits(src).index_select(a, first), x.dtype)
        outs = (y, first, inverse.reshape(-1), counts)
        return outs[: max(1, len(node.outputs))]

    def infer(self, node: Node, types: Sequence[TensorType | None],
              consts: Sequence[Tensor | None]) -> list[TensorType]:
        t = types[0]
        dtype = t.dtype if t is not None else None
        axis = node.attr("axis")
        if axis is None or t is None or t.shape is None:
            y = TensorType(dtype, (None,) if axis is None else None)
        else:
            shape = list(t.shape)
            shape[norm_axis(axis, len(shape))] = None
            y = TensorType(dtype, tuple(shape))
        inv = None
        if t is not None and t.shape is not None:
            if axis is None:
                inv = t.numel()
            else:
                inv = t.shape[norm_axis(axis, len(t.shape))]
        return [y, TensorType(DType.INT64, (None,)), TensorType(DType.INT64, (inv,)),
                TensorType(DType.INT64, (None,))][: len(node.outputs)]


# ---- OneHot / ReverseSequence ----------------------------------------------------------------------

@register
class OneHot(OpDef):
    op_type = "OneHot"
    opsets = (9, 28)
    value_inputs = (1,)

    def compute(self, node: Node, indices: Tensor, depth: Tensor, values: Tensor) -> Tensor:
        d = ints(depth)[0]
        idx = indices.to(torch.float64).trunc().to(torch.int64) if indices.dtype.is_floating_point \
            else indices.to(torch.int64)
        idx = torch.where(idx < 0, idx + d, idx)
        hot = idx.unsqueeze(-1) == torch.arange(d, device=indices.device)
        vals = as_bits(values.reshape(-1))
        out = torch.where(hot, vals[1], vals[0])
        axis = norm_axis(node.attr("axis", -1), indices.dim() + 1)
        return from_bits(out.movedim(-1, axis), values.dtype)


@register
class ReverseSequence(OpDef):
    op_type = "ReverseSequence"
    opsets = (10, 28)

    def compute(self, node: Node, x: Tensor, lens: Tensor) -> Tensor:
        b_axis, t_axis = node.attr("batch_axis", 1), node.attr("time_axis", 0)
        steps = x.shape[t_axis]
        t = torch.arange(steps, device=x.device)[None, :]
        ln = lens.to(torch.int64)[:, None]
        src = torch.where(t < ln, ln - 1 - t, t)  # (batch, time)
        if t_axis < b_axis:
            src = src.t()
        view = [1] * x.dim()
        view[b_axis], view[t_axis] = x.shape[b_axis], steps
        index = src.reshape(view).expand(x.shape)
        return from_bits(torch.gather(as_bits(x), t_axis, index), x.dtype)
