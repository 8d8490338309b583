"""Concat on the CPU as one torch.cat with the axis normalized once (keeps channels-last inputs channels-last)."""
from __future__ import annotations

from typing import Any

import torch

from kiln.backends.kernel import Kernel
from kiln.backends.tactic import Built, Tactic, TacticContext, register_tactic
from kiln.backends.views import cat_into, concat_axis
from kiln.ir.graph import Node

Tensor = torch.Tensor


class CpuConcatTactic(Tactic):
    """Concat as one torch.cat with the axis normalized once (keeps channels-last inputs channels-last)."""

    id = "cpu.concat"

    torch_dispatch = True
    devices = ("cpu",)
    priority = 10
    writes_out = 1  # each input copied straight into its slice of the destination (an arena slot)

    def supports(self, node: Node, ctx: TacticContext) -> bool:
        if ctx.device.type != "cpu" or node.op_type != "Concat" or node.domain not in ("", "ai.onnx"):
            return False
        return (concat_axis(node) is not None and len(node.outputs) == 1
                and all(v is not None and v.kind == "tensor" for v in node.inputs))

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        axis = concat_axis(node)

        def k_cat(*xs: Tensor, out: Tensor | None = None) -> Tensor:
            return cat_into(xs, axis, out)
        # the output slot takes the first input's form: channels-last beside convs, rows in a gated block's
        # [N, H, W, C] tensors (a channels-last slot there turns every row of the copy into a scatter)
        return Kernel(k_cat, out_format="like_input")


register_tactic(CpuConcatTactic())
