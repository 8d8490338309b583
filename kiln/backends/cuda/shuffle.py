"""ChannelShuffle on the GPU: one strided copy (kiln.ops.shuffle.shuffle_into) into a channels-last destination.

The reference (reshape, transpose, reshape) copies into a contiguous NCHW tensor that the next
convolution's NHWC kernel copies back; here the one copy kernel of torch writes the layout the next layer
wants, for any element type (float32/16, bfloat16 after lowering) and any input strides.
"""
from __future__ import annotations

from typing import Any

import torch

from kiln.backends.tactic import Built, Kernel, Tactic, TacticContext, register_tactic
from kiln.errors import KilnError
from kiln.ir.graph import Node
from kiln.ops.attrs import read
from kiln.ops.shuffle import shuffle_into

Tensor = torch.Tensor


class CudaChannelShuffleTactic(Tactic):
    """ChannelShuffle as one copy kernel writing the destination's layout (channels-last by default)."""

    id = "cuda.channel_shuffle"
    devices = ("cuda",)
    priority = 10
    writes_out = 1

    def supports(self, node: Node, ctx: TacticContext) -> bool:
        x = node.input(0)
        return (node.domain == "kiln" and node.op_type == "ChannelShuffle" and x is not None and x.type.rank == 4
                and len(node.inputs) == 1 and len(node.outputs) == 1)

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        groups = int(read(node, "groups"))

        def k_channel_shuffle(x: Tensor, out: Tensor | None = None) -> Tensor:
            if x.dim() != 4 or x.shape[1] % groups:
                raise KilnError(f"node '{node.name}': ChannelShuffle of a {list(x.shape)} tensor in {groups} groups")
            if out is None:
                out = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
            return shuffle_into(x, groups, out)
        return Kernel(k_channel_shuffle, out_format="channels_last")


register_tactic(CudaChannelShuffleTactic())
