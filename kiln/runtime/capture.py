"""StepCapture: a step hook (``ExecutionContext.profiler``) that keeps a copy of every step's outputs.

Used by ``kiln compare --mark-all`` to compare each value that survives optimization with a reference
run. The interpreter calls the hook right after each step with the step's result; a step may have
written into a preallocated arena buffer that a later step reuses, so each output is copied at once
(to the CPU, contiguous: a channels-last tensor keeps its logical NCHW shape).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kiln.ir.graph import Node

_QUANTIZED = (torch.int8, torch.uint8)


@dataclass
class CapturedValue:
    """One output of one step, in step order.

    layer, op:  the step's (the plan's layer) name and op type
    name:       the value's name (for a layer fused from several ONNX nodes: its last node's output)
    tensor:     a CPU copy of the value, or None when it was skipped
    shape:      the value's shape (None when it is not a tensor)
    skipped:    why it was not kept: "quantized" (int8/uint8), "not float" (complex) or "not a tensor"; None when kept
    """

    layer: str
    op: str
    name: str
    tensor: torch.Tensor | None
    shape: tuple[int, ...] | None = None
    skipped: str | None = None


class StepCapture:
    """A step hook keeping a CPU copy of every step output (float, and the integers and bools of shapes, indices and
    masks, which compare exactly), by value name, in step order.

    int8/uint8 values (quantized activations, whose scale lives in the layer) are recorded as skipped ("quantized");
    so are complex ones ("not float").
    """

    def __init__(self) -> None:
        self.values: list[CapturedValue] = []

    def __call__(self, node: Node, seconds: float, result: Any) -> None:
        results = result if isinstance(result, (tuple, list)) else (result,)
        for v, r in zip(node.outputs, results):
            if v is None or not v.name:
                continue
            if not isinstance(r, torch.Tensor):
                self.values.append(CapturedValue(node.name, node.op_type, v.name, None, None, "not a tensor"))
                continue
            shape = tuple(r.shape)
            if r.dtype in _QUANTIZED:
                self.values.append(CapturedValue(node.name, node.op_type, v.name, None, shape, "quantized"))
            elif r.is_complex():
                self.values.append(CapturedValue(node.name, node.op_type, v.name, None, shape, "not float"))
            else:
                copy = r.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)
                self.values.append(CapturedValue(node.name, node.op_type, v.name, copy, shape))
