"""Kiln's built-in detection plugins (domain ``kiln.plugins``, version 1): YoloDecode and BatchedNMS.

**YoloDecode** turns one raw YOLO head [N, A*(5+C), H, W] into boxes [N, A*H*W, 4] (x1, y1, x2, y2) and
scores [N, A*H*W, C] (objectness times class probability), rows anchor-major, then y, then x. Per anchor a
(w_a, h_a in input pixels) and cell (y, x) the raw values (tx, ty, tw, th, tobj, tcls...) decode as Darknet
and examples/zoo/yolo_decode.decode do, in the same float operations:
``bx = (sigmoid(tx) * s - (s - 1) / 2 + x) * (in_w / W)``, ``bw = exp(tw) * w_a`` (likewise y, h; s is
``scale_x_y``), corners ``bx -+ bw / 2``. A letterbox is undone last, per image, as ``(x - pad_x) / scale_x``
(``(y - pad_y) / scale_y``) from the ``letterbox`` attribute [scale_x, scale_y, pad_x, pad_y] or from an
optional second input [N, 4] holding those four values per image; the result is in original-image pixels.

**BatchedNMS** is class-aware greedy NMS with fixed-size outputs, like TensorRT's EfficientNMS: boxes
[N, B, 4] (x1, y1, x2, y2; ``box_coding=1``: cx, cy, w, h) and scores [N, B, C] give num_detections [N, 1]
int32, det_boxes [N, K, 4] (x1, y1, x2, y2), det_scores [N, K] and det_classes [N, K] int32, K =
``max_output_boxes``, by descending score, zero beyond num_detections. Per image:

1. candidates are the (box, class) pairs with score > ``score_threshold``; the best ``pre_nms_top_k`` of them
   (M = min(pre_nms_top_k, B * C) slots) are ranked by descending score, ties by lower box index, then
   lower class;
2. greedy NMS in rank order: a candidate is kept unless an already kept candidate of its class (of any
   class with ``class_agnostic=1``) overlaps it with IoU > ``iou_threshold``. The IoU test is
   NonMaxSuppression's (kiln.ops.detection.iou_above, its float operations): boxes of no positive area
   never suppress and are never suppressed;
3. the first K kept are the output.

Every size comes from the shapes and attributes, never from data: the reference runs the same torch ops on
the CPU and on CUDA without a host round trip (no .item(), no nonzero), so the whole post-processing can be
captured in a CUDA graph. Top-M selection is exact without a sort of all B*C scores (torch.topk's M-th
value, then ties taken by index through prefix sums); the greedy pass decides blocks of _BLOCK ranks, each
against the kept candidates before it in tiles of at most _TILE_PAIRS pairs and then in rank order inside
the block: memory O(M * _BLOCK), never an M x M matrix. Scores and boxes are compared in float32 for
float16/bfloat16 inputs (thresholds rounded to the compute type). Faster tactics run the same candidates
through other greedy kernels: the C loop of NonMaxSuppression on the CPU (kiln.backends.cpu.batched_nms)
and a Triton kernel on CUDA (kiln.backends.cuda.triton_detect).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from kiln.errors import UnsupportedOpError
from kiln.ir.dtype import DType
from kiln.ir.graph import Node
from kiln.ir.types import Dim, TensorType
from kiln.ops.attrs import REQUIRED, Attr, read
from kiln.ops.conv import require_float
from kiln.ops.detection import Cols, box_columns, iou_above
from kiln.ops.registry import OpDef
from kiln.plugins.registry import register_plugin

Tensor = torch.Tensor
DOMAIN = "kiln.plugins"
_HALF = (torch.float16, torch.bfloat16)
_BIG = 1e30             # bound of coordinates, sizes and thresholds in attributes
_MAX_CLASSES = 1 << 20
_MAX_TOP_K = 1 << 16    # pre_nms_top_k: the greedy pass costs O(M^2) IoU tests per image
_MAX_OUT = 1 << 16
_BLOCK = 64             # ranks the torch greedy pass decides together
_TILE_PAIRS = 1 << 20   # candidate pairs tested at once against the kept candidates of earlier blocks


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in _HALF else x.dtype


def _dims(t: TensorType | None, rank: int) -> tuple[Dim, ...]:
    """t's dims when it has this rank, else unknown ones."""
    if t is None or t.shape is None or len(t.shape) != rank:
        return (None,) * rank
    return tuple(t.shape)


# ---- YoloDecode -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class YoloParams:
    """A YoloDecode node's attributes: anchors ((w, h) per anchor, input pixels), classes, input (h, w),
    scale_x_y and the letterbox [scale_x, scale_y, pad_x, pad_y] (None: none, or the second input's)."""

    anchors: tuple[tuple[float, float], ...]
    num_classes: int
    input_size: tuple[int, int]
    scale_x_y: float
    letterbox: tuple[float, float, float, float] | None

    @classmethod
    def of(cls, node: Node) -> "YoloParams":
        a = [float(v) for v in read(node, "anchors")]
        lb = read(node, "letterbox")
        h, w = (int(v) for v in read(node, "input_size"))
        return cls(tuple(zip(a[0::2], a[1::2])), int(read(node, "num_classes")), (h, w),
                   float(read(node, "scale_x_y")), None if lb is None else tuple(float(v) for v in lb))


def decode_constants(p: YoloParams, device: torch.device, dt: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """The anchors (1, A, 1, 1, 2) and the letterbox attribute (1, 4) (None without one) as tensors: made once
    per device (`YoloDecode.bind`), as a host-to-device copy in a run would stall CUDA and break its capture."""
    anc = torch.tensor(p.anchors, dtype=dt, device=device).reshape(1, len(p.anchors), 1, 1, 2)
    return anc, None if p.letterbox is None else torch.tensor([p.letterbox], dtype=dt, device=device)


def decode_head(head: Tensor, p: YoloParams, letterbox: Tensor | None = None,
                consts: tuple[Tensor, Tensor | None] | None = None) -> tuple[Tensor, Tensor]:
    """(boxes [N, A*H*W, 4], scores [N, A*H*W, C]) of one raw head, in the head's dtype (halves computed in
    float32); `letterbox` [N, 4] overrides p.letterbox; `consts`: decode_constants on the head's device."""
    n, _, h, w = (int(d) for d in head.shape)
    a, c = len(p.anchors), p.num_classes
    dt = _compute_dtype(head)
    anc, lb_attr = consts if consts is not None else decode_constants(p, head.device, dt)
    t = head.to(dt).reshape(n, a, 5 + c, h, w).permute(0, 1, 3, 4, 2)  # N, A, H, W, 5+C
    gy, gx = torch.meshgrid(torch.arange(h, dtype=dt, device=head.device),
                            torch.arange(w, dtype=dt, device=head.device), indexing="ij")
    s = p.scale_x_y
    xy = torch.sigmoid(t[..., 0:2]) * s - 0.5 * (s - 1.0)
    cx = (xy[..., 0] + gx) * (p.input_size[1] / w)
    cy = (xy[..., 1] + gy) * (p.input_size[0] / h)
    wh = torch.exp(t[..., 2:4]) * anc
    bw, bh = wh[..., 0], wh[..., 1]
    x1, y1, x2, y2 = cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2
    lb = letterbox if letterbox is not None else lb_attr
    if lb is not None:
        sx, sy, px, py = (v.to(dt).reshape(-1, 1, 1, 1) for v in lb.unbind(-1))
        x1, x2 = (x1 - px) / sx, (x2 - px) / sx
        y1, y2 = (y1 - py) / sy, (y2 - py) / sy
    boxes = torch.stack([x1, y1, x2, y2], -1).reshape(n, a * h * w, 4)
    rest = torch.sigmoid(t[..., 4:])  # objectness and classes in one call, as decode() computes them
    scores = (rest[..., :1] * rest[..., 1:]).reshape(n, a * h * w, c)
    return boxes.to(head.dtype), scores.to(head.dtype)


def check_head(node: Node, p: YoloParams, head: Tensor, letterbox: Tensor | None) -> None:
    """UnsupportedOpError unless head is [N, A*(5+C), H, W] of a float type and letterbox [N, 4]."""
    require_float(node, head, letterbox)
    a, c = len(p.anchors), p.num_classes
    if head.dim() != 4 or int(head.shape[1]) != a * (5 + c):
        raise UnsupportedOpError(f"node '{node.name}': YoloDecode needs a head [N, {a * (5 + c)}, H, W] "
                                 f"({a} anchors x (5 + {c} classes)), got {list(head.shape)}")
    if letterbox is not None and tuple(letterbox.shape) != (int(head.shape[0]), 4):
        raise UnsupportedOpError(f"node '{node.name}': YoloDecode's letterbox input must be [N, 4] = "
                                 f"[{int(head.shape[0])}, 4], got {list(letterbox.shape)}")


class YoloDecode(OpDef):
    """One YOLO head -> boxes [N, A*H*W, 4] (x1, y1, x2, y2) and scores [N, A*H*W, C] (see the module doc)."""

    op_type = "YoloDecode"
    domain = DOMAIN
    version = 1
    arity = (1, 2)      # head, letterbox [N, 4]?
    out_arity = (2, 2)  # boxes, scores
    attributes = {
        "anchors": Attr("floats", REQUIRED, min=0.0, max=_BIG),
        "num_classes": Attr("int", REQUIRED, min=1, max=_MAX_CLASSES),
        "input_size": Attr("ints", REQUIRED, min=1, max=1 << 20, length=(2,)),
        "scale_x_y": Attr("float", 1.0, min=0.0, max=_BIG),
        "letterbox": Attr("floats", None, min=-_BIG, max=_BIG, length=(4,)),
    }

    def check(self, node: Node) -> None:
        anchors = read(node, "anchors")
        at = f"node '{node.name}': YoloDecode"
        if not anchors or len(anchors) % 2 or not all(v > 0 for v in anchors):
            raise UnsupportedOpError(f"{at} attribute 'anchors' must hold (width, height) pairs of positive "
                                     f"sizes, got {len(anchors)} values")
        if not read(node, "scale_x_y") > 0:
            raise UnsupportedOpError(f"{at} attribute 'scale_x_y' must be > 0, got {read(node, 'scale_x_y')}")
        lb = read(node, "letterbox")
        if lb is not None and not (lb[0] > 0 and lb[1] > 0):
            raise UnsupportedOpError(f"{at} attribute 'letterbox' [scale_x, scale_y, pad_x, pad_y] needs "
                                     f"positive scales, got {lb}")
        if lb is not None and node.input(1) is not None:
            raise UnsupportedOpError(f"{at} takes the letterbox as an attribute or as input 1, not both")
        ch = _dims(node.inputs[0].type if node.inputs and node.inputs[0] is not None else None, 4)[1]
        want = len(anchors) // 2 * (5 + int(read(node, "num_classes")))
        if isinstance(ch, int) and ch != want:
            raise UnsupportedOpError(f"{at} needs a head of {want} channels ({len(anchors) // 2} anchors x (5 + "
                                     f"{read(node, 'num_classes')} classes)), got {ch}")

    def compute(self, node: Node, head: Tensor, letterbox: Tensor | None = None) -> tuple[Tensor, Tensor]:
        p = YoloParams.of(node)
        check_head(node, p, head, letterbox)
        return decode_head(head, p, letterbox)

    def bind(self, node: Node) -> Callable[..., tuple[Tensor, Tensor]]:
        """`compute` with the node's attributes read once and their tensors made once per device."""
        p = YoloParams.of(node)
        made: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor | None]] = {}

        def run(head: Tensor, letterbox: Tensor | None = None) -> tuple[Tensor, Tensor]:
            check_head(node, p, head, letterbox)
            key = (head.device, _compute_dtype(head))
            if key not in made:
                made[key] = decode_constants(p, *key)
            return decode_head(head, p, letterbox, made[key])
        return run

    def infer(self, node: Node, types: Sequence[TensorType | None],
              consts: Sequence[Tensor | None]) -> list[TensorType]:
        head = types[0] if types else None
        n, _, h, w = _dims(head, 4)
        a, c = len(read(node, "anchors")) // 2, int(read(node, "num_classes"))
        rows = a * h * w if isinstance(h, int) and isinstance(w, int) else None
        dt = head.dtype if head is not None else None
        return [TensorType(dt, (n, rows, 4)), TensorType(dt, (n, rows, c))]


# ---- BatchedNMS -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class NmsParams:
    """A BatchedNMS node's attributes (see the module doc)."""

    score_threshold: float
    iou_threshold: float
    max_output_boxes: int
    class_agnostic: bool
    pre_nms_top_k: int
    center: bool

    @classmethod
    def of(cls, node: Node) -> "NmsParams":
        return cls(float(read(node, "score_threshold")), float(read(node, "iou_threshold")),
                   int(read(node, "max_output_boxes")), bool(read(node, "class_agnostic")),
                   int(read(node, "pre_nms_top_k")), bool(read(node, "box_coding")))


@dataclass
class Candidates:
    """Each image's ranked candidates, M slots (N, M), best first: box and class index, score (compute
    dtype; -inf in the slots of no candidate, which come last), valid (a candidate fills the slot) and the
    corner/area columns of its box (kiln.ops.detection.box_columns)."""

    box: Tensor
    cls: Tensor
    score: Tensor
    valid: Tensor
    cols: Cols


def top_candidates(flat: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(index, value), each (N, k): the k largest entries of each row of flat (N, L), k <= L, by descending
    value, ties by lower index. No NaN may be in flat. Sizes depend on shapes only: the k-th value comes
    from torch.topk, entries above it are taken, and its ties in index order as far as needed."""
    n, length = (int(d) for d in flat.shape)
    if k >= length:
        val, idx = torch.sort(flat, dim=1, descending=True, stable=True)
        return idx, val
    kth = torch.topk(flat, k, 1, sorted=False).values.min(1, keepdim=True).values
    above = flat > kth
    tie = flat == kth
    need = k - above.sum(1, keepdim=True, dtype=torch.int32)
    take = above | (tie & (torch.cumsum(tie, 1, dtype=torch.int32) <= need))  # exactly k per row
    slot = torch.where(take, torch.cumsum(take, 1) - 1, k)
    src = torch.arange(length, device=flat.device).expand(n, length)
    idx = torch.zeros((n, k + 1), dtype=torch.int64, device=flat.device).scatter_(1, slot, src)[:, :k]
    val, order = torch.sort(flat.gather(1, idx), dim=1, descending=True, stable=True)  # idx ascending: stable
    return idx.gather(1, order), val


def candidate_scores(scores: Tensor, p: NmsParams) -> Tensor:
    """(N, B*C) scores in the compute dtype, -inf where not above the threshold (NaN included)."""
    n, b, c = (int(d) for d in scores.shape)
    flat = scores.to(_compute_dtype(scores)).reshape(n, b * c)
    return torch.where(flat > p.score_threshold, flat, torch.full_like(flat, -math.inf))


def make_candidates(boxes: Tensor, scores: Tensor, idx: Tensor, val: Tensor, center: bool) -> Candidates:
    """Candidates from each image's ranked flat indices box * C + class (N, M) and their scores."""
    c = int(scores.shape[2])
    box = torch.div(idx, c, rounding_mode="floor")
    rows = boxes.to(_compute_dtype(boxes)).gather(1, box[..., None].expand(*box.shape, 4))
    return Candidates(box, idx - box * c, val, val > -math.inf, box_columns(rows, center))


def greedy_keep(cols: Cols, valid: Tensor, group: Tensor | None, thr: float) -> Tensor:
    """Greedy NMS of ranked candidates (N, M), in torch ops with fixed sizes: keep (N, M) bool.

    A valid candidate is kept unless a kept candidate of higher rank and the same group (any candidate
    when group is None) overlaps it with IoU > thr. Blocks of _BLOCK ranks: first against the kept
    candidates of earlier blocks, in tiles of at most _TILE_PAIRS pairs, then one rank after the other."""
    n, m = (int(d) for d in valid.shape)
    keep = torch.zeros_like(valid)
    for lo in range(0, m, _BLOCK):
        hi = min(m, lo + _BLOCK)
        cur = [col[:, lo:hi] for col in cols]
        g = None if group is None else group[:, lo:hi]
        alive = valid[:, lo:hi].clone()
        step = max(1, _TILE_PAIRS // max(1, n * (hi - lo)))
        for p in range(0, lo, step):
            q = min(lo, p + step)
            over = iou_above([col[:, p:q, None] for col in cols], [col[:, None, :] for col in cur], thr)
            over &= keep[:, p:q, None]
            if g is not None:
                over &= group[:, p:q, None] == g[:, None, :]  # type: ignore[index]
            alive &= ~over.any(1)
        over = iou_above([col[:, :, None] for col in cur], [col[:, None, :] for col in cur], thr)
        if g is not None:
            over &= g[:, :, None] == g[:, None, :]
        for i in range(hi - lo - 1):
            alive[:, i + 1:] &= ~(over[:, i, i + 1:] & alive[:, i:i + 1])
        keep[:, lo:hi] = alive
    return keep


def detections(boxes: Tensor, scores: Tensor, c: Candidates, keep: Tensor, k: int,
               center: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The op's outputs from the kept candidates: the first k kept of each image, in rank order, zero padded."""
    n, m = (int(d) for d in keep.shape)
    dev = keep.device
    taken = keep & (torch.cumsum(keep, 1) <= k)
    num = taken.sum(1, keepdim=True).to(torch.int32)
    slot = torch.where(taken, torch.cumsum(taken, 1) - 1, k)
    if center:  # corners as box_columns computed them, x before y
        rows = torch.stack(c.cols[:4], -1).to(boxes.dtype)
    else:
        rows = boxes.gather(1, c.box[..., None].expand(n, m, 4))
    det_boxes = torch.zeros((n, k + 1, 4), dtype=boxes.dtype, device=dev)
    det_boxes.scatter_(1, slot[..., None].expand(n, m, 4), rows)
    det_scores = torch.zeros((n, k + 1), dtype=scores.dtype, device=dev).scatter_(1, slot, c.score.to(scores.dtype))
    det_classes = torch.zeros((n, k + 1), dtype=torch.int32, device=dev).scatter_(1, slot, c.cls.to(torch.int32))
    return num, det_boxes[:, :k], det_scores[:, :k], det_classes[:, :k]


def empty_detections(boxes: Tensor, scores: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The outputs of images without candidates."""
    n, dev = int(boxes.shape[0]), boxes.device
    return (torch.zeros((n, 1), dtype=torch.int32, device=dev), torch.zeros((n, k, 4), dtype=boxes.dtype, device=dev),
            torch.zeros((n, k), dtype=scores.dtype, device=dev), torch.zeros((n, k), dtype=torch.int32, device=dev))


def check_nms_inputs(node: Node, boxes: Tensor, scores: Tensor) -> None:
    """UnsupportedOpError unless boxes [N, B, 4] and scores [N, B, C] are float tensors."""
    require_float(node, boxes, scores)
    if (boxes.dim() != 3 or int(boxes.shape[2]) != 4 or scores.dim() != 3
            or tuple(scores.shape[:2]) != tuple(boxes.shape[:2])):
        raise UnsupportedOpError(f"node '{node.name}': BatchedNMS needs boxes [N, B, 4] and scores [N, B, C], "
                                 f"got {list(boxes.shape)} and {list(scores.shape)}")


Greedy = Callable[[Candidates, "NmsParams"], Tensor]
"""A greedy kernel: keep (N, M) of ranked candidates (the first max_output_boxes kept of each image must be
those of greedy_keep; later ones may be left out)."""


def batched_nms(node: Node, boxes: Tensor, scores: Tensor, greedy: Greedy | None = None,
                ranked: Callable[[Tensor, Tensor, NmsParams], Candidates] | None = None,
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """BatchedNMS: candidates (`ranked`, default the reference's fixed-size ranking), greedy selection
    (`greedy`, default greedy_keep), outputs. Tactics pass their own kernels for either step."""
    check_nms_inputs(node, boxes, scores)
    p = NmsParams.of(node)
    n, b, c = (int(d) for d in scores.shape)
    if n * b * c == 0:
        return empty_detections(boxes, scores, p.max_output_boxes)
    if ranked is None:
        idx, val = top_candidates(candidate_scores(scores, p), min(p.pre_nms_top_k, b * c))
        cand = make_candidates(boxes, scores, idx, val, p.center)
    else:
        cand = ranked(boxes, scores, p)
    if greedy is None:
        keep = greedy_keep(cand.cols, cand.valid, None if p.class_agnostic else cand.cls, p.iou_threshold)
    else:
        keep = greedy(cand, p)
    return detections(boxes, scores, cand, keep, p.max_output_boxes, p.center)


class BatchedNMS(OpDef):
    """Class-aware greedy NMS with fixed-size outputs (num_detections, det_boxes, det_scores, det_classes)."""

    op_type = "BatchedNMS"
    domain = DOMAIN
    version = 1
    arity = (2, 2)      # boxes, scores
    out_arity = (4, 4)
    attributes = {
        "score_threshold": Attr("float", 0.0, min=-math.inf, max=math.inf),
        "iou_threshold": Attr("float", 0.5, min=0.0, max=1.0),
        "max_output_boxes": Attr("int", 100, min=1, max=_MAX_OUT),
        "class_agnostic": Attr("int", 0, choices=(0, 1)),
        "pre_nms_top_k": Attr("int", 4096, min=1, max=_MAX_TOP_K),
        "box_coding": Attr("int", 0, choices=(0, 1)),  # 0: x1, y1, x2, y2; 1: cx, cy, w, h
    }

    def check(self, node: Node) -> None:
        b, s = (_dims(v.type if v is not None else None, 3) for v in (node.input(0), node.input(1)))
        if isinstance(b[2], int) and b[2] != 4 or any(isinstance(x, int) and isinstance(y, int) and x != y
                                                     for x, y in zip(b[:2], s[:2])):
            raise UnsupportedOpError(f"node '{node.name}': BatchedNMS needs boxes [N, B, 4] and scores [N, B, C], "
                                     f"got {list(b)} and {list(s)}")

    def compute(self, node: Node, boxes: Tensor, scores: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return batched_nms(node, boxes, scores)

    def infer(self, node: Node, types: Sequence[TensorType | None],
              consts: Sequence[Tensor | None]) -> list[TensorType]:
        boxes = types[0] if types else None
        scores = types[1] if len(types) > 1 else None
        n = _dims(boxes, 3)[0]
        if n is None:
            n = _dims(scores, 3)[0]
        k = int(read(node, "max_output_boxes"))
        return [TensorType(DType.INT32, (n, 1)), TensorType(boxes.dtype if boxes else None, (n, k, 4)),
                TensorType(scores.dtype if scores else None, (n, k)), TensorType(DType.INT32, (n, k))]


register_plugin(YoloDecode())
register_plugin(BatchedNMS())
