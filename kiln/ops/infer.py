"""Default shape/type inference: run an op's reference implementation on meta tensors.

Symbolic dims get two different placeholder sizes in two runs; an output dim that follows a
placeholder in both runs keeps its symbol, one that is equal in both is static, anything else
becomes unknown (None). Constant inputs are passed as real tensors so that shape-like inputs
(Reshape's shape, Slice's starts, ...) are read as values.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch

from kiln.ir.dtype import DType
from kiln.ir.types import TensorType

if TYPE_CHECKING:
    from kiln.ir.graph import Node
    from kiln.ops.registry import OpDef

_BASE = (1009, 1117)  # placeholder sizes of the first symbol in each run; unlikely as real dims


def _unknown(node: "Node") -> list[TensorType]:
    return [TensorType(None, None) for _ in node.outputs]


def _materialize(t: TensorType, sizes: dict[Any, int], real: torch.Tensor | None, as_value: bool) -> Any:
    if real is not None and as_value:
        return real
    dims = [d if isinstance(d, int) else sizes[d] for d in t.shape]  # type: ignore[union-attr]
    return torch.empty(dims, dtype=t.dtype.torch, device="meta")  # type: ignore[union-attr]


def _run(opdef: "OpDef", node: "Node", types: Sequence[TensorType | None], consts: Sequence[torch.Tensor | None],
         sizes: dict[Any, int]) -> list[Any] | None:
    args: list[Any] = []
    for i, (t, c) in enumerate(zip(types, consts)):
        if t is None and c is None:
            args.append(None)
            continue
        if c is None and i in opdef.value_inputs:
            return None  # a shape-like input only known at run time
        if c is None and (t is None or t.dtype is None or t.shape is None):
            return None
        args.append(_materialize(t, sizes, c, i in opdef.value_inputs))  # type: ignore[arg-type]
    try:
        out = opdef.compute(node, *args)
    except Exception:
        return None
    outs = list(out) if isinstance(out, tuple) else [out]
    return outs


def infer_by_meta(opdef: "OpDef", node: "Node", types: Sequence[TensorType | None],
                  consts: Sequence[torch.Tensor | None]) -> list[TensorType]:
    syms: list[Any] = []
    for t in types:
        if t is not None and t.shape is not None:
            for d in t.shape:
                if not isinstance(d, int) and d not in syms:
                    syms.append(d)
    runs = []
    for base in _BASE if syms else _BASE[:1]:
        sizes = {s: base + 16 * k for k, s in enumerate(syms)}
        outs = _run(opdef, node, types, consts, sizes)
        if outs is None:
            return _by_position(opdef, node, types, consts) if None in syms else _unknown(node)
        runs.append((sizes, outs))
    result: list[TensorType] = []
    for j in range(len(node.outputs)):
        if j >= len(runs[0][1]):
            result.append(TensorType(None, None))
            continue
        o1 = runs[0][1][j]
        if not isinstance(o1, torch.Tensor):
            result.append(TensorType(None, None))
            continue
        try:
            dt = DType.from_torch(o1.dtype)
        except Exception:
            dt = None
        if len(runs) == 1:
            result.append(TensorType(dt, tuple(int(d) for d in o1.shape)))
            continue
        o2 = runs[1][1][j]
        inv1 = {v: k for k, v in runs[0][0].items()}
        inv2 = {v: k for k, v in runs[1][0].items()}
        dims: list[Any] = []
        if not isinstance(o2, torch.Tensor) or o2.dim() != o1.dim():
            result.append(TensorType(dt, None))
            continue
        for d1, d2 in zip(o1.shape, o2.shape):
            d1, d2 = int(d1), int(d2)
            if d1 == d2:
                dims.append(d1)
            elif d1 in inv1 and d2 in inv2 and inv1[d1] == inv2[d2] and isinstance(inv1[d1], str):
                dims.append(inv1[d1])
            else:
                dims.append(None)
        result.append(TensorType(dt, tuple(dims)))
    return result


def _by_position(opdef: "OpDef", node: "Node", types: Sequence[TensorType | None],
                 consts: Sequence[torch.Tensor | None]) -> list[TensorType]:
    """Types when an input has unknown (None) dims and the placeholder run failed: an unknown dim can
    not be told apart from the dims it must match (Concat of [N, 16, H, W] and [N, 16, ?, ?] after a
    pool), so at an axis (counted from the right) holding an unknown dim, every non-static dim takes
    one placeholder. Element types, ranks, static dims and symbols that agree come out; dims that
    depend on a placeholder stay unknown."""
    mixed: set[int] = set()
    for t in types:
        if t is not None and t.shape is not None:
            mixed |= {len(t.shape) - i for i, d in enumerate(t.shape) if d is None}
    positional: list[TensorType | None] = []
    for t in types:
        if t is None or t.shape is None:
            positional.append(t)
            continue
        r = len(t.shape)
        positional.append(TensorType(t.dtype, tuple(f"#{r - i}" if not isinstance(d, int) and r - i in mixed else d
                                                     for i, d in enumerate(t.shape))))
    return [TensorType(t.dtype, None if t.shape is None else
                       tuple(None if isinstance(d, str) and d.startswith("#") else d for d in t.shape))
            for t in infer_by_meta(opdef, node, positional, consts)]
