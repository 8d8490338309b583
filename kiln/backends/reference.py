"""The reference tactic: an op's own torch implementation; supports every node on every device."""
from __future__ import annotations

from typing import Any

import torch

from kiln.backends.tactic import Built, Kernel, Tactic, TacticContext, register_tactic
from kiln.ir.graph import Node
from kiln.ops.registry import lookup


VIEW_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity"})
"""Ops whose reference returns a view of its first input wherever torch can make one."""


def _view_bind(fn: Any) -> Any:
    """Kernel.bind of a view op on the CPU: where the call on these (stable) tensors returns a view of the first
    input, that same view object from then on (as view.slice does): no torch dispatch per inference."""
    def bind(args: Any, out: Any) -> Any:
        x = args[0] if args else None
        if out is not None or not isinstance(x, torch.Tensor):
            return None
        r = fn(*args)
        if not isinstance(r, torch.Tensor) or r.untyped_storage().data_ptr() != x.untyped_storage().data_ptr():
            return None  # a copy (a reshape of a non-contiguous tensor): the plain call each time
        return lambda: r
    return bind


class ReferenceTactic(Tactic):
    """Runs OpDef.compute; the universal fallback."""

    id = "ref"

    torch_dispatch = True
    priority = -100

    def supports(self, node: Node, ctx: TacticContext) -> bool:
        return True

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        opdef = lookup(node.op_type, node.domain)
        fn = opdef.bind(node)
        kind = torch.device(device).type
        if kind == "cpu":
            return Kernel(fn, bind=_view_bind(fn)) if node.op_type in VIEW_OPS and node.domain in ("", "ai.onnx") \
                else fn
        host = frozenset(opdef.value_inputs)

        def on_device(*xs: Any) -> Any:
            # a tensor made on the host from host values (Range or ConstantOfShape of a shape, a dynamic
            # model's shape arithmetic) meets device tensors here: it moves, once, where it is used as data
            return fn(*(x.to(device, non_blocking=True) if i not in host and isinstance(x, torch.Tensor)
                        and x.device.type != kind else x for i, x in enumerate(xs)))

        return on_device


register_tactic(ReferenceTactic())
