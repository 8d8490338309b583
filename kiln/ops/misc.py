"""Miscellaneous default-domain ops: CausalConvWithState (opset 27+).

CausalConvWithState is a depthwise causal 1-D convolution over (B, C, L) that carries the last
k-1 input positions between calls: the input is left-padded with past_state (or zeros), convolved
with groups=C and no padding, optionally followed by SiLU, and the padded tail is the new state.
"""
from __future__ import annotations

import torch

from kiln.errors import UnsupportedDTypeError, UnsupportedOpError
from kiln.ir.graph import Node
from kiln.ops.registry import OpDef, register

Tensor = torch.Tensor

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@register
class CausalConvWithState(OpDef):
    """Stateful causal depthwise Conv1d with optional fused SiLU."""

    op_type = "CausalConvWithState"
    opsets = (27, 28)

    def check(self, node: Node) -> None:
        act = node.attr("activation", "none")
        if act not in ("none", "silu", "swish"):
            raise UnsupportedOpError(f"node '{node.name}': unknown activation '{act}'")

    def compute(self, node: Node, x: Tensor, weight: Tensor, bias: Tensor | None = None,
                past_state: Tensor | None = None) -> object:
        self.check(node)
        if x.dtype not in _FLOATS:
            raise UnsupportedDTypeError(f"node '{node.name}': CausalConvWithState does not support dtype {x.dtype}")
        if x.dim() != 3 or weight.dim() != 3:
            raise UnsupportedOpError(f"node '{node.name}': input and weight must be rank 3")
        batch, channels, _ = x.shape
        k = weight.shape[2]
        if past_state is None:
            past_state = torch.zeros(batch, channels, k - 1, dtype=x.dtype, device=x.device)
        padded = torch.cat([past_state.to(x.dtype), x], 2)
        cdt = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        out = torch.nn.functional.conv1d(padded.to(cdt), weight.to(cdt),
                                         None if bias is None else bias.to(cdt), groups=channels)
        out = out.to(x.dtype)
        if node.attr("activation", "none") in ("silu", "swish"):
            out = torch.nn.functional.silu(out.to(cdt)).to(x.dtype)
        present = padded[:, :, padded.shape[2] - (k - 1):]
        return out, present
