"""Detection post-processing on CUDA in Triton: the YoloDecode and BatchedNMS plugins (kiln.plugins.detection)
and ONNX NonMaxSuppression's greedy selection, without a host round trip in the plugins' kernels.

``cuda.triton_yolo_decode``: one launch per head, a program per (image, anchor, block of cells): it reads the
raw head through its four strides (NCHW, or the NHWC maps Kiln's convolutions write), decodes the boxes
(letterbox undone from the attribute or the [N, 4] input) and writes objectness x class scores, class
blocks at a time. Its sigmoid and exp are Triton's, not torch's: within a few ulps of the reference.

``cuda.triton_batched_nms`` / ``cuda.triton_nms``: the greedy selection is one program per row (an image, or
for NonMaxSuppression a (batch, class) row) walking its ranked candidates in blocks of BLOCK ranks: a block
is first tested against the boxes kept so far (a compact list of their ranks, at most `limit` long, so a
block costs BLOCK x kept IoU tests, never M x M), then its survivors are decided one rank after the other,
and the kept ones are appended to the list; a row stops once `limit` are kept (max_output_boxes: later
ones are never output). The IoU test is the reference's, operation for operation: fp fusion is off (no
contracted multiply-add), the division is IEEE (div_rn), and only boxes of positive area can overlap
(kiln.ops.detection.iou_above decides the same), so the kept set is exactly the reference's. BatchedNMS
ranks its candidates with the reference's fixed-size torch code (kiln.plugins.detection.top_candidates):
nothing in the plugin path reads a device value on the host, so it can be captured in a CUDA graph.
NonMaxSuppression keeps its reference ranking (kiln.ops.detection.rank_candidates) and data-dependent
output; only its greedy pass runs here.
"""
from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from kiln.backends.cuda.common import FLOAT_DTYPES
from kiln.backends.cuda.triton_launch import launch
from kiln.backends.detection import batched_nms_kernel, nms_kernel
from kiln.backends.tactic import Built, Kernel, Tactic, TacticContext, register_tactic
from kiln.ir.graph import Node
from kiln.ops.detection import Ranked
from kiln.plugins.detection import DOMAIN, Candidates, NmsParams, YoloParams, check_head, decode_head

Tensor = torch.Tensor
_CONFIGS = ({"block": 32, "num_warps": 1}, {"block": 64, "num_warps": 2}, {"block": 128, "num_warps": 4})


@triton.jit
def _hits(ax0, ay0, ax1, ay1, aa, bx0, by0, bx1, by1, ba, thr):
    """IoU(a, b) > thr, elementwise, with the reference's float operations (launched without fp fusion)."""
    iw = tl.maximum(tl.minimum(ax1, bx1) - tl.maximum(ax0, bx0), 0.0)
    ih = tl.maximum(tl.minimum(ay1, by1) - tl.maximum(ay0, by0), 0.0)
    inter = iw * ih
    union = (aa + ba) - inter
    return (aa > 0.0) & (ba > 0.0) & (inter > 0.0) & (tl.math.div_rn(inter, union) > thr)


@triton.jit
def _greedy_kernel(x0_ptr, y0_ptr, x1_ptr, y1_ptr, ar_ptr, grp_ptr, cnt_ptr, kidx_ptr, num_ptr,
                   M, L, limit, thr, HAS_GROUP: tl.constexpr, BLOCK: tl.constexpr):
    """Row r: candidates [0, cnt[r]) of the (R, M) columns, ranked; writes the ranks of the first `limit`
    kept into kidx[r, :] (R, L) and their number into num[r]."""
    row = tl.program_id(0).to(tl.int64)
    base = row * M
    kbase = row * L
    count = tl.load(cnt_ptr + row).to(tl.int32)
    offs = tl.arange(0, BLOCK)
    kept = count * 0
    start = count * 0
    while (start < count) & (kept < limit):
        j = start + offs
        jm = j < count
        bx0 = tl.load(x0_ptr + base + j, mask=jm, other=0.0)
        by0 = tl.load(y0_ptr + base + j, mask=jm, other=0.0)
        bx1 = tl.load(x1_ptr + base + j, mask=jm, other=0.0)
        by1 = tl.load(y1_ptr + base + j, mask=jm, other=0.0)
        ba = tl.load(ar_ptr + base + j, mask=jm, other=0.0)
        if HAS_GROUP:
            bg = tl.load(grp_ptr + base + j, mask=jm, other=-1)
        alive = jm
        for p in range(0, kept, BLOCK):  # against the kept list
            i = p + offs
            im = i < kept
            ki = tl.load(kidx_ptr + kbase + i, mask=im, other=0).to(tl.int64)
            px0 = tl.load(x0_ptr + base + ki, mask=im, other=0.0)
            py0 = tl.load(y0_ptr + base + ki, mask=im, other=0.0)
            px1 = tl.load(x1_ptr + base + ki, mask=im, other=0.0)
            py1 = tl.load(y1_ptr + base + ki, mask=im, other=0.0)
            pa = tl.load(ar_ptr + base + ki, mask=im, other=0.0)
            hit = _hits(px0[:, None], py0[:, None], px1[:, None], py1[:, None], pa[:, None],
                        bx0[None, :], by0[None, :], bx1[None, :], by1[None, :], ba[None, :], thr)
            hit = hit & im[:, None]
            if HAS_GROUP:
                pg = tl.load(grp_ptr + base + ki, mask=im, other=-2)
                hit = hit & (pg[:, None] == bg[None, :])
            alive = alive & (tl.max(hit.to(tl.int32), axis=0) == 0)
        for t in range(0, BLOCK):  # the block's survivors in rank order
            a_t = tl.sum(tl.where(offs == t, alive.to(tl.int32), 0), axis=0)
            if a_t != 0:
                s = base + start + t + offs * 0  # rank t's values in every lane
                hit = _hits(tl.load(x0_ptr + s), tl.load(y0_ptr + s), tl.load(x1_ptr + s), tl.load(y1_ptr + s),
                            tl.load(ar_ptr + s), bx0, by0, bx1, by1, ba, thr)
                hit = hit & (offs > t)
                if HAS_GROUP:
                    hit = hit & (tl.load(grp_ptr + s) == bg)
                alive = alive & (hit == 0)
        alive_i = alive.to(tl.int32)
        pos = kept + tl.cumsum(alive_i, 0) - 1
        tl.store(kidx_ptr + kbase + pos, j, mask=alive & (pos < limit))
        kept += tl.sum(alive_i, axis=0)
        start += BLOCK
        tl.debug_barrier()  # the kept list is read back by every thread of the program
    tl.store(num_ptr + row, tl.minimum(kept, limit))


def greedy_rows(cols: list[Tensor], counts: Tensor, group: Tensor | None, thr: float, limit: int,
                config: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """(kept ranks (R, L) int32, their number (R,) int32) of each row's first `limit` kept candidates:
    cols five (R, M) float32 columns of ranked candidates, counts (R,) candidates per row (a prefix)."""
    rows, m = (int(d) for d in cols[0].shape)
    dev = cols[0].device
    width = max(1, min(limit, m))
    kidx = torch.zeros((rows, width), dtype=torch.int32, device=dev)
    num = torch.zeros(rows, dtype=torch.int32, device=dev)
    if rows and m:
        cols = [c.to(torch.float32).contiguous() for c in cols]
        grp = cols[0] if group is None else group.to(torch.int32).contiguous()
        launch(_greedy_kernel, (rows,),
               [*cols, grp, counts.to(torch.int32).contiguous(), kidx, num, m, width, min(limit, m), thr],
               {"HAS_GROUP": group is not None, "BLOCK": config["block"], "num_warps": config["num_warps"],
                "enable_fp_fusion": False})
    return kidx, num


def keep_mask(kidx: Tensor, num: Tensor, m: int) -> Tensor:
    """(R, m) bool: the ranks listed in each row's first num entries of kidx."""
    rows, width = (int(d) for d in kidx.shape)
    listed = torch.arange(width, device=kidx.device)[None, :] < num[:, None]
    slot = torch.where(listed, kidx.to(torch.int64), m)
    return torch.zeros((rows, m + 1), dtype=torch.bool, device=kidx.device).scatter_(1, slot, listed)[:, :m]


def _float_io(node: Node, n_inputs: int) -> bool:
    ins = [node.input(i) for i in range(n_inputs)]
    return all(v is None or v.type.dtype in FLOAT_DTYPES for v in ins) and node.input(0) is not None


class TritonBatchedNms(Tactic):
    """BatchedNMS: the reference's fixed-size ranking, then the greedy kernel (one program per image)."""

    id = "cuda.triton_batched_nms"
    devices = ("cuda",)
    priority = 20

    def supports(self, node: Node, ctx: TacticContext) -> bool:
        return (node.domain, node.op_type) == (DOMAIN, "BatchedNMS") and _float_io(node, 2)

    def configs(self, node: Node, ctx: TacticContext) -> list[dict[str, Any]]:
        return [dict(c) for c in _CONFIGS]

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        def greedy(c: Candidates, p: NmsParams) -> Tensor:
            kidx, num = greedy_rows(c.cols, c.valid.sum(1), None if p.class_agnostic else c.cls,
                                    p.iou_threshold, p.max_output_boxes, config)
            return keep_mask(kidx, num, int(c.valid.shape[1]))
        return batched_nms_kernel(node, greedy)


class TritonNms(Tactic):
    """ONNX NonMaxSuppression: the reference's ranking and output, the greedy pass in the kernel above."""

    id = "cuda.triton_nms"
    devices = ("cuda",)
    priority = 20

    def supports(self, node: Node, ctx: TacticContext) -> bool:
        return (node.domain in ("", "ai.onnx") and node.op_type == "NonMaxSuppression" and len(node.outputs) == 1
                and _float_io(node, 2) and node.input(1) is not None)

    def configs(self, node: Node, ctx: TacticContext) -> list[dict[str, Any]]:
        return [dict(c) for c in _CONFIGS]

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        return nms_kernel(node, lambda c: _nms_keys(c, config))


def _nms_keys(c: Ranked, config: dict[str, Any]) -> Tensor:
    """Keys row * m + rank of the kept candidates, ascending, as kiln.ops.detection's greedy pass returns."""
    flat = (c.row_batch()[:, None] * c.n + c.order).reshape(-1)
    rows = int(c.order.shape[0])
    cols = [col.index_select(0, flat).view(rows, c.m) for col in c.cols]
    kidx, num = greedy_rows(cols, c.counts, None, c.thr, c.limit, config)
    keep = keep_mask(kidx, num, c.m)
    return keep.reshape(-1).nonzero().view(-1)


# ---- YoloDecode ---------------------------------------------------------------------------------------

@triton.jit
def _decode_kernel(head_ptr, lb_ptr, anc_ptr, boxes_ptr, scores_ptr,
                   A, C, H, W, shn, shc, shh, shw, step_x, step_y, sxy, lb_sx, lb_sy, lb_px, lb_py,
                   LB: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (image * A + anchor, block of cells): boxes and scores of those cells (LB: 0 no letterbox,
    1 the attribute's lb_*, 2 the [N, 4] input)."""
    na = tl.program_id(0)
    n = (na // A).to(tl.int64)
    a = na % A
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = p < H * W
    y = p // W
    x = p % W
    src = head_ptr + n * shn + (a * (5 + C)).to(tl.int64) * shc + y.to(tl.int64) * shh + x.to(tl.int64) * shw
    tx = tl.load(src, mask=pm, other=0.0).to(tl.float32)
    ty = tl.load(src + shc, mask=pm, other=0.0).to(tl.float32)
    tw = tl.load(src + 2 * shc, mask=pm, other=0.0).to(tl.float32)
    th = tl.load(src + 3 * shc, mask=pm, other=0.0).to(tl.float32)
    to = tl.load(src + 4 * shc, mask=pm, other=0.0).to(tl.float32)
    cx = (tl.sigmoid(tx) * sxy - 0.5 * (sxy - 1.0) + x.to(tl.float32)) * step_x
    cy = (tl.sigmoid(ty) * sxy - 0.5 * (sxy - 1.0) + y.to(tl.float32)) * step_y
    bw = tl.exp(tw) * tl.load(anc_ptr + 2 * a)
    bh = tl.exp(th) * tl.load(anc_ptr + 2 * a + 1)
    x1 = cx - bw * 0.5
    y1 = cy - bh * 0.5
    x2 = cx + bw * 0.5
    y2 = cy + bh * 0.5
    if LB != 0:
        sx, sy, px, py = lb_sx, lb_sy, lb_px, lb_py
        if LB == 2:
            sx = tl.load(lb_ptr + n * 4).to(tl.float32)
            sy = tl.load(lb_ptr + n * 4 + 1).to(tl.float32)
            px = tl.load(lb_ptr + n * 4 + 2).to(tl.float32)
            py = tl.load(lb_ptr + n * 4 + 3).to(tl.float32)
        x1 = tl.math.div_rn(x1 - px, sx)
        x2 = tl.math.div_rn(x2 - px, sx)
        y1 = tl.math.div_rn(y1 - py, sy)
        y2 = tl.math.div_rn(y2 - py, sy)
    row = (n * A + a) * H * W + p.to(tl.int64)
    dt = boxes_ptr.dtype.element_ty
    tl.store(boxes_ptr + row * 4, x1.to(dt), mask=pm)
    tl.store(boxes_ptr + row * 4 + 1, y1.to(dt), mask=pm)
    tl.store(boxes_ptr + row * 4 + 2, x2.to(dt), mask=pm)
    tl.store(boxes_ptr + row * 4 + 3, y2.to(dt), mask=pm)
    obj = tl.sigmoid(to)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        m2 = pm[:, None] & (cs < C)[None, :]
        v = tl.load(src[:, None] + (5 + cs).to(tl.int64)[None, :] * shc, mask=m2, other=0.0).to(tl.float32)
        s = obj[:, None] * tl.sigmoid(v)
        tl.store(scores_ptr + row[:, None] * C + cs[None, :], s.to(dt), mask=m2)


def _p2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


class TritonYoloDecode(Tactic):
    """YoloDecode in one launch per head."""

    id = "cuda.triton_yolo_decode"
    devices = ("cuda",)
    priority = 20

    def supports(self, node: Node, ctx: TacticContext) -> bool:
        return (node.domain, node.op_type) == (DOMAIN, "YoloDecode") and _float_io(node, 2)

    def configs(self, node: Node, ctx: TacticContext) -> list[dict[str, Any]]:
        return [{"block_p": 64, "num_warps": 4}, {"block_p": 128, "num_warps": 4}]

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        p = YoloParams.of(node)
        anchors = torch.tensor(p.anchors, dtype=torch.float32, device=device).reshape(-1)
        block_c = min(32, _p2(p.num_classes))
        lb_attr = p.letterbox or (1.0, 1.0, 0.0, 0.0)

        def k_decode(head: Tensor, letterbox: Tensor | None = None) -> tuple[Tensor, Tensor]:
            check_head(node, p, head, letterbox)
            if head.dtype == torch.float64 or (letterbox is not None and letterbox.dtype == torch.float64):
                return decode_head(head, p, letterbox)
            n, _, h, w = (int(d) for d in head.shape)
            a, c = len(p.anchors), p.num_classes
            boxes = torch.empty((n, a * h * w, 4), dtype=head.dtype, device=head.device)
            scores = torch.empty((n, a * h * w, c), dtype=head.dtype, device=head.device)
            if n * h * w == 0:
                return boxes, scores
            mode = 2 if letterbox is not None else 1 if p.letterbox is not None else 0
            lb = letterbox.contiguous() if letterbox is not None else anchors
            launch(_decode_kernel, (n * a, triton.cdiv(h * w, config["block_p"])),
                   [head, lb, anchors.to(head.device), boxes, scores, a, c, h, w, *head.stride(),
                    p.input_size[1] / w, p.input_size[0] / h, p.scale_x_y, *lb_attr],
                   {"LB": mode, "BLOCK_P": config["block_p"], "BLOCK_C": block_c, "num_warps": config["num_warps"]})
            return boxes, scores
        return Kernel(k_decode)


register_tactic(TritonBatchedNms())
register_tactic(TritonNms())
register_tactic(TritonYoloDecode())
