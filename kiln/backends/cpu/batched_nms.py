"""BatchedNMS (kiln.plugins) on the CPU: candidates picked with data-dependent sizes, selected by the C loop
of NonMaxSuppression.

The reference keeps every size fixed so that CUDA can capture it; on the CPU nothing is captured, so this
tactic takes each image's candidates with nonzero (usually far fewer than B * C), ranks them with one
stable sort, and hands them to ``native/nms.c`` (kiln.backends.cpu.nms), the greedy loop NonMaxSuppression's
CPU tactic runs: one row per image (class_agnostic) or per image and class, each candidate tested only
against kept boxes near it, with the IoU float operations of the reference. The outputs are assembled by
the reference's code. Float32 (and float16/bfloat16, compared in float32) only: float64 runs the reference.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from kiln.backends.cpu import native
from kiln.backends.cpu.common import CpuTactic
from kiln.backends.cpu.nms import _library
from kiln.backends.detection import batched_nms_kernel
from kiln.backends.tactic import Built, register_tactic
from kiln.errors import KilnError
from kiln.ir.dtype import DType
from kiln.ir.graph import Node
from kiln.plugins.detection import DOMAIN, Candidates, NmsParams, candidate_scores, make_candidates

Tensor = torch.Tensor
_FLOATS = (DType.FLOAT32, DType.FLOAT16, DType.BFLOAT16)


def ranked_on_cpu(boxes: Tensor, scores: Tensor, p: NmsParams) -> Candidates:
    """The reference's candidates (same slots, same order), found with nonzero instead of fixed sizes."""
    n, b, c = (int(d) for d in scores.shape)
    m = min(p.pre_nms_top_k, b * c)
    flat = candidate_scores(scores, p)
    idx = torch.zeros((n, m), dtype=torch.int64)
    val = torch.full((n, m), -math.inf, dtype=flat.dtype)
    for i in range(n):
        hit = (flat[i] > -math.inf).nonzero().view(-1)  # ascending: the stable sort keeps ties by index
        top, order = torch.sort(flat[i].index_select(0, hit), descending=True, stable=True)
        k = min(m, int(hit.numel()))
        idx[i, :k] = hit.index_select(0, order[:k])
        val[i, :k] = top[:k]
    return make_candidates(boxes, scores, idx, val, p.center)


def _c_greedy(lib: Any, c: Candidates, p: NmsParams) -> Tensor:
    """keep (N, M) from native/nms.c's greedy loop: rows of ranked candidates, one per image or per image and
    class, each stopping after max_output_boxes kept."""
    n, m = (int(d) for d in c.valid.shape)
    cols = [t.float().reshape(-1).contiguous() for t in c.cols]
    counts = c.valid.sum(1)  # valid slots come first: ranked by score, -inf last
    if p.class_agnostic:
        order = torch.arange(m).expand(n, m).contiguous()
        rows_n, row_counts, base = n, counts, torch.arange(n) * m
    else:
        groups = int(c.cls.max()) + 1
        cls = torch.where(c.valid, c.cls, groups)                    # invalid slots after every class
        key, order = torch.sort(cls * m + torch.arange(m), dim=1)    # by class, then rank
        g = torch.div(key, m, rounding_mode="floor")
        per = torch.zeros((n, groups + 1), dtype=torch.int64).scatter_add_(1, g, torch.ones_like(g))
        start = torch.cumsum(per, 1) - per
        pos = torch.arange(m) - start.gather(1, g)                   # rank within its class
        mm = max(1, int(per[:, :groups].max()))
        rows_n, row_counts = n * groups, per[:, :groups].reshape(-1).contiguous()
        base = torch.div(torch.arange(rows_n), groups, rounding_mode="floor") * m
        take = g < groups
        img = torch.arange(n)[:, None].expand(n, m)
        by_row = torch.zeros((rows_n, mm), dtype=torch.int64)
        by_row[(img * groups + g)[take], pos[take]] = order[take]
        order = by_row
    width = int(order.shape[1])
    keep_rows = torch.zeros((rows_n, width), dtype=torch.uint8)
    status = lib.kiln_nms(rows_n, width, m, order.data_ptr(), row_counts.contiguous().data_ptr(),
                          base.contiguous().data_ptr(), *(t.data_ptr() for t in cols), p.max_output_boxes,
                          p.iou_threshold, int(not p.iou_threshold < 1), keep_rows.data_ptr())
    if status != 0:
        raise KilnError("BatchedNMS: " + ("out of memory" if status == -1 else "candidate index out of range"))
    keep = torch.zeros((n, m), dtype=torch.bool)
    r, j = keep_rows.nonzero(as_tuple=True)
    img = torch.div(base.index_select(0, r), m, rounding_mode="floor")
    keep[img, order[r, j]] = True
    return keep


class CpuBatchedNmsTactic(CpuTactic):
    """BatchedNMS: candidates by nonzero and one sort per image, greedy selection in NonMaxSuppression's C loop."""

    id = "cpu.batched_nms"
    priority = 10
    ops = ((DOMAIN, "BatchedNMS"),)

    def accepts(self, node: Node) -> bool:
        b, s = node.input(0), node.input(1)
        return (b is not None and s is not None and b.type.dtype in _FLOATS and s.type.dtype in _FLOATS
                and _library() is not None)

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        lib = _library()
        if lib is None:
            raise KilnError(f"cpu.batched_nms: no C compiler builds its kernel here ({native.error('nms')})")
        return batched_nms_kernel(node, lambda c, p: _c_greedy(lib, c, p), ranked=ranked_on_cpu)


register_tactic(CpuBatchedNmsTactic())
