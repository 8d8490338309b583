"""The host side the NMS tactics of both backends share: the op's reference around a faster greedy pass.

``cpu.nms`` / ``cuda.triton_nms`` (NonMaxSuppression) and ``cpu.batched_nms`` / ``cuda.triton_batched_nms``
(BatchedNMS) replace only the greedy selection of their op's reference, with a C loop (``native/nms.c``) or a
Triton kernel (``cuda/triton_detect.py``); input checks, ranking and output rows stay the reference's, and
float64 inputs run the reference itself (it computes in float64 then). The IoU test itself lives once per
language: ``kiln.ops.detection.iou_above`` (torch, both references), ``native/nms.c`` and
``triton_detect._hits``.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from kiln.backends.kernel import Kernel
from kiln.ir.graph import Node
from kiln.ops.detection import Ranked, no_selection, rank_candidates
from kiln.ops.registry import lookup
from kiln.plugins.detection import Candidates, NmsParams, batched_nms

Tensor = torch.Tensor


def nms_kernel(node: Node, greedy: Callable[[Ranked], Tensor]) -> Kernel:
    """NonMaxSuppression's kernel with `greedy(ranked)` as its greedy pass: the keys row * m + rank of the kept
    candidates, ascending (as kiln.ops.detection's own pass returns them)."""
    reference = lookup(node.op_type, node.domain).bind(node)

    def k_nms(boxes: Tensor, scores: Tensor, *rest: Any) -> Tensor:
        if boxes.dtype == torch.float64:  # the reference computes in float64 then
            return reference(boxes, scores, *rest)
        c = rank_candidates(node, boxes, scores, *rest)
        if c is None:
            return no_selection(boxes.device)
        return c.selected(greedy(c))
    return Kernel(k_nms)


def batched_nms_kernel(node: Node, greedy: Callable[[Candidates, NmsParams], Tensor],
                       ranked: Callable[[Tensor, Tensor, NmsParams], Candidates] | None = None) -> Kernel:
    """BatchedNMS's kernel with `greedy(candidates, params)` -> keep (N, M) as its greedy pass and, when given,
    `ranked` as its candidate ranking (default the reference's fixed-size one)."""

    def k_batched_nms(boxes: Tensor, scores: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if torch.float64 in (boxes.dtype, scores.dtype):  # the reference computes in float64 then
            return batched_nms(node, boxes, scores)
        return batched_nms(node, boxes, scores, greedy=greedy, ranked=ranked)
    return Kernel(k_batched_nms)
