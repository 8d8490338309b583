"""The reference tactic: an op's own torch implementation; supports every node on every device."""
from __future__ import annotations

from typing import Any

import torch

from kiln.backends.tactic import Built, Kernel, Tactic, TacticContext, register_tactic
from kiln.ir.graph import Node
from kiln.ops.registry import lookup


class ReferenceTactic(Tactic):
    """Runs OpDef.compute; the universal fallback."""

    id = "ref"
    priority = -100

    def supports(self, node: Node, ctx: TacticContext) -> bool:
        return True

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        return lookup(node.op_type, node.domain).bind(node)


register_tactic(ReferenceTactic())
