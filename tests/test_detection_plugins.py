"""The detection plugins of kiln/plugins/detection.py (domain kiln.plugins): YoloDecode and BatchedNMS.

Oracles: examples/zoo/yolo_decode.decode (the sample's torch decode) and a float64 numpy decode written here;
a float64 numpy greedy NMS written here (candidates above the threshold, best pre_nms_top_k by score with ties
by box then class, greedy per class or across classes, first K) and torchvision's batched_nms where it imports.
BatchedNMS runs as its reference, as cpu.batched_nms (NonMaxSuppression's C loop) and, under the Triton
interpreter (compiled on a GPU), as cuda.triton_batched_nms; ONNX NonMaxSuppression's cuda.triton_nms (the
same greedy kernel) is checked against its reference. Models built from onnx.helper with kiln.plugins nodes
(two heads decoded, concatenated, NMS) run through Kiln's builder, plan round trip and runtime on the CPU,
including heads made from rectangles drawn into an image, which must come out as exactly those detections.

The IoU cases are unambiguous by construction: integer coordinates and thresholds exact in float32 (the
float32 IoU test then agrees with exact arithmetic), or, for continuous boxes, inputs redrawn until no
tested pair's IoU lies within 1e-6 of the threshold.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from examples.zoo.yolo_decode import decode as zoo_decode
from kiln.backends.tactic import TacticContext, candidate_tactics, get_tactic
from kiln.builder import Builder, BuilderConfig
from kiln.errors import KilnError
from kiln.ir.dtype import DType
from kiln.ir.graph import Node, Value
from kiln.ir.types import TensorType
from kiln.ops.registry import lookup
from kiln.plugins import detection as D
from kiln.testing import run_kiln

CPU = torch.device("cpu")
DOMAIN = "kiln.plugins"
A13 = [81.0, 82.0, 135.0, 169.0, 344.0, 319.0]
A26 = [10.0, 14.0, 23.0, 27.0, 37.0, 58.0]


def _node(op: str, n_in: int, n_out: int, dtype: DType = DType.FLOAT32, domain: str = DOMAIN,
          opset: int = 1, **attrs: Any) -> Node:
    ins = [Value(f"x{i}", TensorType(dtype, None)) for i in range(n_in)]
    return Node(op, ins, [Value(f"y{i}") for i in range(n_out)], attrs, name=op.lower(), domain=domain,
                opset=opset)


def _nms_node(**attrs: Any) -> Node:
    return _node("BatchedNMS", 2, 4, **attrs)


def _sig(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


# ---- oracles -------------------------------------------------------------------------------------------

def decode64(head: np.ndarray, anchors: list[float], c: int, in_hw: tuple[int, int], sxy: float = 1.0,
             lb: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """YoloDecode in float64 numpy: boxes [N, A*H*W, 4] (x1, y1, x2, y2, letterbox undone), scores [N, A*H*W, C]."""
    n, _, h, w = head.shape
    a = len(anchors) // 2
    t = head.astype(np.float64).reshape(n, a, 5 + c, h, w)
    gy, gx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    cx = (_sig(t[:, :, 0]) * sxy - (sxy - 1) / 2 + gx) * (in_hw[1] / w)
    cy = (_sig(t[:, :, 1]) * sxy - (sxy - 1) / 2 + gy) * (in_hw[0] / h)
    aw = np.asarray(anchors[0::2], np.float64)[None, :, None, None]
    ah = np.asarray(anchors[1::2], np.float64)[None, :, None, None]
    bw, bh = np.exp(t[:, :, 2]) * aw, np.exp(t[:, :, 3]) * ah
    x1, y1, x2, y2 = cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2
    if lb is not None:
        sx, sy, px, py = (np.asarray(lb, np.float64).reshape(-1, 4)[:, i, None, None, None] for i in range(4))
        x1, x2, y1, y2 = (x1 - px) / sx, (x2 - px) / sx, (y1 - py) / sy, (y2 - py) / sy
    boxes = np.stack([x1, y1, x2, y2], -1).reshape(n, a * h * w, 4)
    scores = (_sig(t[:, :, 4:5]) * _sig(t[:, :, 5:])).transpose(0, 1, 3, 4, 2).reshape(n, a * h * w, c)
    return boxes, scores


def _corners64(box: np.ndarray, center: bool) -> tuple[float, float, float, float]:
    b = [float(v) for v in box]
    if center:
        return b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    return min(b[0], b[2]), min(b[1], b[3]), max(b[0], b[2]), max(b[1], b[3])


def _iou64(a: tuple[float, ...], b: tuple[float, ...]) -> float | None:
    """IoU in float64; None where a box has no positive area or they do not intersect (never suppresses)."""
    area_a, area_b = (a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1])
    iw, ih = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    if not (area_a > 0 and area_b > 0 and iw > 0 and ih > 0):
        return None
    inter = iw * ih
    return inter / (area_a + area_b - inter)


def nms64(boxes: np.ndarray, scores: np.ndarray, score_thr: float = 0.0, iou_thr: float = 0.5, k: int = 100,
          agnostic: bool = False, top_k: int = 4096, center: bool = False,
          stats: dict[str, int] | None = None) -> tuple[list[np.ndarray], float]:
    """The float64 greedy NMS oracle: ([num, det_boxes, det_scores, det_classes], the smallest |IoU - threshold|
    over the pairs it tested); `stats` counts the candidates it suppressed. Thresholds are rounded to float32,
    as the op compares in float32."""
    s_thr, i_thr = float(np.float32(score_thr)), float(np.float32(iou_thr))
    n, b, c = scores.shape
    num = np.zeros((n, 1), np.int32)
    det_b = np.zeros((n, k, 4), boxes.dtype)
    det_s = np.zeros((n, k), scores.dtype)
    det_c = np.zeros((n, k), np.int32)
    margin = np.inf
    for i in range(n):
        sc = scores[i].astype(np.float64)
        cand = [(bi, ci) for bi in range(b) for ci in range(c) if sc[bi, ci] > s_thr]
        cand.sort(key=lambda bc: (-sc[bc], bc[0], bc[1]))
        kept: list[tuple[int, int]] = []
        for bi, ci in cand[:top_k]:
            box = _corners64(boxes[i, bi], center)
            ok = True
            for kb, kc in kept:
                if not agnostic and kc != ci:
                    continue
                iou = _iou64(_corners64(boxes[i, kb], center), box)
                if iou is not None:
                    margin = min(margin, abs(iou - i_thr))
                    if iou > i_thr:
                        ok = False
                        if stats is not None:
                            stats["suppressed"] = stats.get("suppressed", 0) + 1
                        break
            if ok:
                kept.append((bi, ci))
                if len(kept) == k:
                    break
        num[i, 0] = len(kept)
        for j, (bi, ci) in enumerate(kept):
            det_b[i, j] = _corners64(boxes[i, bi], True) if center else boxes[i, bi]
            det_s[i, j] = scores[i, bi, ci]
            det_c[i, j] = ci
    return [num, det_b, det_s, det_c], margin


def grid_problem(rng: np.random.Generator, n: int, b: int, c: int, center: bool = False) -> tuple[np.ndarray, ...]:
    """Boxes on an integer grid, crowded, half of them near-copies of the others (moved and resized by up to
    a pixel), some of zero width or height, some with their corners swapped; scores in steps of 1/8 (many
    ties) for `c` classes."""
    half = b // 2
    xy = rng.integers(0, 24, (n, half, 2))
    wh = rng.integers(0, 16, (n, half, 2))
    src = rng.integers(0, half, (n, b - half))
    xy = np.concatenate([xy, np.take_along_axis(xy, src[..., None], 1) + rng.integers(-1, 2, (n, b - half, 2))], 1)
    wh = np.concatenate([wh, np.maximum(np.take_along_axis(wh, src[..., None], 1)
                                        + rng.integers(-1, 2, (n, b - half, 2)), 0)], 1)
    xy, wh = xy.astype(np.float32), wh.astype(np.float32)
    if center:
        boxes = np.concatenate([xy + wh / 2, wh], -1)
    else:
        boxes = np.concatenate([xy, xy + wh], -1)
        flip = rng.random((n, b)) < 0.2
        boxes[flip] = boxes[flip][:, [2, 3, 0, 1]]
    scores = (rng.integers(0, 9, (n, b, c)) / 8).astype(np.float32)
    return boxes, scores


def _same(got: Any, want: list[np.ndarray], which: tuple[int, ...] = (0, 1, 2, 3)) -> None:
    """The outputs `which` equal the oracle's exactly, with its dtypes and shapes."""
    dtypes = (np.int32, want[1].dtype, want[2].dtype, np.int32)
    names = ("num_detections", "det_boxes", "det_scores", "det_classes")
    for i in which:
        g, w, dt, name = got[i], want[i], dtypes[i], names[i]
        g = g.cpu().numpy() if isinstance(g, torch.Tensor) else np.asarray(g)
        assert g.dtype == dt and g.shape == w.shape, (name, g.dtype, g.shape, w.shape)
        np.testing.assert_array_equal(g, w, err_msg=name)


# ---- YoloDecode -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("a,c,h,w,in_hw,sxy", [(3, 80, 13, 13, (416, 416), 1.0), (3, 4, 9, 7, (288, 224), 1.05),
                                               (2, 1, 5, 8, (160, 256), 1.2)])
def test_decode_matches_zoo_decode_and_float64(a: int, c: int, h: int, w: int, in_hw: tuple[int, int],
                                               sxy: float) -> None:
    rng = np.random.default_rng()
    anchors = [float(v) for v in rng.uniform(5, 300, 2 * a).round(1)]
    head = torch.from_numpy((rng.standard_normal((2, a * (5 + c), h, w)) * 2).astype(np.float32))
    node = _node("YoloDecode", 1, 2, anchors=anchors, num_classes=c, input_size=list(in_hw), scale_x_y=sxy)
    for run in (lookup("YoloDecode", DOMAIN).bind(node), lambda x: D.YoloDecode().compute(node, x)):
        boxes, scores = run(head)
        rows = zoo_decode(head, list(zip(anchors[0::2], anchors[1::2])), in_hw, c, sxy)
        cx, cy, bw, bh = rows[..., 0], rows[..., 1], rows[..., 2], rows[..., 3]
        # the same float32 operations as the sample's decode: the same numbers
        assert torch.equal(boxes, torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1))
        assert torch.equal(scores, rows[..., 4:5] * rows[..., 5:])
    b64, s64 = decode64(head.numpy(), anchors, c, in_hw, sxy)
    np.testing.assert_allclose(boxes.numpy(), b64, rtol=2e-6, atol=1e-4)
    np.testing.assert_allclose(scores.numpy(), s64, rtol=2e-6, atol=1e-7)


def test_decode_letterbox_attribute_and_input() -> None:
    rng = np.random.default_rng()
    head = rng.standard_normal((2, 3 * 7, 6, 5)).astype(np.float32)
    lb = np.array([[0.5, 0.75, 3.0, 11.0], [1.6, 1.6, 0.0, -40.0]], np.float32)
    kw = dict(anchors=A26, num_classes=2, input_size=[192, 160])
    by_input = lookup("YoloDecode", DOMAIN).bind(_node("YoloDecode", 2, 2, **kw))(torch.from_numpy(head),
                                                                                torch.from_numpy(lb))
    want = decode64(head, A26, 2, (192, 160), lb=lb)
    for got, w in zip(by_input, want):
        np.testing.assert_allclose(got.numpy(), w, rtol=2e-6, atol=2e-4)
    for i in range(2):
        by_attr = D.YoloDecode().compute(_node("YoloDecode", 1, 2, letterbox=[float(v) for v in lb[i]], **kw),
                                         torch.from_numpy(head[i:i + 1]))
        for got, w in zip(by_attr, want):
            np.testing.assert_allclose(got.numpy(), w[i:i + 1], rtol=2e-6, atol=2e-4)


def test_decode_half_computes_in_float32() -> None:
    head = torch.randn(1, 3 * 6, 4, 4).half()
    node = _node("YoloDecode", 1, 2, dtype=DType.FLOAT16, anchors=A13, num_classes=1, input_size=[128, 128])
    boxes, scores = D.YoloDecode().compute(node, head)
    want = decode64(head.float().numpy(), A13, 1, (128, 128))
    assert boxes.dtype == scores.dtype == torch.float16
    np.testing.assert_allclose(boxes.float().numpy(), want[0], rtol=1e-3, atol=0.1)
    np.testing.assert_allclose(scores.float().numpy(), want[1], rtol=1e-3, atol=1e-3)


# ---- BatchedNMS against the float64 oracle ----------------------------------------------------------------

NMS_CASES = [  # (iou_threshold, max_output_boxes, pre_nms_top_k, class_agnostic, box_coding, classes)
    (0.5, 30, 4096, 0, 0, 4), (0.5, 30, 4096, 1, 0, 4), (0.375, 7, 40, 0, 0, 2), (0.625, 100, 25, 1, 0, 3),
    (0.0, 20, 4096, 0, 0, 3), (1.0, 12, 4096, 1, 0, 3), (0.5, 25, 60, 0, 1, 2), (0.25, 40, 4096, 1, 1, 5),
]


@pytest.mark.parametrize("iou,k,top_k,agnostic,coding,c", NMS_CASES)
def test_nms_matches_float64_oracle(iou: float, k: int, top_k: int, agnostic: int, coding: int, c: int) -> None:
    """Crowded integer boxes, tied scores, several classes: the reference and cpu.batched_nms give exactly the
    oracle's detections (ranks, ties, per-class or agnostic suppression, top-k cut, padding)."""
    rng = np.random.default_rng()
    boxes, scores = grid_problem(rng, 3, 70, c, center=bool(coding))
    attrs = dict(score_threshold=0.2, iou_threshold=iou, max_output_boxes=k, pre_nms_top_k=top_k,
                 class_agnostic=agnostic, box_coding=coding)
    want, _ = nms64(boxes, scores, 0.2, iou, k, bool(agnostic), top_k, bool(coding))
    node = _nms_node(**attrs)
    args = (torch.from_numpy(boxes), torch.from_numpy(scores))
    _same(D.BatchedNMS().compute(node, *args), want)
    tactic = get_tactic("cpu.batched_nms")
    if tactic is not None and tactic.supports(node, TacticContext(CPU)):
        _same(tactic.make(node, {}, CPU)(*args), want)
    stats: dict[str, int] = {}  # the problem is one where NMS removes candidates (all of them kept if it were not)
    nms64(boxes, scores, 0.2, iou, 10**6, bool(agnostic), top_k, bool(coding), stats)
    assert stats.get("suppressed", 0) > 0 or iou == 1.0


def test_nms_fixed_size_outputs_and_padding() -> None:
    rng = np.random.default_rng()
    boxes, scores = grid_problem(rng, 2, 12, 3)
    scores[1] = 0.0  # image 1: no candidate at all
    node = _nms_node(score_threshold=0.1, max_output_boxes=50)
    num, db, ds, dc = D.BatchedNMS().compute(node, torch.from_numpy(boxes), torch.from_numpy(scores))
    assert num.shape == (2, 1) and num.dtype == torch.int32 and dc.dtype == torch.int32
    assert db.shape == (2, 50, 4) and ds.shape == (2, 50) and dc.shape == (2, 50)
    assert 0 < int(num[0]) < 36 and int(num[1]) == 0
    n0 = int(num[0])
    assert not db[0, n0:].any() and not ds[0, n0:].any() and not dc[0, n0:].any() and not db[1].any()
    assert bool((ds[0, :n0] > 0.1).all()) and bool((ds[0, 1:n0] <= ds[0, :n0 - 1]).all())  # by descending score
    _same((num, db, ds, dc), nms64(boxes, scores, 0.1, 0.5, 50)[0])
    empty = D.BatchedNMS().compute(node, torch.zeros(2, 0, 4), torch.zeros(2, 0, 3))
    assert [tuple(t.shape) for t in empty] == [(2, 1), (2, 50, 4), (2, 50), (2, 50)] and not any(t.any() for t in empty)


def test_nms_nan_scores_and_half_inputs() -> None:
    rng = np.random.default_rng()
    boxes, scores = grid_problem(rng, 2, 40, 3)
    scores[0, ::3, 1] = np.nan  # never candidates
    want, _ = nms64(boxes, scores, 0.2, 0.5, 30)
    node = _nms_node(score_threshold=0.2, max_output_boxes=30)
    _same(D.BatchedNMS().compute(node, torch.from_numpy(boxes), torch.from_numpy(scores)), want)
    half = [torch.from_numpy(boxes).half(), torch.from_numpy(scores).half()]  # grid values are exact in float16
    got = D.BatchedNMS().compute(_nms_node(score_threshold=0.2, max_output_boxes=30), *half)
    assert got[1].dtype == got[2].dtype == torch.float16
    _same([got[0], got[1].float(), got[2].float(), got[3]], want)


def _continuous(rng: np.random.Generator, n: int, b: int, c: int) -> tuple[np.ndarray, np.ndarray]:
    lo = rng.uniform(0, 60, (n, b, 2))
    boxes = np.concatenate([lo, lo + rng.uniform(2, 30, (n, b, 2))], -1).astype(np.float32)
    return boxes, rng.random((n, b, c), np.float32)


def _torchvision_ops() -> Any:
    try:
        import torchvision.ops
        return torchvision.ops
    except Exception as e:  # torchvision built for another torch fails at import with a RuntimeError
        first = (str(e).strip().splitlines() or [""])[0][:120]
        pytest.skip(f"torchvision is not usable here ({type(e).__name__}: {first}); the float64 oracle checks BatchedNMS")


@pytest.mark.parametrize("agnostic", [0, 1])
def test_nms_matches_torchvision(agnostic: int) -> None:
    ops = _torchvision_ops()
    rng = np.random.default_rng()
    boxes, scores = _continuous(rng, 2, 150, 3)
    k, thr = 40, 0.3
    node = _nms_node(score_threshold=thr, iou_threshold=0.5, max_output_boxes=k, class_agnostic=agnostic)
    got = D.BatchedNMS().compute(node, torch.from_numpy(boxes), torch.from_numpy(scores))
    for i in range(2):
        bi, ci = np.nonzero(scores[i] > np.float32(thr))
        b, s = torch.from_numpy(boxes[i][bi]), torch.from_numpy(scores[i][bi, ci])
        idxs = torch.zeros_like(torch.from_numpy(ci)) if agnostic else torch.from_numpy(ci)
        keep = ops.batched_nms(b, s, idxs, 0.5)[:k]  # by descending score (scores are tie-free here)
        n = len(keep)
        assert int(got[0][i, 0]) == n
        assert torch.equal(got[1][i, :n], b[keep]) and torch.equal(got[2][i, :n], s[keep])
        assert torch.equal(got[3][i, :n].long(), torch.from_numpy(ci)[keep])


# ---- no host reads: sizes from shapes and attributes only -----------------------------------------------

class _NoHostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Fails on the ops that read device values on the host (item, bool(), nonzero, masked selection)."""

    FORBIDDEN = ("aten::_local_scalar_dense", "aten::is_nonzero", "aten::nonzero", "aten::nonzero_static",
                 "aten::masked_select", "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive")

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        assert func._schema.name not in self.FORBIDDEN, f"{func._schema.name} reads a value on the host"
        return func(*args, **(kwargs or {}))


def test_reference_reads_no_values_on_the_host() -> None:
    """What makes the reference capturable in a CUDA graph, checked on the CPU: it runs on meta tensors (which
    hold no values) with the real output shapes, and real CPU runs call no op that reads a value."""
    node = _nms_node(max_output_boxes=17, pre_nms_top_k=50)
    dec = _node("YoloDecode", 2, 2, anchors=A26, num_classes=3, input_size=[64, 64])
    meta = D.BatchedNMS().compute(node, torch.empty(2, 90, 4, device="meta"), torch.empty(2, 90, 3, device="meta"))
    assert [tuple(t.shape) for t in meta] == [(2, 1), (2, 17, 4), (2, 17), (2, 17)]
    mb = lookup("YoloDecode", DOMAIN).bind(dec)(torch.empty(2, 24, 4, 4, device="meta"), torch.empty(2, 4, device="meta"))
    assert [tuple(t.shape) for t in mb] == [(2, 48, 4), (2, 48, 3)]
    boxes, scores = grid_problem(np.random.default_rng(), 2, 90, 3)
    run = lookup("YoloDecode", DOMAIN).bind(dec)
    head, lb = torch.randn(2, 24, 4, 4), torch.tensor([[1.0, 1.0, 0.0, 0.0]] * 2)
    run(head, lb)  # the anchors are made once per device, before any capture
    with _NoHostReads():
        D.BatchedNMS().compute(node, torch.from_numpy(boxes), torch.from_numpy(scores))
        run(head, lb)
    onnx_nms = _node("NonMaxSuppression", 3, 1, domain="", opset=11)
    with pytest.raises(AssertionError, match="reads a value on the host"), _NoHostReads():  # the check bites
        lookup("NonMaxSuppression").compute(onnx_nms, torch.from_numpy(boxes), torch.from_numpy(scores).transpose(1, 2),
                                            torch.tensor([5]))


# ---- models built by Kiln -----------------------------------------------------------------------------------

def pipeline_model(c: int, n: int, nms: dict[str, Any], sxy13: float = 1.0, lb_input: bool = True,
                   lb_attr: list[float] | None = None) -> onnx.ModelProto:
    """Two YOLOv4-tiny heads (13x13, 26x26 at 416), each decoded, concatenated along the boxes, then BatchedNMS."""
    extra = {} if lb_attr is None else {"letterbox": lb_attr}
    lb = ["lb"] if lb_input else []
    nodes = [
        helper.make_node("YoloDecode", ["h13", *lb], ["b13", "s13"], domain=DOMAIN, name="decode13", anchors=A13,
                         num_classes=c, input_size=[416, 416], scale_x_y=sxy13, **extra),
        helper.make_node("YoloDecode", ["h26", *lb], ["b26", "s26"], domain=DOMAIN, name="decode26", anchors=A26,
                         num_classes=c, input_size=[416, 416], **extra),
        helper.make_node("Concat", ["b13", "b26"], ["boxes"], axis=1, name="cat_boxes"),
        helper.make_node("Concat", ["s13", "s26"], ["scores"], axis=1, name="cat_scores"),
        helper.make_node("BatchedNMS", ["boxes", "scores"], ["num_detections", "det_boxes", "det_scores",
                                                             "det_classes"], domain=DOMAIN, name="nms", **nms),
    ]
    inputs = [helper.make_tensor_value_info("h13", TensorProto.FLOAT, [n, 3 * (5 + c), 13, 13]),
              helper.make_tensor_value_info("h26", TensorProto.FLOAT, [n, 3 * (5 + c), 26, 26])]
    if lb_input:
        inputs.append(helper.make_tensor_value_info("lb", TensorProto.FLOAT, [n, 4]))
    outs = [helper.make_empty_tensor_value_info(v) for v in ("num_detections", "det_boxes", "det_scores", "det_classes")]
    m = helper.make_model(helper.make_graph(nodes, "yolo_post", inputs, outs),
                          opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    m.ir_version = min(m.ir_version, 10)
    return m


def test_two_head_model_builds_and_matches() -> None:
    """decode x 2 + Concat + BatchedNMS built by Kiln (CPU, plan round trip) against the sample's decode and
    the float64 NMS oracle, on random heads (redrawn where an IoU lies within 1e-6 of the threshold)."""
    rng = np.random.default_rng()
    c, n, nms = 5, 2, dict(score_threshold=0.35, iou_threshold=0.45, max_output_boxes=25, pre_nms_top_k=600)
    lb = np.array([[0.8, 0.8, 0.0, 41.6], [1.0, 1.0, 0.0, 0.0]], np.float32)
    for _ in range(5):
        feeds = {"h13": (rng.standard_normal((n, 3 * (5 + c), 13, 13)) * 1.5).astype(np.float32),
                 "h26": (rng.standard_normal((n, 3 * (5 + c), 26, 26)) * 1.5).astype(np.float32), "lb": lb}
        rows = torch.cat([zoo_decode(feeds["h13"], list(zip(A13[0::2], A13[1::2])), 416, c, 1.05),
                          zoo_decode(feeds["h26"], list(zip(A26[0::2], A26[1::2])), 416, c)], 1)
        cx, cy, w, h = rows[..., 0], rows[..., 1], rows[..., 2], rows[..., 3]
        lbt = torch.from_numpy(lb)[:, None, :]
        boxes = torch.stack([(cx - w / 2 - lbt[..., 2]) / lbt[..., 0], (cy - h / 2 - lbt[..., 3]) / lbt[..., 1],
                             (cx + w / 2 - lbt[..., 2]) / lbt[..., 0], (cy + h / 2 - lbt[..., 3]) / lbt[..., 1]], -1)
        want, margin = nms64(boxes.numpy(), (rows[..., 4:5] * rows[..., 5:]).numpy(), **_oracle_args(nms))
        if margin > 1e-6:
            break
    assert margin > 1e-6, "no unambiguous random heads in 5 draws"
    got = run_kiln(pipeline_model(c, n, nms, sxy13=1.05), feeds)
    assert 3 < int(want[0].min()) and int(want[0].max()) <= 25
    _same(got, want, (0, 2, 3))
    np.testing.assert_allclose(got[1], want[1], rtol=1e-6, atol=1e-4)  # the letterbox division's rounding


def _oracle_args(nms: dict[str, Any]) -> dict[str, Any]:
    return {"score_thr": nms.get("score_threshold", 0.0), "iou_thr": nms.get("iou_threshold", 0.5),
            "k": nms.get("max_output_boxes", 100), "agnostic": bool(nms.get("class_agnostic", 0)),
            "top_k": nms.get("pre_nms_top_k", 4096)}


# An image the test draws (240 x 320, letterboxed into 416 x 416: scale 1.3, pad_y 52) and, per object,
# (class, objectness logit, head, anchor); `same_as` objects are not drawn: they reuse a drawn object's box,
# scaled by `grow` and shifted by `shift` pixels (original image), and are what NMS must remove or keep.
RECTS = {"car": ((40, 50, 140, 170), (255, 0, 0)), "bus": ((180, 30, 300, 200), (0, 255, 0)),
         "sign": ((200, 150, 236, 186), (0, 0, 255))}
OBJECTS = [  # name, class, obj logit, head, anchor, same_as, grow, shift
    ("car", 2, 6.0, 13, 1, None, 1.0, 0.0),
    ("bus", 0, 5.0, 13, 2, None, 1.0, 0.0),
    ("sign", 1, 4.0, 26, 2, None, 1.0, 0.0),
    ("car_as_truck", 3, 3.0, 13, 2, "car", 1.0, 0.0),  # another class on the car: kept unless class-agnostic
    ("car_again", 2, 2.5, 13, 0, "car", 1.08, 0.0),     # the car, 8% larger, lower score: removed
    ("sign_again", 1, 2.0, 26, 1, "sign", 1.0, 3.0),    # the sign, 3 px to the right, lower score: removed
]
CLASSES, CLS_LOGIT, SCALE, PAD = 4, 5.0, 1.3, (0.0, 52.0)


def _drawn_boxes() -> dict[str, tuple[float, float, float, float]]:
    """Draws the rectangles and reads each one's box back from its pixels."""
    img = np.zeros((240, 320, 3), np.uint8)
    for (x1, y1, x2, y2), color in RECTS.values():
        img[y1:y2, x1:x2] = color
    out = {}
    for name, (_, color) in RECTS.items():
        ys, xs = np.nonzero((img == np.array(color, np.uint8)).all(-1))
        out[name] = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
    return out


def _drawn_heads(sxy13: float) -> tuple[dict[str, np.ndarray], list[tuple[str, int, float, tuple[float, ...]]]]:
    """Raw head maps that decode to OBJECTS, background elsewhere; and the objects (name, class, score, box)."""
    drawn = _drawn_boxes()
    heads = {g: np.full((1, 3 * (5 + CLASSES), g, g), -9.0, np.float32) for g in (13, 26)}
    for hm in heads.values():
        hm[0, 4::5 + CLASSES] = -12.0  # objectness of every slot: background
        for a in range(3):
            hm[0, a * (5 + CLASSES):a * (5 + CLASSES) + 4] = 0.0
    objects, used = [], set()
    for name, cls, obj, g, a, same_as, grow, shift in OBJECTS:
        x1, y1, x2, y2 = drawn[same_as or name]
        cx, cy = (x1 + x2) / 2 + shift, (y1 + y2) / 2
        w, h = (x2 - x1) * grow, (y2 - y1) * grow
        box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
        ix, iy = cx * SCALE + PAD[0], cy * SCALE + PAD[1]  # in the network input
        stride, s = 416 / g, (sxy13 if g == 13 else 1.0)
        gx, gy = int(ix // stride), int(iy // stride)
        assert (g, a, gx, gy) not in used
        used.add((g, a, gx, gy))
        anchors = A13 if g == 13 else A26
        raw = [(ix / stride - gx + (s - 1) / 2) / s, (iy / stride - gy + (s - 1) / 2) / s]
        assert all(0 < r < 1 for r in raw)
        ch = a * (5 + CLASSES)
        hm = heads[g][0]
        hm[ch:ch + 2, gy, gx] = np.log(np.asarray(raw) / (1 - np.asarray(raw)))
        hm[ch + 2, gy, gx] = np.log(w * SCALE / anchors[2 * a])
        hm[ch + 3, gy, gx] = np.log(h * SCALE / anchors[2 * a + 1])
        hm[ch + 4, gy, gx] = obj
        hm[ch + 5 + cls, gy, gx] = CLS_LOGIT
        objects.append((name, cls, float(_sig(obj) * _sig(CLS_LOGIT)), box))
    return {f"h{g}": v for g, v in heads.items()}, objects


@pytest.mark.parametrize("agnostic", [0, 1])
def test_drawn_image_gives_exactly_its_detections(agnostic: int) -> None:
    sxy13 = 1.05
    feeds, objects = _drawn_heads(sxy13)
    feeds["lb"] = np.array([[SCALE, SCALE, *PAD]], np.float32)
    nms = dict(score_threshold=0.25, iou_threshold=0.45, max_output_boxes=10, class_agnostic=agnostic,
               pre_nms_top_k=64)
    num, boxes, scores, classes = run_kiln(pipeline_model(CLASSES, 1, nms, sxy13=sxy13), feeds)
    expect = ["car", "bus", "sign"] + ([] if agnostic else ["car_as_truck"])
    known = {o[0]: o for o in objects}
    assert int(num[0, 0]) == len(expect)
    for j, name in enumerate(expect):
        _, cls, score, box = known[name]
        assert int(classes[0, j]) == cls, (j, name)
        np.testing.assert_allclose(scores[0, j], score, rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(boxes[0, j], box, atol=2e-3, err_msg=name)
    n = len(expect)
    assert not boxes[0, n:].any() and not scores[0, n:].any() and not classes[0, n:].any()


def test_heuristic_build_picks_the_c_greedy_on_the_cpu() -> None:
    """At optimization level 0 (no timing) the plan runs BatchedNMS on cpu.batched_nms (NonMaxSuppression's C
    loop) where a C compiler works, and its outputs are the reference tactic's."""
    from kiln.backends.cpu.nms import _library
    rng = np.random.default_rng()
    c, nms = 3, {"max_output_boxes": 8, "score_threshold": 0.4}
    model = pipeline_model(c, 1, nms, lb_input=False, lb_attr=[1.25, 1.25, 0.0, 26.0])
    plan = Builder().build(model, BuilderConfig(device="cpu", optimization_level=0))
    tactics = {s["op"]: s["tactic"] for s in plan.graph["steps"]}
    assert tactics["BatchedNMS"] == ("cpu.batched_nms" if _library() is not None else "ref"), tactics
    feeds = {f"h{g}": rng.standard_normal((1, 3 * (5 + c), g, g)).astype(np.float32) for g in (13, 26)}
    got = run_kiln(model, feeds, config=BuilderConfig(device="cpu", optimization_level=0))
    d13 = D.YoloDecode().compute(_node("YoloDecode", 1, 2, anchors=A13, num_classes=c, input_size=[416, 416],
                                       letterbox=[1.25, 1.25, 0.0, 26.0]), torch.from_numpy(feeds["h13"]))
    d26 = D.YoloDecode().compute(_node("YoloDecode", 1, 2, anchors=A26, num_classes=c, input_size=[416, 416],
                                       letterbox=[1.25, 1.25, 0.0, 26.0]), torch.from_numpy(feeds["h26"]))
    want = D.BatchedNMS().compute(_nms_node(**nms), torch.cat([d13[0], d26[0]], 1), torch.cat([d13[1], d26[1]], 1))
    assert int(want[0]) > 0
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w.numpy())


# ---- bad attributes and inputs: one line ---------------------------------------------------------------------

def _one_node(op: str, attrs: dict[str, Any], head_channels: int = 27, lb: bool = False) -> onnx.ModelProto:
    if op == "YoloDecode":
        ins = [helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, head_channels, 4, 4])]
        if lb:
            ins.append(helper.make_tensor_value_info("lb", TensorProto.FLOAT, [1, 4]))
        node = helper.make_node(op, [i.name for i in ins], ["b", "s"], domain=DOMAIN, name="dec", **attrs)
    else:
        ins = [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 10, 4]),
               helper.make_tensor_value_info("s", TensorProto.FLOAT, [1, 10, 3])]
        node = helper.make_node(op, ["b", "s"], ["n", "db", "ds", "dc"], domain=DOMAIN, name="nms", **attrs)
    outs = [helper.make_empty_tensor_value_info(o) for o in node.output]
    m = helper.make_model(helper.make_graph([node], "g", ins, outs),
                          opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    m.ir_version = min(m.ir_version, 10)
    return m


GOOD = dict(anchors=A26, num_classes=4, input_size=[64, 64])
BAD = [  # op, attributes, input channels, letterbox input, words the message must hold
    ("YoloDecode", dict(GOOD, anchors=[10.0, 14.0, 23.0]), 27, False, "'anchors'"),
    ("YoloDecode", dict(GOOD, anchors=[10.0, -14.0, 23.0, 27.0, 37.0, 58.0]), 27, False, "'anchors'"),
    ("YoloDecode", dict(GOOD, num_classes=0), 27, False, "'num_classes'"),
    ("YoloDecode", {k: v for k, v in GOOD.items() if k != "input_size"}, 27, False, "'input_size' is required"),
    ("YoloDecode", dict(GOOD, scale_x_y=0.0), 27, False, "'scale_x_y'"),
    ("YoloDecode", dict(GOOD, letterbox=[1.0, 1.0, 0.0]), 27, False, "'letterbox'"),
    ("YoloDecode", dict(GOOD, letterbox=[1.0, 1.0, 0.0, 0.0]), 27, True, "not both"),
    ("YoloDecode", GOOD, 26, False, "27 channels"),
    ("BatchedNMS", dict(iou_threshold=1.5), 0, False, "'iou_threshold'"),
    ("BatchedNMS", dict(class_agnostic=2), 0, False, "'class_agnostic'"),
    ("BatchedNMS", dict(max_output_boxes=0), 0, False, "'max_output_boxes'"),
    ("BatchedNMS", dict(pre_nms_top_k=-1), 0, False, "'pre_nms_top_k'"),
    ("BatchedNMS", dict(score_threshold=float("nan")), 0, False, "'score_threshold'"),
    ("BatchedNMS", dict(no_such=1), 0, False, "'no_such'"),
]


@pytest.mark.parametrize("op,attrs,ch,lb,words", BAD)
def test_bad_attributes_fail_in_one_line(op: str, attrs: dict[str, Any], ch: int, lb: bool, words: str) -> None:
    with pytest.raises(KilnError) as e:
        Builder().build(_one_node(op, attrs, ch, lb), BuilderConfig(device="cpu"))
    msg = str(e.value)
    assert "\n" not in msg and words in msg and op in msg, msg


def test_bad_attribute_on_the_command_line(tmp_path: Any, cli: Any) -> None:
    path, out = tmp_path / "bad.onnx", tmp_path / "bad.kiln"
    onnx.save(_one_node("BatchedNMS", dict(iou_threshold=2.0)), str(path))
    r = cli("build", str(path), "-o", str(out), "-q")
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith("kiln: error:"), r.stderr
    assert "iou_threshold" in lines[0] and "Traceback" not in r.stderr and not out.exists()


# ---- Mish: YOLOv4's conv + BN + Mish is one FusedConv --------------------------------------------------------

@pytest.mark.parametrize("form", ["op", "pattern"])
def test_conv_bn_mish_is_one_fused_conv(form: str) -> None:
    """The Mish op and its x * tanh(softplus(x)) export both fuse with the conv and its folded BN; on the CPU
    oneDNN's direct conv (cpu.conv_dnnl) applies it as a post-op, on CUDA cuda.triton_conv in its epilogue."""
    from tests.passes.models import compare, model, ops, optimized
    rng = np.random.default_rng()
    inits = {"w": (rng.standard_normal((8, 4, 3, 3)) * 0.3).astype(np.float32),
             "g": rng.uniform(0.5, 1.5, 8).astype(np.float32), "bb": rng.standard_normal(8).astype(np.float32),
             "mu": rng.standard_normal(8).astype(np.float32), "var": rng.uniform(0.5, 1.5, 8).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c0"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("BatchNormalization", ["c0", "g", "bb", "mu", "var"], ["c"], name="bn")]
    if form == "op":
        nodes.append(helper.make_node("Mish", ["c"], ["y"], name="mish"))
    else:
        nodes += [helper.make_node("Softplus", ["c"], ["sp"]), helper.make_node("Tanh", ["sp"], ["t"]),
                  helper.make_node("Mul", ["c", "t"], ["y"])]
    m = model(nodes, {"x": (1, 4, 10, 10)}, ["y"], inits, opset=18 if form == "op" else 17)
    g, _ = optimized(m)
    assert ops(g) == ["FusedConv"] and g.nodes[0].attrs["activation"] == "Mish"
    cpu_ids = [t.id for t in candidate_tactics(g.nodes[0], TacticContext(CPU))]
    cuda_ids = [t.id for t in candidate_tactics(g.nodes[0], TacticContext(torch.device("cuda"), fp16=True))]
    assert "cpu.conv_dnnl" in cpu_ids or "cpu.conv_onednn" in cpu_ids, cpu_ids
    assert "cuda.triton_conv" in cuda_ids or get_tactic("cuda.triton_conv") is None, cuda_ids
    compare(m)


# ---- Triton kernels (interpreter without a GPU) ---------------------------------------------------------------

def _triton(tid: str) -> Any:
    from kiln.backends.cuda import HAVE_TRITON
    if not HAVE_TRITON:
        pytest.skip("triton is not installed (the test extra has it): the Triton detection kernels are untested")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not set: the Triton kernels cannot run")
    t = get_tactic(tid)
    assert t is not None, f"{tid} is not registered although triton imports"
    return t


DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # 0/0 in masked lanes (interpreter)
def test_triton_batched_nms_matches_reference() -> None:
    t = _triton("cuda.triton_batched_nms")
    rng = np.random.default_rng()
    cases = [(0.5, 9, 4096, 0), (0.375, 20, 30, 1), (0.0, 5, 4096, 0)]
    for (iou, k, top_k, agnostic), cfg in zip(cases, t.configs(_nms_node(), None)):
        boxes, scores = grid_problem(rng, 2, 40, 3)
        node = _nms_node(score_threshold=0.2, iou_threshold=iou, max_output_boxes=k, pre_nms_top_k=top_k,
                         class_agnostic=agnostic)
        want, _ = nms64(boxes, scores, 0.2, iou, k, bool(agnostic), top_k)
        _same(t.make(node, cfg, DEV)(torch.from_numpy(boxes).to(DEV), torch.from_numpy(scores).to(DEV)), want)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # 0/0 in masked lanes (interpreter)
def test_triton_nms_maps_onnx_nonmaxsuppression_onto_the_greedy_kernel() -> None:
    t = _triton("cuda.triton_nms")
    rng = np.random.default_rng()
    for center, limit, iou in ((0, 6, 0.5), (1, 100, 0.3)):
        node = _node("NonMaxSuppression", 5, 1, domain="", opset=11, center_point_box=center)
        lo = rng.uniform(0, 10, (2, 40, 2))
        size = rng.uniform(0.0, 4, (2, 40, 2)) * (rng.random((2, 40, 1)) > 0.1)  # some boxes of no area
        box = np.concatenate([lo + size / 2, size] if center else [lo, lo + size], -1).astype(np.float32)
        scores = (rng.integers(0, 6, (2, 3, 40)) / 5).astype(np.float32)  # tied scores
        args = [torch.from_numpy(box), torch.from_numpy(scores), torch.tensor([limit]), torch.tensor([iou]),
                torch.tensor([0.1])]
        want = lookup("NonMaxSuppression").compute(node, *args)
        got = t.make(node, {"block": 32, "num_warps": 1}, DEV)(*(a.to(DEV) for a in args))
        assert torch.equal(got.cpu(), want), (got.shape, want.shape)


def test_triton_decode_matches_reference() -> None:
    t = _triton("cuda.triton_yolo_decode")
    head = torch.randn(2, 3 * 8, 5, 6)
    lb = torch.tensor([[0.5, 0.75, 3.0, 11.0], [2.0, 1.5, 0.0, -4.0]])
    kw = dict(anchors=A26, num_classes=3, input_size=[160, 192], scale_x_y=1.1)
    cases = [(_node("YoloDecode", 1, 2, **kw), (head,)),
             (_node("YoloDecode", 1, 2, letterbox=[0.5, 0.75, 3.0, 11.0], **kw), (head.contiguous(memory_format=torch.channels_last),)),
             (_node("YoloDecode", 2, 2, **kw), (head, lb))]
    for (node, args), cfg in zip(cases, t.configs(cases[0][0], None) * 2):
        want = D.YoloDecode().compute(node, *args)
        got = t.make(node, cfg, DEV)(*(a.to(DEV) for a in args))
        for g, w in zip(got, want):
            torch.testing.assert_close(g.cpu(), w, rtol=1e-5, atol=1e-4)


# ---- on a GPU: no host round trip, one CUDA graph ------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: checks that decode + BatchedNMS "
                    "run with torch.cuda.set_sync_debug_mode('error') and replay from a CUDA graph")
def test_cuda_post_processing_without_host_sync_in_a_cuda_graph() -> None:
    dev = torch.device("cuda")
    c = 80
    heads = [torch.randn(4, 3 * (5 + c), 13, 13, device=dev), torch.randn(4, 3 * (5 + c), 26, 26, device=dev)]
    lb = torch.tensor([[1.3, 1.3, 0.0, 52.0]] * 4, device=dev)
    decs = [_node("YoloDecode", 2, 2, anchors=a, num_classes=c, input_size=[416, 416]) for a in (A13, A26)]
    nms = _nms_node(score_threshold=0.3, iou_threshold=0.45, max_output_boxes=100, pre_nms_top_k=1024)
    for dec_id, nms_id in (("ref", "ref"), ("cuda.triton_yolo_decode", "cuda.triton_batched_nms")):
        dk = [get_tactic(dec_id).make(d, get_tactic(dec_id).configs(d, None)[0], dev) for d in decs]
        nk = get_tactic(nms_id).make(nms, get_tactic(nms_id).configs(nms, None)[0], dev)

        def pipeline() -> Any:
            parts = [k(h, lb) for k, h in zip(dk, heads)]
            return nk(torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1))
        eager = pipeline()  # compiles the Triton kernels, makes the anchors
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            pipeline()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            again = pipeline()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static = pipeline()
            graph.replay()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
        for a, b, s in zip(eager, again, static):
            assert torch.equal(a, b) and torch.equal(a, s)
        assert int(eager[0].min()) > 0
