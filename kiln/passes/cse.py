"""Common subexpression elimination: a layer computing what an earlier layer already computed is removed.

Exporters repeat work: torch's TorchScript export of `boxes[mask]` and `scores[mask]` calls NonZero on
the same mask twice, each followed by its own Transpose (SSDlite: 90 classes x 2). Two nodes compute the
same values when they are the same deterministic op (domain, type, opset, attributes) applied to the same
inputs: the same values, or constants equal in element type, shape and bytes. The later one's outputs
are replaced by the earlier one's. Random ops, nodes with subgraphs or captures, and nodes producing a
graph output (whose name the graph keeps) are left alone; every node is compared, never evaluated.
"""
from __future__ import annotations

from typing import Any, Hashable

import torch

from kiln.ir.graph import Graph, Node, Value
from kiln.ops.registry import lookup
from kiln.passes.base import Pass, PassContext

MAX_CONST_BYTES = 1 << 12  # constants compared by content up to this size; larger ones by identity


def _const_key(t: torch.Tensor) -> Hashable:
    flat = t.detach().cpu().reshape(-1).contiguous()
    return ("const", str(t.dtype), tuple(t.shape), flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")


def _frozen(x: Any) -> Hashable:
    """A hashable, exact stand-in for an attribute value (floats by their bits: NaN equals NaN, -0.0 is not 0.0)."""
    if isinstance(x, torch.Tensor):
        return _const_key(x)
    if isinstance(x, float):
        return ("float", x.hex())
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, tuple(_frozen(v) for v in x))
    if isinstance(x, dict):
        return ("dict", tuple(sorted((k, _frozen(v)) for k, v in x.items())))
    if isinstance(x, (int, str, bool, bytes)) or x is None:
        return (type(x).__name__, x)
    raise TypeError(f"attribute value of type {type(x).__name__}")


def _input_key(v: Value | None) -> Hashable:
    if v is None:
        return None
    c = v.const
    if c is not None and c.numel() * c.element_size() <= MAX_CONST_BYTES and c.device.type != "meta":
        return _const_key(c)
    return ("value", id(v))


def _key(n: Node) -> Hashable | None:
    if n.subgraphs() or n.captures:
        return None
    try:
        if not lookup(n.op_type, n.domain).deterministic:
            return None
        attrs = _frozen(n.attrs)
    except Exception:  # an unknown op or an attribute we cannot compare exactly: kept
        return None
    return (n.domain, n.op_type, n.opset, len(n.outputs), attrs, tuple(_input_key(v) for v in n.inputs))


class EliminateCommonSubexpressions(Pass):
    """Removes nodes whose op, attributes and inputs equal an earlier node's, reading that node's outputs."""

    name = "common subexpression elimination"

    def run(self, g: Graph, ctx: PassContext) -> bool:
        outputs = {id(v) for v in g.outputs}
        seen: dict[Hashable, Node] = {}
        kept: list[Node] = []
        removed = 0
        for n in g.nodes:
            key = _key(n)
            first = seen.get(key) if key is not None else None
            if first is None or any(id(v) in outputs for v in n.outputs):
                if key is not None and key not in seen:
                    seen[key] = n
                kept.append(n)
                continue
            for old, new in zip(n.outputs, first.outputs):
                g.replace_uses(old, new)
            removed += 1
        g.nodes = kept
        if removed:
            ctx.logger.verbose(f"Removed {removed} repeated layers")
        return removed > 0
