"""Reductions and scans: Reduce*, ArgMax/ArgMin, TopK, CumSum, CumProd.

Integer arithmetic runs in int64 and is cast back (wrapping, so exact for every integer type);
order-based ops on unsigned types use an order-preserving int64 key (`_ordered`), since torch
lacks max/argmax/sort kernels for several unsigned types.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from kiln.errors import UnsupportedDTypeError, UnsupportedOpError
from kiln.ir.dtype import DType
from kiln.ir.graph import Node
from kiln.ir.types import TensorType
from kiln.ops.registry import OpDef, ints, norm_axis, register

Tensor = torch.Tensor

_SIGN = -(1 << 63)
_FLOAT8 = (torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2, torch.float8_e5m2fnuz)

# opset from which `axes` is an input instead of an attribute
_AXES_INPUT_FROM = {"ReduceSum": 13}


def _is_int(t: Tensor) -> bool:
    return not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool


def _ordered(x: Tensor) -> Tensor:
    """A tensor with the same order as `x` on which torch implements max/argmax/sort."""
    if x.dtype == torch.uint64:
        return x.view(torch.int64) ^ _SIGN
    if x.dtype in (torch.uint16, torch.uint32, torch.bool):
        return x.to(torch.int64)
    return x


def _from_ordered(y: Tensor, dtype: torch.dtype) -> Tensor:
    if dtype == torch.uint64:
        return (y ^ _SIGN).view(torch.uint64)
    return y.to(dtype)


def reduce_axes(node: Node, x: Tensor, axes_in: Tensor | None) -> list[int]:
    """Normalized axes to reduce; [] means 'no reduction' (noop_with_empty_axes)."""
    if node.opset >= _AXES_INPUT_FROM.get(node.op_type, 18):
        axes = ints(axes_in)
    else:
        axes = [int(a) for a in node.attr("axes", [])]
    if not axes:
        return [] if node.attr("noop_with_empty_axes", 0) else list(range(x.dim()))
    rank = max(x.dim(), 1)
    for a in axes:
        if not -rank <= a < rank:
            raise UnsupportedOpError(f"node '{node.name}': axis {a} is out of range for rank {x.dim()}")
    return sorted({norm_axis(a, rank) for a in axes})


def _empty_fill(x: Tensor, dims: list[int], keep: bool, value: float | int | bool) -> Tensor:
    shape = [1 if d in dims else s for d, s in enumerate(x.shape)] if keep else \
        [s for d, s in enumerate(x.shape) if d not in dims]
    return torch.full(shape, value, dtype=x.dtype, device=x.device)


def _extreme(x: Tensor, dims: list[int], keep: bool, largest: bool) -> Tensor:
    if x.numel() == 0 or any(x.shape[d] == 0 for d in dims):
        if x.dtype == torch.bool:
            fill: float | int | bool = not largest
        elif x.is_floating_point():
            fill = -math.inf if largest else math.inf
        else:
            info = torch.iinfo(x.dtype)
            fill = info.min if largest else info.max
        return _empty_fill(x, dims, keep, fill)
    if x.dtype in _FLOAT8:
        return _extreme(x.float(), dims, keep, largest).to(x.dtype)
    k = _ordered(x)
    y = torch.amax(k, dim=dims, keepdim=keep) if largest else torch.amin(k, dim=dims, keepdim=keep)
    return _from_ordered(y, x.dtype)


def _sum(x: Tensor, dims: list[int], keep: bool) -> Tensor:
    if _is_int(x):
        return torch.sum(x.to(torch.int64), dim=dims, keepdim=keep).to(x.dtype)
    return torch.sum(x, dim=dims, keepdim=keep)


def _prod(x: Tensor, dims: list[int], keep: bool) -> Tensor:
    y = x.to(torch.int64) if _is_int(x) else x
    for d in sorted(dims, reverse=True):
        y = torch.prod(y, dim=d, keepdim=keep)
    return y.to(x.dtype)


def _trunc_to(y: Tensor, dtype: torch.dtype) -> Tensor:
    return y if y.dtype == dtype else torch.trunc(y).to(dtype)


def _reduce(op: str, x: Tensor, dims: list[int], keep: bool) -> Tensor:
    if op == "ReduceSum":
        return _sum(x, dims, keep)
    if op == "ReduceMax":
        return _extreme(x, dims, keep, True)
    if op == "ReduceMin":
        return _extreme(x, dims, keep, False)
    if op == "ReduceProd":
        return _prod(x, dims, keep)
    if op == "ReduceMean":
        if _is_int(x):
            n = math.prod(x.shape[d] for d in dims)
            s = torch.sum(x.to(torch.int64), dim=dims, keepdim=keep)
            return torch.div(s, max(n, 1), rounding_mode="trunc").to(x.dtype)
        return torch.mean(x, dim=dims, keepdim=keep)
    if op == "ReduceL1":
        return _sum(x.abs() if x.is_floating_point() else x.to(torch.int64).abs(), dims, keep).to(x.dtype)
    if op == "ReduceSumSquare":
        return _sum(x * x if x.is_floating_point() else x.to(torch.int64).square(), dims, keep).to(x.dtype)
    work = x if x.is_floating_point() else x.to(torch.float64)
    if op == "ReduceL2":
        return _trunc_to(torch.sqrt(torch.sum(work * work, dim=dims, keepdim=keep)), x.dtype)
    if op == "ReduceLogSum":
        return _trunc_to(torch.log(torch.sum(work, dim=dims, keepdim=keep)), x.dtype)
    if op == "ReduceLogSumExp":
        return _trunc_to(torch.logsumexp(work, dim=dims, keepdim=keep), x.dtype)
    raise UnsupportedOpError(f"unknown reduction {op}")


def _no_reduce(op: str, x: Tensor) -> Tensor:
    """A reduction over no axes: only the elementwise part of the op applies."""
    if op in ("ReduceL1", "ReduceL2"):
        return x.abs() if x.dtype not in (torch.uint8, torch.uint16, torch.uint32, torch.uint64) else x
    if op == "ReduceSumSquare":
        return (x * x) if x.is_floating_point() else x.to(torch.int64).square().to(x.dtype)
    if op == "ReduceLogSum":
        return _trunc_to(torch.log(x if x.is_floating_point() else x.to(torch.float64)), x.dtype)
    return x


@register
class Reduce(OpDef):
    op_type = ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
               "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")
    value_inputs = (1,)

    def infer(self, node: Node, types: Sequence[TensorType | None],
              consts: Sequence[Tensor | None]) -> list[TensorType]:
        out = super().infer(node, types, consts)
        t = types[0]
        if out[0].dtype is not None or t is None:
            return out
        keep = bool(node.attr("keepdims", 1))
        return [TensorType(t.dtype, (None,) * len(t.shape) if keep and t.shape is not None else None)]

    def compute(self, node: Node, x: Tensor, axes: Tensor | None = None) -> Tensor:
        if x.is_complex():
            raise UnsupportedDTypeError(f"node '{node.name}': {node.op_type} does not support {x.dtype}")
        if (x.dtype == torch.bool or x.dtype in _FLOAT8) and node.op_type not in ("ReduceMax", "ReduceMin"):
            raise UnsupportedDTypeError(f"node '{node.name}': {node.op_type} does not support {x.dtype} input")
        dims = reduce_axes(node, x, axes)
        if not dims:
            return _no_reduce(node.op_type, x)
        return _reduce(node.op_type, x, dims, bool(node.attr("keepdims", 1)))


@register
class ArgExtreme(OpDef):
    op_type = ("ArgMax", "ArgMin")

    def compute(self, node: Node, x: Tensor) -> Tensor:
        rank = max(x.dim(), 1)
        axis = int(node.attr("axis", 0))
        if not -rank <= axis < rank:
            raise UnsupportedOpError(f"node '{node.name}': axis {axis} is out of range for rank {x.dim()}")
        axis = norm_axis(axis, rank)
        keep = bool(node.attr("keepdims", 1))
        if x.dim() == 0:
            return torch.zeros((), dtype=torch.int64, device=x.device)
        if x.shape[axis] == 0:
            raise UnsupportedOpError(f"node '{node.name}': {node.op_type} over an empty axis")
        k = _ordered(x)
        if k.dtype in _FLOAT8:
            k = k.float()
        fn = torch.argmax if node.op_type == "ArgMax" else torch.argmin
        if node.attr("select_last_index", 0):
            idx = x.shape[axis] - 1 - fn(k.flip(axis), dim=axis, keepdim=keep)
        else:
            idx = fn(k, dim=axis, keepdim=keep)
        return idx.to(torch.int64)


@register
class TopK(OpDef):
    op_type = "TopK"
    value_inputs = (1,)

    def infer(self, node: Node, types: Sequence[TensorType | None],
              consts: Sequence[Tensor | None]) -> list[TensorType]:
        out = super().infer(node, types, consts)
        t = types[0]
        if out[0].dtype is not None or t is None:
            return out
        shape = None
        if t.shape is not None and t.shape:
            dims = list(t.shape)
            dims[norm_axis(int(node.attr("axis", -1)), len(dims))] = None
            shape = tuple(dims)
        return [TensorType(t.dtype, shape), TensorType(DType.INT64, shape)]

    def compute(self, node: Node, x: Tensor, k_in: Tensor | None = None) -> tuple[Tensor, Tensor]:
        k = int(node.attr("k", 0)) if node.opset < 10 else ints(k_in)[0]
        rank = max(x.dim(), 1)
        axis = norm_axis(int(node.attr("axis", -1)), rank)
        if x.dim() == 0 or not 0 <= k <= x.shape[axis]:
            raise UnsupportedOpError(f"node '{node.name}': TopK k={k} is out of range for shape {tuple(x.shape)}")
        largest = bool(node.attr("largest", 1))
        key = _ordered(x)
        if key.dtype in _FLOAT8:
            key = key.float()
        _, idx = torch.sort(key, dim=axis, descending=largest, stable=True)
        idx = idx.narrow(axis, 0, k)
        return _gather_bits(x, axis, idx), idx


_SAME_WIDTH_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _gather_bits(x: Tensor, axis: int, idx: Tensor) -> Tensor:
    """torch.gather on the bit pattern (torch lacks gather for unsigned and float 8 types)."""
    if x.dtype == torch.bool:
        return torch.gather(x, axis, idx)
    bits = _SAME_WIDTH_INT[x.dtype.itemsize]
    return torch.gather(x.view(bits), axis, idx).view(x.dtype)


class _Scan(OpDef):
    value_inputs = (1,)

    def scan(self, x: Tensor, dim: int) -> Tensor:
        raise NotImplementedError

    identity = 0

    def compute(self, node: Node, x: Tensor, axis_in: Tensor) -> Tensor:
        rank = max(x.dim(), 1)
        axis = ints(axis_in)[0]
        if not -rank <= axis < rank:
            raise UnsupportedOpError(f"node '{node.name}': axis {axis} is out of range for rank {x.dim()}")
        axis = norm_axis(axis, rank)
        if x.dim() == 0:
            return x.clone()
        if x.dtype == torch.bool or x.dtype in _FLOAT8:
            raise UnsupportedDTypeError(f"node '{node.name}': {node.op_type} does not support {x.dtype} input")
        work = x.to(torch.int64) if _is_int(x) else x
        if x.dtype == torch.float16 and x.device.type == "cpu":
            work = x.float()
        reverse = bool(node.attr("reverse", 0))
        if reverse:
            work = work.flip(axis)
        if node.attr("exclusive", 0):
            pad = torch.full_like(work.narrow(axis, 0, 1), self.identity)
            work = torch.cat([pad, work.narrow(axis, 0, work.shape[axis] - 1)], dim=axis)
        y = self.scan(work, axis)
        if reverse:
            y = y.flip(axis)
        return y.to(x.dtype)


@register
class CumSum(_Scan):
    op_type = "CumSum"
    opsets = (11, 28)
    identity = 0

    def scan(self, x: Tensor, dim: int) -> Tensor:
        return torch.cumsum(x, dim=dim, dtype=x.dtype)


@register
class CumProd(_Scan):
    op_type = "CumProd"
    opsets = (26, 28)
    identity = 1

    def scan(self, x: Tensor, dim: int) -> Tensor:
        return torch.cumprod(x, dim=dim, dtype=x.dtype)
