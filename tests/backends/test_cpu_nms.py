"""cpu.nms (kiln/backends/cpu/nms.py, native/nms.c) against onnxruntime, the ONNX reference evaluator and
Kiln's reference NonMaxSuppression, on fresh random inputs: every (batch, class) row, score thresholds,
limits, zero-area and flipped boxes, tied scores, IoU thresholds of 0 and >= 1, non-finite coordinates,
and torchvision's batched NMS (classes separated by coordinate offsets, 27,000 boxes)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper

from kiln.backends.cpu.nms import CpuNmsTactic, _library
from kiln.backends.tactic import TacticContext, get_tactic
from kiln.ir.dtype import DType
from kiln.ir.graph import Node, Value
from kiln.ir.types import TensorType
from kiln.ops.registry import lookup

pytestmark = pytest.mark.skipif(_library() is None, reason="no C compiler for native/nms.c")

NAMES = ["boxes", "scores", "max_out", "iou", "score"]


def _node(center: int = 0, n_inputs: int = 5, dtype: DType = DType.FLOAT32) -> Node:
    ins = [Value(nm, TensorType(dtype if i < 2 else None, None)) for i, nm in enumerate(NAMES[:n_inputs])]
    return Node("NonMaxSuppression", ins, [Value("y")], {"center_point_box": center} if center else {},
                name="nms", opset=11)


def _oracles(feeds: dict[str, np.ndarray], center: int, which: tuple[str, ...]) -> list[np.ndarray]:
    """onnxruntime ("ort") and the ONNX reference evaluator ("onnx") on the same one-node model."""
    from onnx.reference import ReferenceEvaluator
    import onnxruntime as ort
    types = {"boxes": TensorProto.FLOAT, "scores": TensorProto.FLOAT, "max_out": TensorProto.INT64,
             "iou": TensorProto.FLOAT, "score": TensorProto.FLOAT}
    names = list(feeds)
    g = helper.make_graph([helper.make_node("NonMaxSuppression", names, ["y"], center_point_box=center)], "g",
                          [helper.make_tensor_value_info(n, types[n], None) for n in names],
                          [helper.make_tensor_value_info("y", TensorProto.INT64, None)])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.log_severity_level = 3
    got = []
    if "ort" in which:
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        got.append(sess.run(None, feeds)[0])
    if "onnx" in which:
        got.append(np.asarray(ReferenceEvaluator(model).run(None, feeds)[0]).reshape(-1, 3).astype(np.int64))
    return got


def _check(feeds: dict[str, np.ndarray], center: int = 0, oracles: tuple[str, ...] = ("ort", "onnx")) -> np.ndarray:
    node = _node(center, len(feeds))
    kernel = CpuNmsTactic().build(node, {}, torch.device("cpu"))
    args = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in NAMES[:len(feeds)]]
    got = kernel(*args)
    want = lookup("NonMaxSuppression").compute(node, *args)
    assert got.dtype == torch.int64 and torch.equal(got, want), (got.shape, want.shape)
    if oracles:
        for w in _oracles(feeds, center, oracles):
            np.testing.assert_array_equal(got.numpy(), w)
    return got.numpy()


def _boxes(rng: np.random.Generator, b: int, n: int, span: float = 50.0, size: float = 20.0) -> np.ndarray:
    lo = rng.uniform(0, span, (b, n, 2))
    hi = lo + rng.uniform(0, size, (b, n, 2))
    return np.concatenate([lo, hi], -1).astype(np.float32)


def _feeds(boxes: np.ndarray, scores: np.ndarray, max_out: int, iou: float, score: float) -> dict[str, np.ndarray]:
    return {"boxes": boxes, "scores": scores, "max_out": np.array([max_out], np.int64),
            "iou": np.array([iou], np.float32), "score": np.array([score], np.float32)}


@pytest.mark.parametrize("seed", range(12))
def test_random_rows(seed: int) -> None:
    rng = np.random.default_rng(1000 + seed)
    b, c, n = int(rng.integers(1, 3)), int(rng.integers(1, 4)), int(rng.integers(1, 200))
    boxes = _boxes(rng, b, n)
    if seed % 2:
        boxes = boxes[..., [1, 0, 3, 2]]  # (x, y) corners where (y, x) are expected: still corners
    if seed % 3 == 0:
        boxes = np.where(rng.uniform(size=boxes.shape) < 0.1, boxes[..., [2, 3, 0, 1]], boxes)  # some flipped
    scores = rng.uniform(0, 1, (b, c, n)).astype(np.float32)
    max_out = int(rng.integers(1, 60)) if seed % 4 else 10 ** 6
    iou = float(rng.choice([0.0, 0.2, 0.45, 0.7, 0.95]))
    _check(_feeds(boxes, scores, max_out, iou, float(rng.uniform(0, 0.5))))


@pytest.mark.parametrize("center", [0, 1])
def test_ties_zero_area_and_center_boxes(center: int) -> None:
    rng = np.random.default_rng(7)
    n = 150
    boxes = _boxes(rng, 1, n, span=20, size=8)
    if center:
        boxes = np.concatenate([(boxes[..., :2] + boxes[..., 2:]) / 2, boxes[..., 2:] - boxes[..., :2]], -1)
    flat = rng.uniform(size=(1, n)) < 0.15
    boxes[..., 2 if center else 3][flat] = boxes[..., 0 if center else 1][flat] * (0 if center else 1)  # no area
    boxes[0, 5] = boxes[0, 6]  # identical boxes
    scores = (np.round(rng.uniform(0, 1, (1, 2, n)) * 5) / 5).astype(np.float32)  # many ties
    _check(_feeds(boxes, scores, 40, 0.5, 0.0), center=center)


@pytest.mark.parametrize("iou", [0.0, 1.0, 1.5, float("nan")])
def test_thresholds_that_keep_or_drop_everything(iou: float) -> None:
    rng = np.random.default_rng(3)
    feeds = _feeds(_boxes(rng, 2, 80), rng.uniform(0, 1, (2, 2, 80)).astype(np.float32), 1000, iou, 0.25)
    # onnxruntime refuses thresholds above 1; at NaN it and the ONNX reference disagree (Kiln: nothing suppressed)
    _check(feeds, oracles=("ort", "onnx") if iou <= 1 else ("onnx",) if iou > 1 else ())


def test_empty_results() -> None:
    rng = np.random.default_rng(4)
    boxes, scores = _boxes(rng, 1, 30), rng.uniform(0, 1, (1, 3, 30)).astype(np.float32)
    assert _check(_feeds(boxes, scores, 0, 0.5, 0.0)).shape == (0, 3)          # max_output_boxes_per_class 0
    assert _check(_feeds(boxes, scores, 10, 0.5, 2.0)).shape == (0, 3)         # no score above the threshold
    empty = _feeds(np.zeros((1, 0, 4), np.float32), np.zeros((1, 3, 0), np.float32), 10, 0.5, 0.0)
    assert _check(empty).shape == (0, 3)                                      # no boxes


def test_non_finite_coordinates() -> None:
    """Infinite and NaN corners: a NaN box has no positive area (kept untested); infinite boxes put the row's
    grid in one cell; the IoU of infinite boxes is NaN or 0, as the reference computes it."""
    rng = np.random.default_rng(5)
    boxes = _boxes(rng, 1, 60)
    boxes[0, 3, 0] = -np.inf
    boxes[0, 7, 3] = np.inf
    boxes[0, 11, 1] = np.nan
    boxes[0, 13] = [np.inf, np.inf, np.inf, np.inf]
    scores = rng.uniform(0, 1, (1, 1, 60)).astype(np.float32)
    _check(_feeds(boxes, scores, 100, 0.3, 0.0), oracles=())


def test_without_optional_inputs() -> None:
    rng = np.random.default_rng(6)
    feeds = {"boxes": _boxes(rng, 1, 20), "scores": rng.uniform(0, 1, (1, 1, 20)).astype(np.float32)}
    # (the ONNX reference evaluator needs every input)
    assert _check(feeds, oracles=("ort",)).shape == (0, 3)  # max_output_boxes_per_class defaults to 0
    feeds["max_out"] = np.array([5], np.int64)
    _check(feeds, oracles=("ort",))  # IoU threshold 0: any overlap suppresses


def test_half_inputs_compute_in_float32() -> None:
    rng = np.random.default_rng(8)
    node = _node(n_inputs=5, dtype=DType.FLOAT16)
    kernel = CpuNmsTactic().build(node, {}, torch.device("cpu"))
    args = [torch.from_numpy(_boxes(rng, 1, 90)).half(), torch.from_numpy(rng.uniform(0, 1, (1, 2, 90))).half(),
            torch.tensor([30]), torch.tensor([0.4]), torch.tensor([0.1])]
    assert torch.equal(kernel(*args), lookup("NonMaxSuppression").compute(node, *args))
    dbl = [a.double() if a.is_floating_point() else a for a in args]  # float64: the reference runs
    assert torch.equal(kernel(*dbl), lookup("NonMaxSuppression").compute(node, *dbl))


def test_batched_offsets_like_torchvision() -> None:
    """torchvision's batched_nms: 90 classes of 300 boxes, each class shifted by (label * (max + 1)) so that
    no two classes overlap, all in one NMS row (SSDlite's export)."""
    rng = np.random.default_rng(9)
    n = 27000
    label = np.repeat(np.arange(1, 91), 300)
    xy = rng.uniform(0, 300, (n, 2))
    box = np.concatenate([xy, np.minimum(xy + rng.uniform(2, 200, (n, 2)), 320)], -1) + (label * 321.0)[:, None]
    scores = rng.uniform(0, 1, (1, 1, n)).astype(np.float32)
    got = _check(_feeds(box[None].astype(np.float32), scores, 2 ** 62, 0.55, float("-inf")), oracles=())
    assert 0 < len(got) < n


def test_tactic_takes_float_nms_only() -> None:
    t = get_tactic("cpu.nms")
    ctx = TacticContext(torch.device("cpu"))
    assert t is not None and t.supports(_node(), ctx)
    assert t.supports(_node(dtype=DType.FLOAT16), ctx)
    assert not t.supports(_node(dtype=DType.FLOAT64), ctx)
    unknown = Node("NonMaxSuppression", [Value("b"), Value("s")], [Value("y")], {}, name="n", opset=11)
    assert not t.supports(unknown, ctx)  # element types unknown: the reference's layer
